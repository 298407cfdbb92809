// Host-side argument checks of the CUDA ops; each message names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace lorasc {

inline void check_cuda_float(const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dims, name, " must be ", dims, "-D, got shape ", t.sizes());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", type);
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& first) {
  TORCH_CHECK(t.device() == first.device(), name, " is on ", t.device(), " but the other tensors on ",
              first.device());
}

inline uint32_t check_key(const char* name, int64_t key) {
  TORCH_CHECK(key >= 0 && key < (int64_t(1) << 32), name, " must be in [0, 2**32), got ", key);
  return static_cast<uint32_t>(key);
}

}  // namespace lorasc
