"""The arguments that travel together, as frozen dataclasses: the fused noise, the dropout
mask, a linear call's hyper-parameters and a merge's.

Each bundle holds the user's values (seeds in ``[0, 2**64)``, float scales) and derives the
host-side values every kernel receives (32-bit hash keys, float32 scalars, the dropout
threshold), so a backend converts a bundle to its kernel's arguments in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import noise as noise_lib
from ..formats.registry import float32_scalar

__all__ = ["NoiseSpec", "DropoutSpec", "LinearSpec", "MergeSpec"]


@dataclass(frozen=True)
class NoiseSpec:
    """``scale · noise(seed)`` (:func:`lorasc_kernels.noise.noise`) added to a weight."""

    seed: int
    scale: float

    @property
    def key(self) -> int:
        """The 32-bit key of the noise stream."""
        return noise_lib.stream_key(self.seed, noise_lib.STREAM_NOISE)

    @property
    def scale32(self) -> float:
        return float32_scalar(self.scale)


@dataclass(frozen=True)
class DropoutSpec:
    """The LoRA branch's dropout: probability ``p`` in (0, 1), mask regenerated from ``seed``.

    An element is kept iff ``(bits >> 8) >= threshold`` for its hash ``bits`` on
    :data:`~lorasc_kernels.noise.STREAM_DROPOUT`; kept elements are multiplied by
    ``keep_scale = 1 / (1 - p)``.
    """

    seed: int
    p: float

    @property
    def key(self) -> int:
        return noise_lib.stream_key(self.seed, noise_lib.STREAM_DROPOUT)

    @property
    def threshold(self) -> int:
        """Integer threshold on ``bits >> 8`` (24 bits)."""
        return int(self.p * (1 << 24))

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)


@dataclass(frozen=True)
class LinearSpec:
    """Hyper-parameters of one LoRASC linear call: ``y = x (W ⊕ noise)ᵀ + b + scale ·
    drop(x) Aᵀ Bᵀ``; ``dropout`` / ``noise`` are None when off; ``compute`` ``"fp8"``: a
    scaled weight's GEMMs on fp8 activations and gradients (``docs/fp8.md``), else None."""

    scale: float
    dropout: DropoutSpec | None = None
    noise: NoiseSpec | None = None
    compute: str | None = None

    @classmethod
    def of(
        cls,
        scale: float,
        dropout_p: float,
        dropout_seed: int | None,
        noise_seed: int | None,
        noise_scale: float,
        compute: str | None = None,
    ) -> LinearSpec:
        """The spec of validated arguments: no dropout at ``p == 0``, no noise at scale 0."""
        dropout = DropoutSpec(dropout_seed, dropout_p) if dropout_p > 0.0 else None
        noise = (
            NoiseSpec(noise_seed, noise_scale)
            if noise_seed is not None and noise_scale != 0.0
            else None
        )
        return cls(scale, dropout, noise, compute)


@dataclass(frozen=True)
class MergeSpec:
    """``W ← round(W − remove + coeff · B A + add)`` with rows counted from ``row_offset``.

    ``rounding`` is ``"nearest"`` or ``"stochastic"`` (:mod:`lorasc_kernels.formats.rounding`);
    stochastic rounding draws its bits from ``seed`` on
    :data:`~lorasc_kernels.noise.STREAM_ROUNDING`. ``remove`` / ``add`` are None when off.
    """

    coeff: float
    rounding: str
    seed: int
    remove: NoiseSpec | None = None
    add: NoiseSpec | None = None
    row_offset: int = 0

    @property
    def rounding_key(self) -> int:
        return noise_lib.stream_key(self.seed, noise_lib.STREAM_ROUNDING)

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"
