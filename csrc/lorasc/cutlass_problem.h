// Which GEMM kernel runs lowrank_gemm, and the arguments of the CUTLASS sm90 kernels, from
// tensors. Host only and free of CUTLASS headers: fused_linear.cu (the launch) and
// host_check.cpp (the CPU tests) share this exact logic.
//
// Shapes: p (M, K), q (N, K), u (M, r), v (N, r), bias (N,), out (M, N) contiguous.
// The CUTLASS kernels (csrc/cutlass_gemm_*.cu, lorasc/cutlass_gemm.cuh) compute
//   out = round(p qᵀ + C),  C = bias + scale · u vᵀ  in float32 (M, N),
// the main product by TMA + HGMMA in an fp32 accumulator, C added by the stock epilogue as
// its source (beta = 1), one rounding to p's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace lorasc {

// The GEMM kernels of lowrank_gemm: the WMMA kernel (any architecture, any strides, the
// load-time transforms) and the CUTLASS sm90a kernel with q K-major (forward: q = W) or
// N-major (dX: q = Wᵀ, a transposed view).
enum GemmKernel : int64_t { kGemmWmma = 0, kGemmCutlassKMajor = 1, kGemmCutlassNMajor = 2 };

// What the choice depends on besides the operands.
struct GemmTarget {
  int major = 0, minor = 0;  // compute capability of the device
  bool cutlass_built = false;  // the extension has the CUTLASS kernels (their headers were found)
  bool sm90a_code = false;     // the device runs their sm_90a code (TORCH_CUDA_ARCH_LIST has 9.0a)
  bool force_wmma = false;     // LORASC_CUDA_GEMM=wmma
};

// The kernel and, for the WMMA kernel, why the CUTLASS one does not run (a name the docs
// and tests use): forced_wmma, not_built, dtype, transform, shape_int32, p_layout,
// q_layout, n_alignment, not_sm90, no_sm90a_code.
struct GemmRoute {
  GemmKernel kernel;
  const char* reason;
};

// TMA: a global address and every stride but the unit one 16-byte aligned.
constexpr int64_t kTmaAlignBytes = 16;

inline bool tma_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kTmaAlignBytes == 0;
}

// Rows of t contiguous (unit stride along dim 1), row stride a multiple of 16 bytes.
inline bool tma_rows(const at::Tensor& t) {
  const int64_t vec = kTmaAlignBytes / t.element_size();
  return tma_aligned(t) && t.stride(1) == 1 && t.stride(0) % vec == 0 && t.stride(0) > 0;
}

// Columns of t contiguous (unit stride along dim 0), column stride a multiple of 16 bytes.
inline bool tma_columns(const at::Tensor& t) {
  const int64_t vec = kTmaAlignBytes / t.element_size();
  return tma_aligned(t) && t.stride(0) == 1 && t.stride(1) % vec == 0 && t.stride(1) > 0;
}

// The kernel for out = p (q ⊕ transforms)ᵀ + ... on checked operands (p, q 2-D, same dtype).
inline GemmRoute route_gemm(const at::Tensor& p, const at::Tensor& q, int64_t p_kind,
                            int64_t q_kind, const GemmTarget& target) {
  if (target.force_wmma) return {kGemmWmma, "forced_wmma"};
  if (!target.cutlass_built) return {kGemmWmma, "not_built"};
  const auto type = p.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return {kGemmWmma, "dtype"};
  if (p_kind != 0 || q_kind != 0) return {kGemmWmma, "transform"};
  const int64_t M = p.size(0), K = p.size(1), N = q.size(0);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  if (M > kIntMax || N > kIntMax || K > kIntMax) return {kGemmWmma, "shape_int32"};
  // CUTLASS's can_implement also asks the contiguous extents to be multiples of 8.
  const int64_t vec = kTmaAlignBytes / p.element_size();
  if (!tma_rows(p) || K % vec != 0) return {kGemmWmma, "p_layout"};
  GemmKernel kernel;
  if (tma_rows(q)) {
    kernel = kGemmCutlassKMajor;
  } else if (tma_columns(q)) {
    kernel = kGemmCutlassNMajor;
  } else {
    return {kGemmWmma, "q_layout"};
  }
  if (N % vec != 0) return {kGemmWmma, "n_alignment"};  // out's rows and C's rows
  if (target.major != 9 || target.minor != 0) return {kGemmWmma, "not_sm90"};
  if (!target.sm90a_code) return {kGemmWmma, "no_sm90a_code"};
  return {kernel, "cutlass"};
}

// The epilogue's source C (M, N) float32 contiguous: bias + scale · u vᵀ (fp32 GEMM of the
// upcast factors), bias alone broadcast, or zeros.
inline at::Tensor source_term(const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& u,
                              const std::optional<at::Tensor>& v, double scale, int64_t M,
                              int64_t N, const at::TensorOptions& like) {
  const auto options = like.dtype(at::kFloat);
  if (u) {
    const at::Tensor u32 = u->to(at::kFloat), v32 = v->to(at::kFloat);
    if (bias) return at::addmm(bias->to(at::kFloat), u32, v32.t(), 1.0, scale);
    return at::mm(u32, v32.t()).mul_(scale);
  }
  if (bias) return bias->to(at::kFloat).unsqueeze(0).expand({M, N}).contiguous();
  return at::zeros({M, N}, options);
}

// Arguments of the CUTLASS kernel (M, N, K), batch 1.
struct CutlassProblem {
  int M, N, K;
  const void* a;   // p: (m, k) at a[m * lda + k]
  int64_t lda;
  const void* b;   // q: (n, k) at b[n * ldb + k] (K-major) or b[n + k * ldb] (N-major)
  int64_t ldb;
  bool b_n_major;
  const float* c;  // source (m, n) at c[m * ldc + n]
  int64_t ldc;
  void* d;         // out (m, n) at d[m * ldd + n]
  int64_t ldd;
};

// The problem for `route` (a CUTLASS kernel) on the operands; `source` from source_term.
inline CutlassProblem make_cutlass_problem(const at::Tensor& p, const at::Tensor& q,
                                           const at::Tensor& source, at::Tensor& out,
                                           GemmKernel kernel) {
  TORCH_CHECK(kernel == kGemmCutlassKMajor || kernel == kGemmCutlassNMajor,
              "not a CUTLASS kernel: ", static_cast<int64_t>(kernel));
  const bool n_major = kernel == kGemmCutlassNMajor;
  TORCH_CHECK(source.scalar_type() == at::kFloat && source.is_contiguous() &&
                  source.size(0) == p.size(0) && source.size(1) == q.size(0),
              "the source term must be float32 (M, N) contiguous");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  return {static_cast<int>(p.size(0)),
          static_cast<int>(q.size(0)),
          static_cast<int>(p.size(1)),
          p.data_ptr(),
          p.stride(0),
          q.data_ptr(),
          n_major ? q.stride(1) : q.stride(0),
          n_major,
          source.data_ptr<float>(),
          source.stride(0),
          out.data_ptr(),
          out.stride(0)};
}

}  // namespace lorasc
