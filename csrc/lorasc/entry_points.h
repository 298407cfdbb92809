// Host entry points of the CUDA kernels (csrc/*.cu), registered as torch.ops.lorasc_cuda.* in
// bindings.cpp.
//
// Keys are noise.stream_key(...) values (uint32 in int64); scalars arrive as double and
// are rounded to float32 once, as the reference does.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lorasc {

// out (M, N) = p (M, K) · q (N, K)ᵀ + bias + scale · u (M, r) · v (N, r)ᵀ, fp32 accumulation,
// one rounding to p's dtype. Any strides (bias contiguous). Each of p and q may carry a
// transform keyed by (row, col) of the operand, or by (col, row) with *_swap (a transposed
// view of a weight); *_kind: 0 none, 1 noise (value = scale), 2 dropout
// (value = 1 / (1 - p)); see lorasc/gemm_tile.cuh.
at::Tensor lowrank_gemm(const at::Tensor& p, const at::Tensor& q,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v, double scale, int64_t p_kind,
                        int64_t p_key, int64_t p_threshold, double p_value, bool p_swap,
                        int64_t q_kind, int64_t q_key, int64_t q_threshold, double q_value,
                        bool q_swap);

// Which kernel lowrank_gemm runs for these operands on their device (lorasc/cutlass_problem.h:
// 0 WMMA, 1 CUTLASS with q K-major, 2 CUTLASS with q N-major).
int64_t lowrank_gemm_route(const at::Tensor& p, const at::Tensor& q, int64_t p_kind,
                           int64_t q_kind);

// reference.apply_dropout on a 2-D tensor: kept iff (bits >> 8) >= threshold, times inv_keep.
at::Tensor dropout(const at::Tensor& x, int64_t key, int64_t threshold, double inv_keep);

// reference.merge_lowrank_ in place; remove_key / add_key < 0 mean no noise.
void merge_lowrank_(at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A,
                    double coeff, bool stochastic, int64_t rounding_key, int64_t remove_key,
                    double remove_scale, int64_t add_key, double add_scale, int64_t row_offset);

}  // namespace lorasc
