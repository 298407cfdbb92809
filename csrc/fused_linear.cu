// Fused low-rank GEMM  out = P·Qᵀ (+ bias) + s·U·Vᵀ  and the LoRA-branch dropout kernel.
//
// Shapes: P (M, K), Q (N, K), U (M, r), V (N, r), bias (N,), out (M, N) contiguous.
// Forward: P = x, Q = W, U = drop(x)·Aᵀ, V = B. Backward: dX = dY·W + (s·dY·B)·A is the same
// kernel with Q = Wᵀ and V = Aᵀ read through strides (no copies).
//
// Main loop: our own tiled kernel (no CUTLASS; a small translation unit that builds in
// minutes on two cores). A CTA of 256 threads owns a 128×128 output tile and walks the
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
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "lorasc/checks.h"
#include "lorasc/dispatch.h"
#include "lorasc/elementwise.cuh"
#include "lorasc/ops.h"

namespace lorasc {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kTile = 128;  // output tile: kTile rows of P × kTile rows of Q

// Per storage type T: reduction depth of a slice, elements per 16-byte vector, padded
// shared-memory row length (against bank conflicts), 16-byte vectors per thread per operand.
template <typename T>
struct Slice {
  static constexpr int kDepth = sizeof(T) == 2 ? 32 : 16;
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kLd = kDepth + kVec;
  static constexpr int kLoads = kTile * kDepth / (kVec * kThreads);
  static constexpr int kOperandElems = kTile * kLd;  // one operand's slice in shared memory
};

// How a loader reads an operand: 16-byte vectors along the depth, along the rows, or
// element by element (any strides).
enum Layout : int { kScalar = 0, kDepthContiguous = 1, kRowContiguous = 2 };

struct Transform {
  int64_t kind;  // TransformKind
  uint32_t key;
  uint32_t threshold;  // dropout
  float value;         // noise scale, or dropout's 1 / (1 - p)
  bool swap;           // key the hash by (col, row)
};

// A 2-D operand (rows, depth) read through strides.
struct Operand {
  const void* data;
  int64_t rows, depth, stride_row, stride_depth;
  int layout;
  Transform transform;
};

struct GemmArgs {
  Operand p, q, u, v;  // u, v unused when rank_slices == 0
  const void* bias;    // (N,) or null
  void* out;           // (M, N) contiguous
  int64_t M, N;
  float scale;
  int rank_slices, main_slices;
};

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

template <typename T>
__device__ __forceinline__ T& element(uint4& vector, int e) {
  return reinterpret_cast<T*>(&vector)[e];
}

// Where this thread's load `l` sits in the slice: first element and the step between the
// vector's elements, in (row, depth) of the tile.
template <typename T>
struct VectorSlot {
  int row, depth, row_step, depth_step;

  __device__ __forceinline__ VectorSlot(int layout, int l) {
    using S = Slice<T>;
    const int v = threadIdx.x + l * kThreads;
    if (layout == kRowContiguous) {
      // Depth fastest across threads: the transposed stores to shared memory of a warp
      // hit consecutive addresses (no bank conflicts).
      row = (v / S::kDepth) * S::kVec;
      depth = v % S::kDepth;
      row_step = 1;
      depth_step = 0;
    } else {
      row = v / (S::kDepth / S::kVec);
      depth = (v % (S::kDepth / S::kVec)) * S::kVec;
      row_step = 0;
      depth_step = 1;
    }
  }
};

template <typename T>
__device__ __forceinline__ T transformed(T value, const Transform& t, int64_t row, int64_t col) {
  const uint32_t hash_row = static_cast<uint32_t>(t.swap ? col : row);
  const uint32_t hash_col = static_cast<uint32_t>(t.swap ? row : col);
  const uint32_t bits = element_bits(row_hash(t.key, hash_row), hash_col);
  return t.kind == kTransformNoise ? noisy_element(value, t.value, bits)
                                   : dropout_element(value, t.threshold, t.value, bits);
}

// Loads rows [row0, row0 + kTile) × depth [depth0, depth0 + kDepth) of `op` into registers;
// out-of-range elements are zero (masked tails), in-range ones transformed.
template <typename T>
__device__ __forceinline__ void load_slice(const Operand& op, int64_t row0, int64_t depth0,
                                           uint4 (&stage)[Slice<T>::kLoads]) {
  using S = Slice<T>;
  const T* data = static_cast<const T*>(op.data);
#pragma unroll
  for (int l = 0; l < S::kLoads; ++l) {
    const VectorSlot<T> slot(op.layout, l);
    const int64_t row = row0 + slot.row, depth = depth0 + slot.depth;
    const int64_t last_row = row + slot.row_step * (S::kVec - 1);
    const int64_t last_depth = depth + slot.depth_step * (S::kVec - 1);
    if (op.layout != kScalar && last_row < op.rows && last_depth < op.depth) {
      stage[l] = *reinterpret_cast<const uint4*>(data + row * op.stride_row +
                                                 depth * op.stride_depth);
    } else {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e) {
        const int64_t r = row + e * slot.row_step, d = depth + e * slot.depth_step;
        element<T>(stage[l], e) =
            r < op.rows && d < op.depth ? data[r * op.stride_row + d * op.stride_depth] : T(0.0f);
      }
    }
    if (op.transform.kind != kTransformNone) {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e) {
        const int64_t r = row + e * slot.row_step, d = depth + e * slot.depth_step;
        if (r < op.rows && d < op.depth)
          element<T>(stage[l], e) = transformed(element<T>(stage[l], e), op.transform, r, d);
      }
    }
  }
}

// Writes the staged slice into shared memory as tile[row][depth] (row length kLd).
template <typename T>
__device__ __forceinline__ void store_slice(int layout, uint4 (&stage)[Slice<T>::kLoads],
                                            T* tile) {
  using S = Slice<T>;
#pragma unroll
  for (int l = 0; l < S::kLoads; ++l) {
    const VectorSlot<T> slot(layout, l);
    if (layout == kRowContiguous) {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e)
        tile[(slot.row + e) * S::kLd + slot.depth] = element<T>(stage[l], e);
    } else {
      *reinterpret_cast<uint4*>(tile + slot.row * S::kLd + slot.depth) = stage[l];
    }
  }
}

// Writes `count` consecutive fp32 results (+ bias) of output row `row` from column `col`.
template <typename T>
__device__ __forceinline__ void write_run(const GemmArgs& args, int64_t row, int64_t col,
                                          const float* values, int count) {
  if (row >= args.M) return;
  constexpr int kVec = Slice<T>::kVec;
  T* out = static_cast<T*>(args.out) + row * args.N;
  const T* bias = static_cast<const T*>(args.bias);
  auto result = [&](int t) {
    return from_float<T>(bias ? values[t] + to_float(bias[col + t]) : values[t]);
  };
  if (count == kVec && col + kVec <= args.N && args.N % kVec == 0) {
    uint4 packed;
#pragma unroll
    for (int t = 0; t < kVec; ++t) element<T>(packed, t) = result(t);
    *reinterpret_cast<uint4*>(out + col) = packed;
  } else {
    for (int t = 0; t < count && col + t < args.N; ++t) out[col + t] = result(t);
  }
}

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

// Grid: x over M tiles, y over N tiles. Slices [0, rank_slices) read U/V, the rest P/Q.
template <typename T>
__global__ void __launch_bounds__(kThreads) lowrank_gemm_kernel(const GemmArgs args) {
  using S = Slice<T>;
  using Accumulator = AccumulatorFor<T>;
  constexpr int kBufferBytes = 2 * 2 * S::kOperandElems * sizeof(T);  // 2 stages × (P, Q)
  static_assert(Accumulator::kScratchBytes <= kBufferBytes, "epilogue scratch must fit");
  __shared__ __align__(128) unsigned char smem[kBufferBytes];
  T* const buffers = reinterpret_cast<T*>(smem);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int slices = args.rank_slices + args.main_slices;
  uint4 stage_p[S::kLoads], stage_q[S::kLoads];

  // Branches instead of operand references: the kernel parameters stay in constant space.
  auto load = [&](int slice) {
    if (slice < args.rank_slices) {
      const int64_t depth0 = static_cast<int64_t>(slice) * S::kDepth;
      load_slice<T>(args.u, row0, depth0, stage_p);
      load_slice<T>(args.v, col0, depth0, stage_q);
    } else {
      const int64_t depth0 = static_cast<int64_t>(slice - args.rank_slices) * S::kDepth;
      load_slice<T>(args.p, row0, depth0, stage_p);
      load_slice<T>(args.q, col0, depth0, stage_q);
    }
  };
  auto store = [&](int slice) {
    const bool rank_part = slice < args.rank_slices;
    T* p_tile = buffers + (slice & 1) * 2 * S::kOperandElems;
    store_slice<T>(rank_part ? args.u.layout : args.p.layout, stage_p, p_tile);
    store_slice<T>(rank_part ? args.v.layout : args.q.layout, stage_q, p_tile + S::kOperandElems);
  };

  Accumulator acc;
  acc.clear();
  load(0);
  store(0);
  __syncthreads();
  for (int slice = 0; slice < slices; ++slice) {
    const bool more = slice + 1 < slices;
    if (more) load(slice + 1);
    const T* p_tile = buffers + (slice & 1) * 2 * S::kOperandElems;
    acc.multiply(p_tile, p_tile + S::kOperandElems);
    if (slice + 1 == args.rank_slices) acc.scale(args.scale);
    if (more) store(slice + 1);
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

Transform make_transform(const char* name, int64_t kind, int64_t key, int64_t threshold,
                         double value, bool swap) {
  TORCH_CHECK(kind == kTransformNone || kind == kTransformNoise || kind == kTransformDropout,
              name, "_kind must be 0 (none), 1 (noise) or 2 (dropout), got ", kind);
  if (kind == kTransformNone) return {kind, 0u, 0u, 0.0f, false};
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24), name,
              "_threshold must be in [0, 2**24], got ", threshold);
  return {kind, check_key(name, key), static_cast<uint32_t>(threshold),
          static_cast<float>(value), swap};
}

Operand make_operand(const at::Tensor& t, Transform transform) {
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

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& p, int64_t rows,
                   int64_t depth) {
  check_cuda_float(name, t, 2);
  check_same_device(name, t, p);
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), name, " must have p's dtype ", p.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == rows && (depth < 0 || t.size(1) == depth), name, " has shape ",
              t.sizes(), ", expected (", rows, ", ", depth < 0 ? "r" : std::to_string(depth), ")");
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

at::Tensor lowrank_gemm(const at::Tensor& p, const at::Tensor& q,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v, double scale, int64_t p_kind,
                        int64_t p_key, int64_t p_threshold, double p_value, bool p_swap,
                        int64_t q_kind, int64_t q_key, int64_t q_threshold, double q_value,
                        bool q_swap) {
  check_cuda_float("p", p, 2);
  const int64_t M = p.size(0), K = p.size(1);
  TORCH_CHECK(K > 0, "p must have at least one column, got shape ", p.sizes());
  check_operand("q", q, p, q.size(0), K);
  const int64_t N = q.size(0);
  if (bias) {
    check_cuda_float("bias", *bias, 1);
    check_same_device("bias", *bias, p);
    TORCH_CHECK(bias->scalar_type() == p.scalar_type() && bias->size(0) == N,
                "bias must be (N,) = (", N, ",) in p's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  TORCH_CHECK(u.has_value() == v.has_value(), "u and v must be given together");
  int64_t rank = 0;
  if (u) {
    check_operand("u", *u, p, M, -1);
    rank = u->size(1);
    TORCH_CHECK(rank > 0, "u must have r >= 1 columns, got shape ", u->sizes());
    check_operand("v", *v, p, N, rank);
  }
  TORCH_CHECK(ceil_div(N, kTile) <= 65535, "q has too many rows: N=", N);

  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor out = at::empty({M, N}, p.options());
  if (M == 0 || N == 0) return out;
  const Transform none{kTransformNone, 0u, 0u, 0.0f, false};
  GemmArgs args{make_operand(p, make_transform("p", p_kind, p_key, p_threshold, p_value, p_swap)),
                make_operand(q, make_transform("q", q_kind, q_key, q_threshold, q_value, q_swap)),
                u ? make_operand(*u, none) : Operand{},
                v ? make_operand(*v, none) : Operand{},
                bias ? bias->data_ptr() : nullptr,
                out.data_ptr(),
                M,
                N,
                static_cast<float>(scale),
                0,
                0};
  const dim3 grid(ceil_div(M, kTile), ceil_div(N, kTile));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_FLOAT_TYPES(p.scalar_type(), "lowrank_gemm", [&] {
    args.rank_slices = ceil_div(rank, Slice<scalar_t>::kDepth);
    args.main_slices = ceil_div(K, Slice<scalar_t>::kDepth);
    lowrank_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dropout(const at::Tensor& x, int64_t key, int64_t threshold, double inv_keep) {
  check_cuda_float("x", x, 2);
  const Transform t = make_transform("dropout", kTransformDropout, key, threshold, inv_keep, false);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t count = input.numel();
  if (count == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_FLOAT_TYPES(x.scalar_type(), "dropout", [&] {
    dropout_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
        input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), input.size(0), input.size(1), t.key,
        t.threshold, t.value);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace lorasc
