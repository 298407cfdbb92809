// Host-side argument checks of the CUDA ops; each message names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "weight_types.h"

namespace lorasc {

inline void check_cuda_weight_type(const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dims, name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(is_weight_type(t.scalar_type()), name, " has dtype ", t.scalar_type(),
              ", which the kernels do not take (csrc/lorasc/weight_types.h)");
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
