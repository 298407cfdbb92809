"""The counter-based hash of :mod:`lorasc_kernels.noise` as Triton device functions.

Bit-identical to the torch reference: all arithmetic is on ``tl.uint32`` and wraps.
Kernels receive the 32-bit ``key = noise.stream_key(seed, stream)`` from the host.
"""

import triton
import triton.language as tl

_MUL1 = tl.constexpr(0x7FEB352D)
_MUL2 = tl.constexpr(0x846CA68B)


@triton.jit
def mix32(x):
    """lowbias32 on a uint32 tensor."""
    x = x ^ (x >> 16)
    x = x * tl.full((), _MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _MUL2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def row_hash(key, rows):
    """``mix32(row ^ key)`` for global row indices ``rows`` (any int tensor)."""
    return mix32(rows.to(tl.uint32) ^ key.to(tl.uint32))


@triton.jit
def element_bits(row_hashes, cols):
    """``mix32(row_hash ^ col)``: the 32 random bits of each element (broadcasts)."""
    return mix32(row_hashes ^ cols.to(tl.uint32))


@triton.jit
def uniform_centered(bits):
    """``float32(bits >> 8) * 2**-24 - 0.5``: uniform in [-0.5, 0.5), exact."""
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08 - 0.5
