"""Input encodings: MixUp and InstaHide, as evaluated by Huang et al. (GradAttack, NeurIPS 2021).

Each encoded sample i mixes its own image (source column 0) with K-1 partner images using K
non-negative coefficients that sum to 1, no single one above 0.65 (GradAttack, after Huang et
al. 2020). Coefficients are a uniform (Dirichlet(1, ..., 1)) draw on the simplex conditioned on
that bound by rejection: draws with a coefficient above 0.65 are discarded and redrawn, so the
accepted ones are exactly the conditioned distribution (clipping and renormalising would not be).

- MixUp mixes with K-1 other images of the client's batch; encoded inputs stay in [0, 1].
- InstaHide mixes the same way (intra: partners from the batch; inter: K-1 partners from a
  public pool the caller passes), then multiplies every coordinate by a random sign (+1 or -1,
  a fresh mask per encoded image). Encoded inputs therefore lie in [-1, 1].

Labels are mixed with the same coefficients. Public images carry no label, so under
inter-InstaHide a soft label holds only the private share lambda_1 * y_1 (its mass is lambda_1
< 1), which is the loss InstaHide trains with. Every draw comes from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.defenses.grammar import DefenseSpecError

MAX_COEFFICIENT = 0.65


class EncodingError(ValueError):
    """An encoding cannot run on the batch it was given (too few images, no public pool)."""


@dataclass(frozen=True)
class EncodedBatch:
    """An encoded batch and everything needed to recompute it from the source images.

    `sources[i, j]` indexes the private batch, or the public pool where `from_public[i, j]`;
    `coefficients[i]` sums to 1; `signs` is the ±1 mask of InstaHide (None otherwise). Without
    an encoder the batch is the identity: K = 1, sources = arange, coefficients = 1.
    """

    inputs: Tensor
    soft_labels: Tensor
    sources: Tensor
    coefficients: Tensor
    signs: Tensor | None
    from_public: Tensor

    @property
    def k(self) -> int:
        """How many images each encoded sample mixes."""
        return self.sources.shape[1]

    @classmethod
    def identity(cls, x: Tensor, y_onehot: Tensor) -> EncodedBatch:
        """The batch unchanged, described as a mixture of one image with coefficient 1."""
        batch = x.shape[0]
        return cls(
            inputs=x,
            soft_labels=y_onehot,
            sources=torch.arange(batch, device=x.device).unsqueeze(1),
            coefficients=torch.ones(batch, 1, device=x.device, dtype=x.dtype),
            signs=None,
            from_public=torch.zeros(batch, 1, device=x.device, dtype=torch.bool),
        )

    def reapply(self, private: Tensor, public: Tensor | None = None) -> Tensor:
        """The encoding of other (e.g. dummy) private images with the same sources, coefficients
        and signs; differentiable in `private`, which is what an adaptive attacker needs."""
        return mix_images(
            private, self.sources, self.coefficients, self.from_public, self.signs, public
        )


def mix_images(
    private: Tensor,
    sources: Tensor,
    coefficients: Tensor,
    from_public: Tensor,
    signs: Tensor | None = None,
    public: Tensor | None = None,
) -> Tensor:
    """sum_j coefficients[:, j] * image(sources[:, j]), times the sign mask when given."""
    if bool(from_public.any()):
        if public is None:
            raise EncodingError("this encoding mixes public images; pass the public pool")
        pool = torch.cat([private, public.to(private.dtype)])
        gathered = pool[sources + from_public.long() * private.shape[0]]
    else:
        gathered = private[sources]
    weights = coefficients.to(private.dtype).reshape(
        *coefficients.shape, *[1] * (private.dim() - 1)
    )
    mixed = (weights * gathered).sum(dim=1)
    return mixed if signs is None else mixed * signs


def mix_labels(
    y_onehot: Tensor, sources: Tensor, coefficients: Tensor, from_public: Tensor
) -> Tensor:
    """Soft labels mixed with the coefficients of the private sources (public images carry
    no label)."""
    private_weights = coefficients.to(y_onehot.dtype) * (~from_public).to(y_onehot.dtype)
    safe_sources = torch.where(from_public, torch.zeros_like(sources), sources)
    return (private_weights.unsqueeze(-1) * y_onehot[safe_sources]).sum(dim=1)


def bounded_coefficients(
    rows: int, k: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """`rows` uniform draws from the K-simplex with every coefficient <= MAX_COEFFICIENT."""
    accepted: list[Tensor] = []
    missing = rows
    while missing > 0:
        # Oversample so that even K=2 (acceptance 0.3) usually needs one or two rounds.
        draws = torch.empty(max(4 * missing, 16), k, device=device, dtype=torch.float64)
        draws.exponential_(generator=generator)
        draws = draws / draws.sum(dim=1, keepdim=True)
        draws = draws[draws.max(dim=1).values <= MAX_COEFFICIENT][:missing]
        accepted.append(draws)
        missing -= draws.shape[0]
    return torch.cat(accepted).to(dtype)


def _check_k(name: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise DefenseSpecError(f"{name}: K={k!r} must be an integer >= 2 (images mixed per sample)")


def _partners(
    pool_size: int,
    batch: int,
    count: int,
    exclude_self: bool,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """`count` distinct random indices into a pool for each of `batch` rows (never the row itself
    when `exclude_self`): the smallest of uniform scores."""
    scores = torch.rand(batch, pool_size, generator=generator, device=device)
    if exclude_self:
        scores.fill_diagonal_(2.0)
    return scores.topk(count, dim=1, largest=False).indices


def _encode(
    x: Tensor,
    y_onehot: Tensor,
    k: int,
    generator: torch.Generator,
    name: str,
    public: Tensor | None,
    flip_signs: bool,
) -> EncodedBatch:
    batch, device = x.shape[0], x.device
    own = torch.arange(batch, device=device).unsqueeze(1)
    if public is None:
        if batch < k:
            raise EncodingError(
                f"{name} mixes K={k} images of the batch but the batch holds {batch}; "
                f"use a batch of at least {k} or a smaller K"
            )
        partners = _partners(batch, batch, k - 1, True, generator, device)
        from_public = torch.zeros(batch, k, dtype=torch.bool, device=device)
    else:
        if public.shape[0] < k - 1 or public.shape[1:] != x.shape[1:]:
            raise EncodingError(
                f"{name} needs a public pool of at least {k - 1} images shaped "
                f"{tuple(x.shape[1:])}; got {tuple(public.shape)}"
            )
        partners = _partners(public.shape[0], batch, k - 1, False, generator, device)
        from_public = torch.ones(batch, k, dtype=torch.bool, device=device)
        from_public[:, 0] = False
    sources = torch.cat([own, partners], dim=1)
    coefficients = bounded_coefficients(batch, k, generator, device, x.dtype)
    signs = None
    if flip_signs:
        bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
        signs = (bits * 2 - 1).to(x.dtype)
    return EncodedBatch(
        inputs=mix_images(x, sources, coefficients, from_public, signs, public),
        soft_labels=mix_labels(y_onehot, sources, coefficients, from_public),
        sources=sources,
        coefficients=coefficients,
        signs=signs,
        from_public=from_public,
    )


@dataclass(frozen=True)
class MixUp:
    """MixUp with K images per encoded sample, all from the client's batch."""

    k: int
    kind: ClassVar[str] = "mixup"
    stage: ClassVar[str] = "encode"
    rank: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        _check_k(self.kind, self.k)

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        return f"mixup:{self.k}"

    def __call__(
        self, x: Tensor, y_onehot: Tensor, generator: torch.Generator, public: Tensor | None = None
    ) -> EncodedBatch:
        """Encode a batch; `public` is ignored (MixUp only mixes private images)."""
        return _encode(x, y_onehot, self.k, generator, self.spec, None, flip_signs=False)


@dataclass(frozen=True)
class InstaHide:
    """InstaHide with K images per encoded sample: intra (batch partners) or inter (public pool),
    then a random ±1 mask per encoded image."""

    k: int
    inter: bool = False
    kind: ClassVar[str] = "instahide"
    stage: ClassVar[str] = "encode"
    rank: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        _check_k(self.kind, self.k)

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        return f"instahide:{self.k}:inter" if self.inter else f"instahide:{self.k}"

    def __call__(
        self, x: Tensor, y_onehot: Tensor, generator: torch.Generator, public: Tensor | None = None
    ) -> EncodedBatch:
        """Encode a batch; the inter version needs `public`, the intra version ignores it."""
        if self.inter and public is None:
            raise EncodingError(f"{self.spec} mixes public images; pass a public pool (public=...)")
        pool = public if self.inter else None
        return _encode(x, y_onehot, self.k, generator, self.spec, pool, flip_signs=True)
