// Fused low-rank GEMM  out = P·Qᵀ (+ bias) + s·U·Vᵀ  and the LoRA-branch dropout kernel.
//
// Shapes: P (M, K), Q (N, K), U (M, r), V (N, r), bias (N,), out (M, N) contiguous.
// Forward: P = x, Q = W, U = drop(x)·Aᵀ, V = B. Backward: dX = dY·W + (s·dY·B)·A is the same
// kernel with Q = Wᵀ and V = Aᵀ read through strides (no copies).
//
// Which kernel runs: lorasc/cutlass_problem.h's route_gemm. On compute capability 9.0 with
// an sm_90a build, fp16/bf16 operands without load-time transforms and TMA-aligned
// layouts run the CUTLASS sm90 kernels (lorasc/cutlass_gemm.cuh: out = round(P·Qᵀ + C),
// C = bias + s·U·Vᵀ in fp32 as the epilogue's source); everything else runs the WMMA
// kernel below.
//
// The WMMA kernel: our own tiled kernel (a small translation unit). A CTA of 256 threads owns a 128×128 output tile and walks the
// reduction in slices of kDepth, staged global → registers → shared memory with double
// buffering (one __syncthreads per slice; the next slice's global loads overlap the
// current slice's math). 16-bit types multiply with WMMA 16×16×16 and fp32 accumulators;
// float32 uses CUDA-core FMAs (exact fp32, no tf32).
// The rank-r term runs first: the slices of U/V come before those of P/Q in one reduction
// and the accumulator is multiplied by s after the last U/V slice, so s·U·Vᵀ lands in the
// same fp32 accumulator with no extra pass over out.
// Each loaded element may be transformed on its way to shared memory: the fused cascade
// noise (W + scale·u, reference.noisy_weight) or dropout (reference.apply_dropout), keyed
// by the element's (row, col) in the operand, or (col, row) for a transposed weight view.
// The loads, stores, slice schedule and output writes live in lorasc/gemm_tile.cuh (the
// CPU tests emulate a CTA with them); this file holds the multiply and the launch.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "lorasc/checks.h"
#include "lorasc/cutlass_problem.h"
#include "lorasc/weight_types.h"
#include "lorasc/gemm_tile.cuh"
#include "lorasc/launch_args.h"
#include "lorasc/entry_points.h"
#ifdef LORASC_WITH_CUTLASS
#include "lorasc/cutlass_gemm.h"
#endif

namespace lorasc {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = kGemmThreads;

template <typename T>
struct Native;  // the cuda_fp16 / cuda_bf16 type WMMA takes
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// 16-bit operands: 8 warps as 2 × 4, each owning 64 × 32 of the tile in 4 × 2 WMMA
// fragments with fp32 accumulators.
template <typename T>
struct WmmaAccumulator {
  using N = typename Native<T>::type;
  static constexpr int kScratchLd = 20;  // per-warp 16 × 16 fp32 staging of the epilogue
  static constexpr int kScratchBytes = (kThreads / 32) * 16 * kScratchLd * sizeof(float);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];

  __device__ __forceinline__ int warp_row() const { return (threadIdx.x / 32) / 4 * 64; }
  __device__ __forceinline__ int warp_col() const { return (threadIdx.x / 32) % 4 * 32; }

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void scale(float s) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] *= s;
  }

  // acc += P_tile · Q_tileᵀ over one slice (tiles are [row][depth], row length kLd).
  __device__ __forceinline__ void multiply(const T* p_tile, const T* q_tile) {
    constexpr int kLd = Slice<T>::kLd;
    const N* p = reinterpret_cast<const N*>(p_tile) + warp_row() * kLd;
    const N* q = reinterpret_cast<const N*>(q_tile) + warp_col() * kLd;
#pragma unroll
    for (int k = 0; k < Slice<T>::kDepth; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, N, wmma::row_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, N, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(a[i], p + i * 16 * kLd + k, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], q + j * 16 * kLd + k, kLd);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  // Hands the results to write(row, col, values, count) in runs of 8 per lane, through a
  // per-warp fp32 scratch in shared memory (fragment layouts are opaque).
  template <typename Write>
  __device__ __forceinline__ void store(float* scratch, Write write) {
    const int lane = threadIdx.x % 32, row = lane / 2, col = (lane % 2) * 8;
    float* mine = scratch + (threadIdx.x / 32) * 16 * kScratchLd;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(mine, acc[i][j], kScratchLd, wmma::mem_row_major);
        __syncwarp();
        write(warp_row() + i * 16 + row, warp_col() + j * 16 + col, mine + row * kScratchLd + col,
              8);
        __syncwarp();
      }
  }
};

// float32 operands: each thread owns an 8 × 8 grid of outputs (rows ty + 16 i, columns
// tx + 16 j) and multiplies with FMAs.
struct FmaAccumulator {
  static constexpr int kScratchBytes = 0;
  float acc[8][8];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void scale(float s) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] *= s;
  }

  __device__ __forceinline__ void multiply(const float* p_tile, const float* q_tile) {
    constexpr int kLd = Slice<float>::kLd;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int k = 0; k < Slice<float>::kDepth; ++k) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = p_tile[(ty + 16 * i) * kLd + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = q_tile[(tx + 16 * j) * kLd + k];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <typename Write>
  __device__ __forceinline__ void store(float*, Write write) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) write(ty + 16 * i, tx + 16 * j, &acc[i][j], 1);
  }
};

template <typename T>
using AccumulatorFor =
    std::conditional_t<std::is_same_v<T, float>, FmaAccumulator, WmmaAccumulator<T>>;

// Grid: x over M tiles, y over N tiles.
template <typename T>
__global__ void __launch_bounds__(kThreads) lowrank_gemm_kernel(const GemmArgs args) {
  using S = Slice<T>;
  using Accumulator = AccumulatorFor<T>;
  constexpr int kBufferBytes = 2 * 2 * S::kOperandElems * sizeof(T);  // 2 stages × (P, Q)
  static_assert(Accumulator::kScratchBytes <= kBufferBytes, "epilogue scratch must fit");
  __shared__ __align__(128) unsigned char smem[kBufferBytes];
  T* const buffers = reinterpret_cast<T*>(smem);
  auto stage_tiles = [&](int slice) { return buffers + (slice & 1) * 2 * S::kOperandElems; };

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kGemmTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int slices = args.rank_slices + args.main_slices;
  Vec16 left[S::kLoads], right[S::kLoads];

  Accumulator acc;
  acc.clear();
  load_operands<T>(args, 0, row0, col0, threadIdx.x, left, right);
  store_operands<T>(args, 0, threadIdx.x, left, right, stage_tiles(0));
  __syncthreads();
  for (int slice = 0; slice < slices; ++slice) {
    const bool more = slice + 1 < slices;
    if (more) load_operands<T>(args, slice + 1, row0, col0, threadIdx.x, left, right);
    const T* tiles = stage_tiles(slice);
    acc.multiply(tiles, tiles + S::kOperandElems);
    if (slice + 1 == args.rank_slices) acc.scale(args.scale);
    if (more) {
      store_operands<T>(args, slice + 1, threadIdx.x, left, right, stage_tiles(slice + 1));
    }
    __syncthreads();
  }
  // The loop ended with __syncthreads: the buffers are free for the epilogue's scratch.
  acc.store(reinterpret_cast<float*>(smem), [&](int row, int col, const float* values, int n) {
    write_run<T>(args, row0 + row, col0 + col, values, n);
  });
}

template <typename T>
__global__ void dropout_kernel(const T* x, T* out, int64_t rows, int64_t cols, uint32_t key,
                               uint32_t threshold, float inv_keep) {
  const int64_t count = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t row = static_cast<uint32_t>(i / cols), col = static_cast<uint32_t>(i % cols);
    out[i] = dropout_element(x[i], threshold, inv_keep, element_bits(row_hash(key, row), col));
  }
}

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& p, int64_t rows,
                   int64_t depth) {
  check_cuda_weight_type(name, t, 2);
  check_same_device(name, t, p);
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), name, " must have p's dtype ", p.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == rows && (depth < 0 || t.size(1) == depth), name, " has shape ",
              t.sizes(), ", expected (", rows, ", ", depth < 0 ? "r" : std::to_string(depth), ")");
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

#ifdef LORASC_WITH_CUTLASS
constexpr bool kCutlassBuilt = true;
#else
constexpr bool kCutlassBuilt = false;
#endif

// The device, the build and LORASC_CUDA_GEMM (wmma: never the CUTLASS kernels), for route_gemm.
int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

GemmTarget gemm_target(const at::Tensor& p) {
  GemmTarget target;
  target.major = device_attribute(cudaDevAttrComputeCapabilityMajor, p.get_device());
  target.minor = device_attribute(cudaDevAttrComputeCapabilityMinor, p.get_device());
  target.cutlass_built = kCutlassBuilt;
  const char* choice = std::getenv("LORASC_CUDA_GEMM");
  target.force_wmma = choice != nullptr && std::string(choice) == "wmma";
#ifdef LORASC_WITH_CUTLASS
  target.sm90a_code = target.major == 9 && target.minor == 0 && runs_sm90a_code(p.get_device());
#endif
  return target;
}

// out = round(p qᵀ + bias + scale · u vᵀ) by the CUTLASS kernel `kernel`; false when
// CUTLASS's can_implement refuses the problem (nothing launched).
bool launch_cutlass(GemmKernel kernel, const at::Tensor& p, const at::Tensor& q,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& u,
                    const std::optional<at::Tensor>& v, double scale, at::Tensor& out) {
#ifdef LORASC_WITH_CUTLASS
  const at::Tensor source = source_term(bias, u, v, scale, out.size(0), out.size(1), p.options());
  const CutlassProblem problem = make_cutlass_problem(p, q, source, out, kernel);
  const int device = p.get_device();
  const int sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool n_major = kernel == kGemmCutlassNMajor;
  if (p.scalar_type() == at::kHalf) {
    return n_major ? run_cutlass_gemm<c10::Half, true>(problem, device, sm_count, stream)
                   : run_cutlass_gemm<c10::Half, false>(problem, device, sm_count, stream);
  }
  return n_major ? run_cutlass_gemm<c10::BFloat16, true>(problem, device, sm_count, stream)
                 : run_cutlass_gemm<c10::BFloat16, false>(problem, device, sm_count, stream);
#else
  return false;
#endif
}

}  // namespace

at::Tensor lowrank_gemm(const at::Tensor& p, const at::Tensor& q,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v, double scale, int64_t p_kind,
                        int64_t p_key, int64_t p_threshold, double p_value, bool p_swap,
                        int64_t q_kind, int64_t q_key, int64_t q_threshold, double q_value,
                        bool q_swap) {
  check_cuda_weight_type("p", p, 2);
  const int64_t M = p.size(0), K = p.size(1);
  TORCH_CHECK(K > 0, "p must have at least one column, got shape ", p.sizes());
  check_operand("q", q, p, q.size(0), K);
  const int64_t N = q.size(0);
  if (bias) {
    check_cuda_weight_type("bias", *bias, 1);
    check_same_device("bias", *bias, p);
    TORCH_CHECK(bias->scalar_type() == p.scalar_type() && bias->size(0) == N,
                "bias must be (N,) = (", N, ",) in p's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous, got strides ", bias->strides());
  }
  TORCH_CHECK(u.has_value() == v.has_value(), "u and v must be given together");
  int64_t rank = 0;
  if (u) {
    check_operand("u", *u, p, M, -1);
    rank = u->size(1);
    TORCH_CHECK(rank > 0, "u must have r >= 1 columns, got shape ", u->sizes());
    check_operand("v", *v, p, N, rank);
  }
  TORCH_CHECK(ceil_div(N, kGemmTile) <= 65535, "q has too many rows: N=", N);

  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor out = at::empty({M, N}, p.options());
  if (M == 0 || N == 0) return out;
  const Transform p_transform = make_transform("p", p_kind, p_key, p_threshold, p_value, p_swap);
  const Transform q_transform = make_transform("q", q_kind, q_key, q_threshold, q_value, q_swap);
  const GemmRoute route = route_gemm(p, q, p_kind, q_kind, gemm_target(p));
  if (route.kernel != kGemmWmma) {
    if (launch_cutlass(route.kernel, p, q, bias, u, v, scale, out)) return out;
    TORCH_WARN_ONCE("lowrank_gemm: CUTLASS refused a problem its route accepted (M=", M,
                    ", N=", N, ", K=", K, "); running the WMMA kernel");
  }
  const dim3 grid(ceil_div(M, kGemmTile), ceil_div(N, kGemmTile));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_WEIGHT_TYPES(p.scalar_type(), "p", [&] {
    const GemmArgs args =
        make_gemm_args<scalar_t>(p, q, bias, u, v, scale, p_transform, q_transform, out);
    lowrank_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

int64_t lowrank_gemm_route(const at::Tensor& p, const at::Tensor& q, int64_t p_kind,
                           int64_t q_kind) {
  check_cuda_weight_type("p", p, 2);
  check_operand("q", q, p, q.size(0), p.size(1));
  const c10::cuda::CUDAGuard guard(p.device());
  return route_gemm(p, q, p_kind, q_kind, gemm_target(p)).kernel;
}

at::Tensor dropout(const at::Tensor& x, int64_t key, int64_t threshold, double inv_keep) {
  check_cuda_weight_type("x", x, 2);
  const Transform t = make_transform("dropout", kTransformDropout, key, threshold, inv_keep, false);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t count = input.numel();
  if (count == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_WEIGHT_TYPES(x.scalar_type(), "x", [&] {
    dropout_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
        input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), input.size(0), input.size(1), t.key,
        t.threshold, t.value);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace lorasc
