// The counter-based hash of lorasc_kernels/noise.py, bit for bit (uint32, wrapping).
//
//   row_hash = mix32(row ^ key)            once per global row
//   bits     = mix32(row_hash ^ col)       once per element
//   uniform  = float32(bits >> 8) * 2^-24 - 0.5
//
// `key` is noise.stream_key(seed, stream), computed on the host. Rows and columns are
// global indices below 2^32.
#pragma once

#include "dtypes.cuh"

namespace lorasc {

// lowbias32 (C. Wellons).
LORASC_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

LORASC_HD uint32_t row_hash(uint32_t key, uint32_t row) { return mix32(row ^ key); }

LORASC_HD uint32_t element_bits(uint32_t row_hash_value, uint32_t col) {
  return mix32(row_hash_value ^ col);
}

// Uniform in [-0.5, 0.5); every step is exact in float32.
LORASC_HD float uniform_centered(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f - 0.5f;
}

// Dropout keep rule; threshold = reference.dropout_threshold(p) = int(p * 2^24).
LORASC_HD bool dropout_keep(uint32_t bits, uint32_t threshold) { return (bits >> 8) >= threshold; }

}  // namespace lorasc
