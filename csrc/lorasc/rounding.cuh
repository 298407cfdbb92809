// float32 -> storage type, round-to-nearest or stochastic, as lorasc_kernels/formats/rounding.py.
//
// Stochastic: add the top `drop` random bits (bits >> (32 - drop)) to the float32 pattern,
// clear the low `drop` bits, convert (exact for bf16; for fp16 exact above 2^-14, and
// round-to-nearest on fp16 subnormals). drop = WeightTraits<T>::kDroppedBits (weight_types.h):
// 16 for bf16, 13 for fp16, 0 for float32.
// Non-finite values pass through unchanged.
#pragma once

#include "dtypes.cuh"
#include "weight_types.h"

namespace lorasc {

// `value` with `drop` low mantissa bits replaced by a random carry from `bits`.
LORASC_HD float truncate_with_random_carry(float value, uint32_t bits, int drop) {
  const uint32_t pattern = float_bits(value);
  if ((pattern & 0x7F800000u) == 0x7F800000u) return value;  // inf or NaN
  const uint32_t mask = ~((1u << drop) - 1u);
  return bits_float((pattern + (bits >> (32 - drop))) & mask);
}

template <typename T>
LORASC_HD T round_from_fp32(float value, uint32_t bits, bool stochastic) {
  constexpr int drop = WeightTraits<T>::kDroppedBits;
  if constexpr (drop > 0) {
    if (stochastic) value = truncate_with_random_carry(value, bits, drop);
  }
  return from_float<T>(value);
}

}  // namespace lorasc
