// Per-element formulas shared by the kernels and the host-side check: the merge, the
// fused weight noise and the LoRA-branch dropout, each in the reference's exact float32
// order (see lorasc_kernels/backends/reference.py).
#pragma once

#include "dtypes.cuh"
#include "random.cuh"
#include "rounding.cuh"

namespace lorasc {

// Whether the merge's factors, of type TL, have products that are exact in float32 with an
// unbounded exponent (both 16-bit: at most 22 significant bits): the rank step then rounds
// once (an FMA), as reference.lowrank_delta_fp32 does (docs/kernels.md, "Exactness").
template <typename TL>
constexpr bool exact_products() {
  return std::is_same<TL, c10::BFloat16>::value || std::is_same<TL, c10::Half>::value;
}

// One rank step of the merge's delta = sum_k B[i, k] * A[k, j], in order of k: rounded
// once with exact products, else the product and the sum rounded each.
template <bool kExactProducts>
LORASC_HD float lowrank_step(float delta, float b, float a) {
  return kExactProducts ? fma_rn(b, a, delta) : add_rn(delta, mul_rn(b, a));
}

// Scalars of one merge call; keys are noise.stream_key(seed, stream) from the host.
struct MergeParams {
  float coeff;
  bool remove_noise;
  uint32_t remove_key;
  float remove_scale;
  bool add_noise;
  uint32_t add_key;
  float add_scale;
  bool stochastic;
  uint32_t rounding_key;
};

// The three row hashes (noise removed, noise added, rounding bits) of one global row.
struct MergeRowHashes {
  uint32_t remove, add, rounding;
};

LORASC_HD MergeRowHashes merge_row_hashes(const MergeParams& p, uint32_t row) {
  return {row_hash(p.remove_key, row), row_hash(p.add_key, row), row_hash(p.rounding_key, row)};
}

// round(w - s_r * u_r + coeff * delta + s_a * u_a) for the element in global column `col`.
template <typename TW>
LORASC_HD TW merge_element(float w, float delta, const MergeRowHashes& rows, uint32_t col,
                           const MergeParams& p) {
  float v = w;
  if (p.remove_noise)
    v = sub_rn(v, mul_rn(p.remove_scale, uniform_centered(element_bits(rows.remove, col))));
  v = add_rn(v, mul_rn(p.coeff, delta));
  if (p.add_noise)
    v = add_rn(v, mul_rn(p.add_scale, uniform_centered(element_bits(rows.add, col))));
  const uint32_t bits = p.stochastic ? element_bits(rows.rounding, col) : 0u;
  return round_from_fp32<TW>(v, bits, p.stochastic);
}

// reference.noisy_weight for one element: round(float(w) + scale * u), `bits` its hash.
template <typename T>
LORASC_HD T noisy_element(T w, float scale, uint32_t bits) {
  return from_float<T>(add_rn(to_float(w), mul_rn(scale, uniform_centered(bits))));
}

// reference.apply_dropout for one element: kept values times inv_keep = 1 / (1 - p).
template <typename T>
LORASC_HD T dropout_element(T x, uint32_t threshold, float inv_keep, uint32_t bits) {
  return dropout_keep(bits, threshold) ? from_float<T>(mul_rn(to_float(x), inv_keep))
                                       : from_float<T>(0.0f);
}

}  // namespace lorasc
