"""Which kernels an inversion problem runs on: CPU convolutions, and attention.

torch sends a float32 CPU convolution to oneDNN whenever the batch exceeds one or the kernel
exceeds 3x3. oneDNN sets up every call anew (about 100 us here, against about 20 us of
arithmetic in a sigmoid-LeNet layer), and an inversion iteration makes some twenty
convolution calls (forward, the client's gradient, and its derivative), so small models
spend most of an iteration setting up. torch's native kernels set up in a fraction of that
but compute large layers, large stacks and grouped convolutions more slowly. An inversion
problem therefore runs on the native kernels when its largest convolution, over all its
stacked samples, is small: sigmoid LeNet at B = 1 iterates 1.4x faster, while ResNet-20 and a
round's stacked problems keep oneDNN (docs/performance.md, "CPU convolution kernels").

The choice depends only on the model, the input shape and the stack, never on timing, so
the same run computes the same bits on a loaded and an idle machine.

Attention runs by its plain formula while an attack inverts (`differentiable_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.conv import _ConvNd

# Multiply-adds of the largest convolution over the whole stack below which the native
# kernels win. Measured (one thread, IG iteration, native / oneDNN): LeNet 3x32x32 (230k per
# target) 0.70 for one target, 0.83 for two, 0.91 for three, 0.98 for four; LeNet 3x64x64
# (922k) 1.02; ResNet-20-GN (2.4M) 1.38; 16 stacked LeNet targets (3.7M) 1.34. Through the
# written-out layer chain (`chain`, 3 December 2026): LeNet 0.62 for one target, 0.79 for two,
# 0.98-1.01 for four.
NATIVE_BELOW = 800_000


def largest_convolution(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of the model's largest convolution for one input of `input_shape`
    (0 without convolutions), from the layers' shapes in one forward pass without gradients.
    The model must not change state in its forward pass (the replay's models do not)."""
    convolutions = [m for m in model.modules() if isinstance(m, _ConvNd)]
    if not convolutions:
        return 0
    work: list[int] = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, _ConvNd)
        taps = math.prod(module.kernel_size)
        if module.transposed:  # every input value is scattered through the kernel
            work.append(inputs[0][0].numel() * module.out_channels // module.groups * taps)
        else:  # every output value gathers from the kernel
            work.append(output[0].numel() * module.in_channels // module.groups * taps)

    parameter = next(model.parameters())
    handles = [m.register_forward_hook(count) for m in convolutions]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype))
    except (RuntimeError, TypeError, ValueError, IndexError):
        return 0  # inputs that are not float tensors of `input_shape`: keep torch's choice
    finally:
        for handle in handles:
            handle.remove()
    return max(work, default=0)


def native_pays(
    model: nn.Module, input_shape: tuple[int, ...], samples: int, device: torch.device
) -> bool:
    """Whether a problem of `samples` stacked inputs of `input_shape` through `model` runs
    faster on torch's native CPU convolution kernels than on oneDNN."""
    if device.type != "cpu":
        return False
    return 0 < largest_convolution(model, input_shape) * samples < NATIVE_BELOW


@contextmanager
def cpu_convolutions(native: bool) -> Iterator[None]:
    """torch's native CPU convolution kernels (oneDNN off) inside the block when `native`;
    the process-wide setting is restored on the way out. No other convolution sees the switch:
    clients train in other processes (Ray actors), and the server thread or attack worker that
    inverts runs nothing else meanwhile."""
    if not native:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """`scaled_dot_product_attention` (and `nn.MultiheadAttention`) by its plain formula inside
    the block: torch's fused attention kernels have no second derivative, and matching a
    gradient differentiates the model's gradient, so every optimisation attack on a model with
    attention failed. Process-wide like `cpu_convolutions`, and restored on the way out."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
