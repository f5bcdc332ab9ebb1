"""Input encodings: MixUp and InstaHide, as evaluated by Huang et al. (GradAttack, NeurIPS 2021).

Each encoded sample i mixes its own image (source column 0) with K-1 partner images using K
non-negative coefficients that sum to 1, no single one above 0.65. The law is GradAttack's:
Dirichlet(3, 1, ..., 1), the concentration 3 on the first image (here the sample's own, which
is therefore the largest share about two times in three at K = 4), conditioned on the bound
by rejection: draws with a coefficient above 0.65 are discarded and redrawn, so the accepted
ones are exactly the conditioned distribution (clipping and renormalising would not be).

- MixUp mixes with K-1 other images of the client's training set (its whole partition, as
  GradAttack and InstaHide define it, not only the batch: this is what lets it run at B = 1);
  encoded inputs stay in [0, 1].
- InstaHide mixes the same way (intra: partners from the client's partition; inter: K-1
  partners from a public pool the caller passes), then flips the sign of every coordinate of
  the mixture at random (a fresh mask per encoded image) about `SIGN_CENTRE`. InstaHide
  normalises images before mixing, so that the sign carries information; fedleak's images are
  in [0, 1], where a flip about 0 would only change what the model sees, not what |x| shows
  an attacker. Flipped about the middle of the range, a coordinate becomes 1 - x, and encoded
  inputs stay in [0, 1], the range the model is tested in.

The caller describes the client's partition as a `PartnerPool` (rows of an image store, read
only where drawn); without one, the batch stands in for it. A sample is never its own partner.
The result records every source: `sources[i, j]` indexes the private images, i.e. the batch
followed by `partners` (the private partner images from outside the batch), or the public pool
where `from_public[i, j]`.

Labels are mixed with the same coefficients. Public images carry no label, so under
inter-InstaHide a soft label holds only the private share lambda_1 * y_1 (its mass is lambda_1
< 1), which is the loss InstaHide trains with. Every draw comes from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedleak.defenses.grammar import DefenseSpecError

MAX_COEFFICIENT = 0.65
# Dirichlet concentration of the own image's coefficient (the others': 1).
OWN_CONCENTRATION = 3
# The point InstaHide's sign flip reflects about: the middle of the [0, 1] image range.
SIGN_CENTRE = 0.5


class EncodingError(ValueError):
    """An encoding cannot run on the batch it was given (too few images, no public pool)."""


@dataclass(frozen=True)
class PartnerPool:
    """The private images an encoding may mix a sample with: rows `members` of `images` (e.g.
    the client's partition within the whole training set), with int64 `labels` per row of
    `images`. `batch_rows[i]` is the row holding batch sample i (so it is never its own partner,
    and a partner that is also in the batch is recorded as that batch sample)."""

    images: Tensor
    members: Tensor
    labels: Tensor
    batch_rows: Tensor

    @classmethod
    def of_batch(cls, x: Tensor, y_onehot: Tensor) -> PartnerPool:
        """The batch standing in for the client's data (when no partition is given)."""
        rows = torch.arange(x.shape[0])
        return cls(x, rows, y_onehot.argmax(dim=1).cpu(), rows)

    @property
    def size(self) -> int:
        """How many images the pool holds."""
        return int(self.members.shape[0])


@dataclass(frozen=True)
class EncodedBatch:
    """An encoded batch and everything needed to recompute it from the source images.

    `sources[i, j]` indexes the private images, the batch followed by `partners` (private
    partner images from outside the batch, int64 labels `partner_labels`), or the public pool
    where `from_public[i, j]`; `coefficients[i]` sums to 1; `signs` is the ±1 mask of
    InstaHide (None otherwise). Without an encoder the batch is the identity: K = 1,
    sources = arange, coefficients = 1, no partners.
    """

    inputs: Tensor
    soft_labels: Tensor
    sources: Tensor
    coefficients: Tensor
    signs: Tensor | None
    from_public: Tensor
    partners: Tensor
    partner_labels: Tensor

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
            partners=x.new_zeros((0, *x.shape[1:])),
            partner_labels=torch.zeros(0, dtype=torch.int64, device=x.device),
        )

    def reapply(self, private: Tensor, public: Tensor | None = None) -> Tensor:
        """The encoding of other (e.g. dummy) private images (the batch followed by the
        partners) with the same sources, coefficients and signs; differentiable in `private`,
        which is what an adaptive attacker needs."""
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
    """sum_j coefficients[:, j] * image(sources[:, j]); with a sign mask, each coordinate's
    offset from `SIGN_CENTRE` multiplied by its sign."""
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
    return mixed if signs is None else SIGN_CENTRE + (mixed - SIGN_CENTRE) * signs


def unsigned(x: Tensor) -> Tensor:
    """What an InstaHide encoding shows whatever its sign mask: each coordinate reflected to
    the upper side of `SIGN_CENTRE` (|x - c| + c): what two images equal up to flips share."""
    return SIGN_CENTRE + (x - SIGN_CENTRE).abs()


def fold_toward(x: Tensor, reference: Tensor) -> Tensor:
    """Of each coordinate's two readings under a flip about `SIGN_CENTRE`, c + |x - c| and
    c - |x - c|, the one nearer `reference` (broadcast against x): how an attacker with a prior
    image (the mean of its auxiliary data) reads an InstaHide reconstruction."""
    offset = (x - SIGN_CENTRE).abs()
    below = reference < SIGN_CENTRE
    return torch.where(below, SIGN_CENTRE - offset, SIGN_CENTRE + offset)


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
    """`rows` draws of Dirichlet(OWN_CONCENTRATION, 1, ..., 1) on the K-simplex with every
    coefficient <= MAX_COEFFICIENT."""
    accepted: list[Tensor] = []
    missing = rows
    extra = OWN_CONCENTRATION - 1
    while missing > 0:
        # Oversample so that even K=2 (acceptance 0.23) usually needs one or two rounds.
        exp = torch.empty(max(5 * missing, 16), k + extra, device=device, dtype=torch.float64)
        exp.exponential_(generator=generator)
        # Gamma(c) for the own image as the sum of c unit exponentials; Gamma(1) for the rest.
        gammas = torch.cat([exp[:, : extra + 1].sum(dim=1, keepdim=True), exp[:, extra + 1 :]], 1)
        draws = gammas / gammas.sum(dim=1, keepdim=True)
        draws = draws[draws.max(dim=1).values <= MAX_COEFFICIENT][:missing]
        accepted.append(draws)
        missing -= draws.shape[0]
    return torch.cat(accepted).to(dtype)


def _check_k(name: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise DefenseSpecError(f"{name}: K={k!r} must be an integer >= 2 (images mixed per sample)")


def _draw(
    pool_size: int,
    batch: int,
    count: int,
    own: Tensor | None,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """`count` distinct random positions in a pool for each of `batch` rows (never the position
    where `own` [batch, pool_size] is True): the smallest of uniform scores."""
    scores = torch.rand(batch, pool_size, generator=generator, device=device)
    if own is not None:
        scores = scores.masked_fill(own.to(device), 2.0)
    return scores.topk(count, dim=1, largest=False).indices


def _private_partners(
    x: Tensor, k: int, pool: PartnerPool, generator: torch.Generator, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """K-1 partners per sample from the private pool: (their indices into the batch followed by
    the new partners [B, K-1], the new partner images, their int64 labels)."""
    batch, device = x.shape[0], x.device
    members, rows = pool.members.cpu(), pool.batch_rows.cpu()
    own = members.unsqueeze(0) == rows.unsqueeze(1)  # [B, N]: where each sample sits in the pool
    available = pool.size - (int(own.sum(dim=1).max()) if batch else 0)
    if available < k - 1:
        where = "the batch holds" if pool.images is x else "the client's data holds"
        raise EncodingError(
            f"{name} mixes each image with K-1={k - 1} others but {where} {pool.size} "
            f"({available} besides the image itself); use a smaller K or more data per client"
        )
    drawn = members[_draw(pool.size, batch, k - 1, own, generator, device).cpu()]  # rows
    in_batch = drawn.unsqueeze(-1) == rows.view(1, 1, -1)  # [B, K-1, B]
    outside = drawn[~in_batch.any(dim=-1)].unique()
    slot = torch.searchsorted(outside, drawn).clamp(max=max(len(outside) - 1, 0)) + batch
    index = torch.where(in_batch.any(dim=-1), in_batch.int().argmax(dim=-1), slot)
    partners = pool.images[outside].to(device=device, dtype=x.dtype)
    return index.to(device), partners, pool.labels[outside].to(device=device, dtype=torch.int64)


def _encode(
    x: Tensor,
    y_onehot: Tensor,
    k: int,
    generator: torch.Generator,
    name: str,
    private: PartnerPool | None,
    public: Tensor | None,
    flip_signs: bool,
) -> EncodedBatch:
    batch, device = x.shape[0], x.device
    own = torch.arange(batch, device=device).unsqueeze(1)
    partners = x.new_zeros((0, *x.shape[1:]))
    partner_labels = torch.zeros(0, dtype=torch.int64, device=device)
    if public is None:
        pool = private if private is not None else PartnerPool.of_batch(x, y_onehot)
        drawn, partners, partner_labels = _private_partners(x, k, pool, generator, name)
        from_public = torch.zeros(batch, k, dtype=torch.bool, device=device)
    else:
        if public.shape[0] < k - 1 or public.shape[1:] != x.shape[1:]:
            raise EncodingError(
                f"{name} needs a public pool of at least {k - 1} images shaped "
                f"{tuple(x.shape[1:])}; got {tuple(public.shape)}"
            )
        drawn = _draw(public.shape[0], batch, k - 1, None, generator, device)
        from_public = torch.ones(batch, k, dtype=torch.bool, device=device)
        from_public[:, 0] = False
    sources = torch.cat([own, drawn], dim=1)
    coefficients = bounded_coefficients(batch, k, generator, device, x.dtype)
    signs = None
    if flip_signs:
        bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
        signs = (bits * 2 - 1).to(x.dtype)
    private_images = torch.cat([x, partners])
    classes = y_onehot.shape[1]
    private_labels = torch.cat([y_onehot, F.one_hot(partner_labels, classes).to(y_onehot.dtype)])
    return EncodedBatch(
        inputs=mix_images(private_images, sources, coefficients, from_public, signs, public),
        soft_labels=mix_labels(private_labels, sources, coefficients, from_public),
        sources=sources,
        coefficients=coefficients,
        signs=signs,
        from_public=from_public,
        partners=partners,
        partner_labels=partner_labels,
    )


@dataclass(frozen=True)
class MixUp:
    """MixUp with K images per encoded sample, all from the client's own data."""

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
        self,
        x: Tensor,
        y_onehot: Tensor,
        generator: torch.Generator,
        public: Tensor | None = None,
        private: PartnerPool | None = None,
    ) -> EncodedBatch:
        """Encode a batch with partners from `private` (the batch when None); `public` is
        ignored (MixUp only mixes private images)."""
        return _encode(x, y_onehot, self.k, generator, self.spec, private, None, flip_signs=False)


@dataclass(frozen=True)
class InstaHide:
    """InstaHide with K images per encoded sample: intra (partners from the client's own data)
    or inter (partners from a public pool), then a random ±1 mask per encoded image."""

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
        self,
        x: Tensor,
        y_onehot: Tensor,
        generator: torch.Generator,
        public: Tensor | None = None,
        private: PartnerPool | None = None,
    ) -> EncodedBatch:
        """Encode a batch; the inter version needs `public`, the intra version draws from
        `private` (the batch when None) and ignores `public`."""
        if self.inter and public is None:
            raise EncodingError(f"{self.spec} mixes public images; pass a public pool (public=...)")
        pool = public if self.inter else None
        return _encode(x, y_onehot, self.k, generator, self.spec, private, pool, flip_signs=True)
