"""Feature hashing: equals an explicit sparse projection; memory independent of the input size."""

from __future__ import annotations

import pytest
import torch

from fedleak.attacks.learned.hashing import FeatureHasher, HashingError, resolve_num_bins
from fedleak.attacks.learned.inverter import Inverter
from fedleak.attacks.learned.pairs import Featuriser


def explicit_projection(hasher: FeatureHasher) -> torch.Tensor:
    """The k x m matrix P that hashing applies, built densely (small cases only)."""
    m = hasher.in_features
    bins = hasher.bin_ids(0, m)
    signs = hasher.signs(0, m)
    indices = torch.stack([bins, torch.arange(m)])
    return torch.sparse_coo_tensor(
        indices, signs, (hasher.num_bins, m), check_invariants=True
    ).to_dense()


@pytest.mark.parametrize("signed", [False, True])
def test_hash_equals_explicit_sparse_projection(signed: bool) -> None:
    # A chunk smaller than m exercises the chunked path and its index offsets.
    hasher = FeatureHasher(1000, 37, seed=3, signed=signed, chunk_size=128)
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    projection = explicit_projection(hasher)
    assert ((projection != 0).sum(0) == 1).all()  # one non-zero per column
    torch.testing.assert_close(hasher(x), x @ projection.T, rtol=1e-5, atol=1e-5)


def test_projection_is_seeded_and_spreads_coordinates() -> None:
    a = FeatureHasher(50_000, 100, seed=1).bin_ids(0, 50_000)
    b = FeatureHasher(50_000, 100, seed=1).bin_ids(0, 50_000)
    c = FeatureHasher(50_000, 100, seed=2).bin_ids(0, 50_000)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.9
    counts = torch.bincount(a, minlength=100)
    assert counts.min() > 350 and counts.max() < 650  # about 500 per bin
    signs = FeatureHasher(50_000, 100, seed=1, signed=True).signs(0, 50_000)
    assert abs(float(signs.mean())) < 0.03


def test_chunk_size_does_not_change_the_result() -> None:
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1))
    small = FeatureHasher(5000, 64, seed=7, signed=True, chunk_size=97)(x)
    large = FeatureHasher(5000, 64, seed=7, signed=True, chunk_size=1 << 20)(x)
    torch.testing.assert_close(small, large)


def test_hash_dict_equals_hash_of_concatenation() -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(4, 3, 5, generator=gen), "b": torch.randn(4, 7, generator=gen)}
    hasher = FeatureHasher(22, 6, seed=0, signed=True, chunk_size=4)
    flat = torch.cat([t.flatten(1) for t in tensors.values()], dim=1)
    torch.testing.assert_close(hasher.hash_dict(tensors), hasher(flat))


@pytest.mark.parametrize("bins", [None, 6])
@pytest.mark.parametrize("normalise", [False, True])
def test_features_are_the_blocks_scaled_joined_and_hashed_bit_for_bit(
    bins: int | None, normalise: bool
) -> None:
    """The featuriser divides each block into place (or chunk by chunk while hashing): the
    same bits as dividing whole blocks, joining them and hashing the join."""
    gen = torch.Generator().manual_seed(3)
    update = {"a": torch.randn(4, 3, 5, generator=gen), "b": torch.randn(4, 7, generator=gen)}
    featuriser = Featuriser({"a": 15, "b": 7}, bins, 0, True, block_normalise=normalise)
    if featuriser.hasher is not None:
        featuriser.hasher.chunk_size = 4  # several chunks per block
    blocks = [u.flatten(1) for u in update.values()]
    if normalise:
        blocks = [b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) for b in blocks]
    joined = torch.cat(blocks, dim=1)
    expected = joined if featuriser.hasher is None else featuriser.hasher(joined)
    before = {name: u.clone() for name, u in update.items()}
    assert torch.equal(featuriser(update), expected)
    assert all(torch.equal(update[name], before[name]) for name in update)  # not divided in place


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_memory_does_not_grow_with_gradient_size() -> None:
    bins = 256
    footprints, first_layers = [], []
    for m in (10_000, 1_000_000):
        featuriser = Featuriser({"w": m}, bins, hash_seed=0, hash_signed=True, block_normalise=True)
        assert featuriser.out_features == bins
        inverter = Inverter(featuriser.out_features, (64,), (1, 4, 4), 1, 10)
        first_layers.append(tuple(inverter.body[0].weight.shape))
        footprints.append(_tensor_bytes(inverter))
        # The hasher holds no tensor at all: bins are recomputed from indices chunk by chunk.
        hasher = featuriser.hasher
        assert hasher is not None
        assert not [v for v in vars(hasher).values() if isinstance(v, torch.Tensor)]
    assert first_layers[0] == first_layers[1] == (64, bins)
    assert footprints[0] == footprints[1]


def test_peak_working_memory_is_bounded_by_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bin ids are computed for one chunk of coordinate indices at a time, never for all m."""
    sizes: list[int] = []
    original = torch.arange

    def recording_arange(*args: object, **kwargs: object) -> torch.Tensor:
        out = original(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "arange", recording_arange)
    rows, chunk, m = 2, 1024, 300_000
    hasher = FeatureHasher(m, 100, seed=0, chunk_size=chunk)
    out = hasher(torch.ones(rows, m))
    assert max(sizes) <= chunk  # index ranges never span the whole gradient
    torch.testing.assert_close(out.sum(1), torch.full((rows,), float(m)))


@pytest.mark.parametrize(("value", "expected"), [(10, 10), (0.1, 100), (1.0, 1000), (1e-6, 1)])
def test_bins_from_count_or_ratio(value: int | float, expected: int) -> None:
    assert resolve_num_bins(value, 1000) == expected


@pytest.mark.parametrize("value", [0, -3, 0.0, 1.5, True, "10"])
def test_bad_bins_are_refused(value: object) -> None:
    with pytest.raises(HashingError, match="hash_bins"):
        resolve_num_bins(value, 1000)  # type: ignore[arg-type]


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(HashingError, match="must be"):
        FeatureHasher(10, 3)(torch.zeros(2, 11))
