"""Counter-based random numbers shared bit for bit by every backend.

Every random quantity in the package (the cascade noise on ``W``, the random bits of
stochastic rounding, the dropout mask of the LoRA branch) comes from one pure-integer
function of ``(seed, stream, row, col)``. The torch code here is the reference; the
Triton kernels and ``csrc/lorasc/random.cuh`` implement the same formula, so any backend
can regenerate what another one drew, and tests compare them bit for bit.

The formula (all arithmetic on unsigned 32-bit integers, wrapping)::

    mix32(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key       = mix32(mix32(seed_hi ^ mix32(stream + 1)) ^ seed_lo)      # on the host
    row_hash  = mix32(row ^ key)                                          # once per row
    bits      = mix32(row_hash ^ col)                                     # once per element
    uniform   = float32(bits >> 8) * 2**-24 - 0.5                         # in [-0.5, 0.5)

``mix32`` is the "lowbias32" integer hash (C. Wellons), a bijection with full
avalanche. ``seed`` is any integer in ``[0, 2**64)`` (``seed_lo``/``seed_hi`` are its low
and high 32 bits), ``row``/``col`` are *global* indices below ``2**32``: a block of rows
starting at ``row_offset`` draws exactly the rows of the whole matrix. ``uniform`` has 24
bits of resolution and is computed exactly in float32 (every step is exact), so there is
nothing for a compiler to reorder. The mean is ``-2**-25``, far below any use here.

Streams keep the uses independent: :data:`STREAM_NOISE` for the cascade noise,
:data:`STREAM_ROUNDING` for stochastic rounding bits, :data:`STREAM_DROPOUT` for the
dropout mask.
"""

from __future__ import annotations

import torch

__all__ = [
    "STREAM_NOISE",
    "STREAM_ROUNDING",
    "STREAM_DROPOUT",
    "MASK32",
    "mix32_int",
    "mix32",
    "stream_key",
    "hash_bits",
    "uniform_from_bits",
    "noise",
]

STREAM_NOISE = 0
STREAM_ROUNDING = 1
STREAM_DROPOUT = 2

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_INV_2_24 = 2.0**-24


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (host side: seeds and keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _MUL1) & MASK32
    x ^= x >> 15
    x = (x * _MUL2) & MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of ``(seed, stream)``; kernels receive this instead of the seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    seed_lo, seed_hi = seed & MASK32, seed >> 32
    return mix32_int(mix32_int(seed_hi ^ mix32_int(stream + 1)) ^ seed_lo)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 tensors holding uint32 values.

    Split in 16-bit halves so no intermediate exceeds 2**48 (int64 never overflows).
    """
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor holding uint32 values (element-wise)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def hash_bits(
    key: int, rows: int, cols: int, row_offset: int = 0, col_offset: int = 0, device=None
) -> torch.Tensor:
    """The raw 32-bit ``bits`` of the formula for a ``rows × cols`` block, as int64.

    Element ``[i, j]`` is ``bits(key, row_offset + i, col_offset + j)``.
    """
    row = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    col = torch.arange(col_offset, col_offset + cols, dtype=torch.int64, device=device)
    row_hash = mix32(row ^ key)
    return mix32(row_hash[:, None] ^ col[None, :])


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """``float32(bits >> 8) * 2**-24 - 0.5``: uniform in [-0.5, 0.5), exact in float32."""
    return (bits >> 8).to(torch.float32) * _INV_2_24 - 0.5


def noise(
    seed: int,
    rows: int,
    cols: int,
    row_offset: int = 0,
    device=None,
    stream: int = STREAM_NOISE,
) -> torch.Tensor:
    """Uniform noise in [-0.5, 0.5), float32, shape ``(rows, cols)``.

    Args:
        seed: any int in ``[0, 2**64)``.
        rows, cols: block shape; ``row_offset`` is the global index of its first row.
        stream: which independent stream (:data:`STREAM_NOISE` by default).
    """
    for name, value in (("rows", rows), ("cols", cols), ("row_offset", row_offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if row_offset + rows > 2**32 or cols > 2**32:
        raise ValueError("row and column indices must stay below 2**32")
    bits = hash_bits(stream_key(seed, stream), rows, cols, row_offset, device=device)
    return uniform_from_bits(bits)
