// Kernel arguments from tensors, shared by the CUDA launchers (fused_linear.cu, merge.cu)
// and the host emulation (host_check.cpp). Host only.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "gemm_tile.cuh"
#include "merge_tile.cuh"

namespace lorasc {

inline Transform make_transform(const char* name, int64_t kind, int64_t key, int64_t threshold,
                                double value, bool swap) {
  TORCH_CHECK(kind == kTransformNone || kind == kTransformNoise || kind == kTransformDropout,
              name, "_kind must be 0 (none), 1 (noise) or 2 (dropout), got ", kind);
  if (kind == kTransformNone) return {kind, 0u, 0u, 0.0f, false};
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24), name,
              "_threshold must be in [0, 2**24], got ", threshold);
  return {kind, check_key(name, key), static_cast<uint32_t>(threshold),
          static_cast<float>(value), swap};
}

// The operand's layout: vectors along the depth or the rows where strides and alignment
// allow, else element by element.
inline Operand make_operand(const at::Tensor& t, Transform transform) {
  const int64_t vec = 16 / t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  const int64_t stride_row = t.stride(0), stride_depth = t.stride(1);
  int layout = kScalar;
  if (aligned && stride_depth == 1 && stride_row % vec == 0) {
    layout = kDepthContiguous;
  } else if (aligned && stride_row == 1 && stride_depth % vec == 0) {
    layout = kRowContiguous;
  }
  return {t.data_ptr(), t.size(0), t.size(1), stride_row, stride_depth, layout, transform};
}

// Arguments of out = p·qᵀ (+ bias) + scale·u·vᵀ on shape-checked tensors, for storage type T.
template <typename T>
GemmArgs make_gemm_args(const at::Tensor& p, const at::Tensor& q,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v, double scale, Transform p_transform,
                        Transform q_transform, at::Tensor& out) {
  const Transform none{kTransformNone, 0u, 0u, 0.0f, false};
  const int64_t rank = u ? u->size(1) : 0;
  constexpr int64_t kDepth = Slice<T>::kDepth;
  return {make_operand(p, p_transform),
          make_operand(q, q_transform),
          u ? make_operand(*u, none) : Operand{},
          v ? make_operand(*v, none) : Operand{},
          bias ? bias->data_ptr() : nullptr,
          out.data_ptr(),
          p.size(0),
          q.size(0),
          static_cast<float>(scale),
          static_cast<int>((rank + kDepth - 1) / kDepth),
          static_cast<int>((p.size(1) + kDepth - 1) / kDepth)};
}

// Merge arguments; keys < 0 mean "no noise", scalars are rounded to float32 once.
inline MergeArgs make_merge_args(at::Tensor& weight, const at::Tensor& lora_B,
                                 const at::Tensor& lora_A, double coeff, bool stochastic,
                                 int64_t rounding_key, int64_t remove_key, double remove_scale,
                                 int64_t add_key, double add_scale, int64_t row_offset) {
  const bool remove = remove_key >= 0, add = add_key >= 0;
  const MergeParams params{static_cast<float>(coeff),
                           remove,
                           remove ? check_key("remove_key", remove_key) : 0u,
                           static_cast<float>(remove_scale),
                           add,
                           add ? check_key("add_key", add_key) : 0u,
                           static_cast<float>(add_scale),
                           stochastic,
                           check_key("rounding_key", rounding_key)};
  const int64_t vec = 16 / weight.element_size();
  const bool vectorized = weight.stride(1) == 1 && weight.stride(0) % vec == 0 &&
                          reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
  return {weight.data_ptr(), weight.size(0),    weight.size(1),    weight.stride(0),
          weight.stride(1),  vectorized,        lora_B.data_ptr(), lora_B.stride(0),
          lora_B.stride(1),  lora_A.data_ptr(), lora_A.stride(0),  lora_A.stride(1),
          lora_A.size(0),    row_offset,        params};
}

}  // namespace lorasc
