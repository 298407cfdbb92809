// In-place cascade merge  W ← round(W − s_r·u_r + coeff·B·A + s_a·u_a)  in one pass over W.
//
// Shapes: W (rows, cols) — possibly a block of rows of a larger matrix starting at global
// row row_offset — B (rows, r), A (r, cols). Per element the float32 operations are those
// of reference.merge_lowrank_ in the same order (lorasc/elementwise.cuh), so the result is
// bit-identical to the reference for fp32/fp16/bf16 W and A/B.
//
// A CTA of 8 warps owns 32 rows × 256 columns: a warp owns 4 rows, a lane 8 consecutive
// columns of them. The lane first loads its 4 × 8 weights (16-byte vectors when the
// layout allows), then accumulates delta = Σ_k B[i, k]·A[k, j] in order of k from
// float32 chunks of A and B staged in shared memory, then rounds and stores: one read and
// one write of W.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lorasc/checks.h"
#include "lorasc/dispatch.h"
#include "lorasc/elementwise.cuh"
#include "lorasc/ops.h"

namespace lorasc {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kBlockRows = (kThreads / 32) * kRowsPerThread;  // 32
constexpr int kBlockCols = 32 * kColsPerThread;               // 256
constexpr int kRankChunk = 16;
static_assert(kColsPerThread == 8, "a lane reads its columns of A as two float4");

struct MergeArgs {
  void* weight;
  int64_t rows, cols, stride_row, stride_col;
  bool vectorized;  // unit column stride and 16-byte aligned rows
  const void* lora_B;
  int64_t b_stride_row, b_stride_rank;
  const void* lora_A;
  int64_t a_stride_rank, a_stride_col;
  int64_t rank, row_offset;
  MergeParams params;
};

// The lane's kColsPerThread weights of one row, from column `col` on.
template <typename TW>
struct WeightRun {
  static constexpr int kVectors = kColsPerThread * sizeof(TW) / 16;
  uint4 vectors[kVectors];

  __device__ __forceinline__ TW& value(int e) { return reinterpret_cast<TW*>(vectors)[e]; }

  __device__ __forceinline__ void load(const MergeArgs& a, const TW* row, int64_t col) {
    if (a.vectorized && col + kColsPerThread <= a.cols) {
#pragma unroll
      for (int v = 0; v < kVectors; ++v) vectors[v] = reinterpret_cast<const uint4*>(row + col)[v];
    } else {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e)
        value(e) = col + e < a.cols ? row[(col + e) * a.stride_col] : TW(0.0f);
    }
  }

  __device__ __forceinline__ void store(const MergeArgs& a, TW* row, int64_t col) {
    if (a.vectorized && col + kColsPerThread <= a.cols) {
#pragma unroll
      for (int v = 0; v < kVectors; ++v) reinterpret_cast<uint4*>(row + col)[v] = vectors[v];
    } else {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e)
        if (col + e < a.cols) row[(col + e) * a.stride_col] = value(e);
    }
  }
};

// Grid: x over blocks of kBlockRows rows, y over blocks of kBlockCols columns.
template <typename TW, typename TL>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeArgs args) {
  __shared__ __align__(16) float a_chunk[kRankChunk][kBlockCols];    // A[k0 + k, col0 + c]
  __shared__ float b_chunk[kBlockRows][kRankChunk + 1];              // B[row0 + i, k0 + k]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBlockCols;
  const int64_t col = col0 + lane * kColsPerThread;
  const TL* A = static_cast<const TL*>(args.lora_A);
  const TL* B = static_cast<const TL*>(args.lora_B);
  TW* weight = static_cast<TW*>(args.weight);

  // Issue the loads of W first: their latency hides behind the rank loop.
  WeightRun<TW> runs[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + warp * kRowsPerThread + i;
    if (row < args.rows) runs[i].load(args, weight + row * args.stride_row, col);
  }

  float delta[kRowsPerThread][kColsPerThread] = {};
  for (int64_t k0 = 0; k0 < args.rank; k0 += kRankChunk) {
    const int chunk = static_cast<int>(args.rank - k0 < kRankChunk ? args.rank - k0 : kRankChunk);
    __syncthreads();  // the previous chunk is consumed
    for (int idx = threadIdx.x; idx < kRankChunk * kBlockCols; idx += kThreads) {
      const int k = idx / kBlockCols, c = idx % kBlockCols;
      const int64_t a_col = col0 + c;
      a_chunk[k][c] = k < chunk && a_col < args.cols
                          ? to_float(A[(k0 + k) * args.a_stride_rank + a_col * args.a_stride_col])
                          : 0.0f;
    }
    for (int idx = threadIdx.x; idx < kBlockRows * kRankChunk; idx += kThreads) {
      const int i = idx / kRankChunk, k = idx % kRankChunk;
      const int64_t b_row = row0 + i;
      b_chunk[i][k] = k < chunk && b_row < args.rows
                          ? to_float(B[b_row * args.b_stride_row + (k0 + k) * args.b_stride_rank])
                          : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < chunk; ++k) {
      const float4* a_row = reinterpret_cast<const float4*>(&a_chunk[k][lane * kColsPerThread]);
      const float4 low = a_row[0], high = a_row[1];
      const float a[kColsPerThread] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float b = b_chunk[warp * kRowsPerThread + i][k];
#pragma unroll
        for (int e = 0; e < kColsPerThread; ++e) delta[i][e] = lowrank_step(delta[i][e], b, a[e]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + warp * kRowsPerThread + i;
    if (row >= args.rows) continue;
    const MergeRowHashes hashes =
        merge_row_hashes(args.params, static_cast<uint32_t>(args.row_offset + row));
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e)
      runs[i].value(e) = merge_element<TW>(to_float(runs[i].value(e)), delta[i][e], hashes,
                                            static_cast<uint32_t>(col + e), args.params);
    runs[i].store(args, weight + row * args.stride_row, col);
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

void merge_lowrank_(at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A,
                    double coeff, bool stochastic, int64_t rounding_key, int64_t remove_key,
                    double remove_scale, int64_t add_key, double add_scale, int64_t row_offset) {
  check_cuda_float("weight", weight, 2);
  check_cuda_float("lora_B", lora_B, 2);
  check_cuda_float("lora_A", lora_A, 2);
  check_same_device("lora_B", lora_B, weight);
  check_same_device("lora_A", lora_A, weight);
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), "lora_A and lora_B must share a dtype, got ",
              lora_A.scalar_type(), " and ", lora_B.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1), rank = lora_A.size(0);
  TORCH_CHECK(rank >= 1 && lora_A.size(1) == cols, "lora_A must be (r, ", cols, ") with r >= 1, got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == rows && lora_B.size(1) == rank, "lora_B must be (", rows, ", ",
              rank, "), got ", lora_B.sizes());
  TORCH_CHECK(row_offset >= 0 && row_offset + rows <= (int64_t(1) << 32),
              "row_offset must be in [0, 2**32 - rows], got ", row_offset);
  TORCH_CHECK(ceil_div(cols, kBlockCols) <= 65535, "weight has too many columns: ", cols);
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
  if (rows == 0 || cols == 0) return;
  const int64_t vec = 16 / weight.element_size();
  const bool vectorized = weight.stride(1) == 1 && weight.stride(0) % vec == 0 &&
                          reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
  const MergeArgs args{weight.data_ptr(), rows, cols, weight.stride(0), weight.stride(1),
                       vectorized, lora_B.data_ptr(), lora_B.stride(0), lora_B.stride(1),
                       lora_A.data_ptr(), lora_A.stride(0), lora_A.stride(1), rank, row_offset,
                       params};
  const c10::cuda::CUDAGuard guard(weight.device());
  const dim3 grid(ceil_div(rows, kBlockRows), ceil_div(cols, kBlockCols));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "merge_lowrank_", [&] {
    using TW = scalar_t;
    LORASC_DISPATCH_FLOAT_TYPES(lora_A.scalar_type(), "merge_lowrank_", [&] {
      merge_kernel<TW, scalar_t><<<grid, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace lorasc
