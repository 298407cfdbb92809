// In-place cascade merge  W ← round(W − s_r·u_r + coeff·B·A + s_a·u_a)  in one pass over W.
//
// Shapes: W (rows, cols) — possibly a block of rows of a larger matrix starting at global
// row row_offset — B (rows, r), A (r, cols). Per element the float32 operations are those
// of reference.merge_lowrank_ in the same order (lorasc/elementwise.cuh), so the result is
// bit-identical to the reference for fp32/fp16/bf16 W and A/B.
//
// A CTA of 8 warps owns 32 rows × 256 columns: a warp owns 4 rows, a lane 8 consecutive
// columns of them. The lane first loads its 4 × 8 weights (16-byte vectors when the
// layout allows; the loads' latency hides behind the rank loop), then accumulates
// delta = Σ_k B[i, k]·A[k, j] in order of k from float32 chunks of A and B staged in shared
// memory, then rounds and stores: one read and one write of W. The phases live in
// lorasc/merge_tile.cuh (the CPU tests emulate a CTA with them).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lorasc/checks.h"
#include "lorasc/weight_types.h"
#include "lorasc/launch_args.h"
#include "lorasc/merge_tile.cuh"
#include "lorasc/entry_points.h"

namespace lorasc {
namespace {

// Grid: x over blocks of kMergeBlockRows rows, y over blocks of kMergeBlockCols columns.
template <typename TW, typename TL>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const MergeArgs args) {
  __shared__ MergeChunks chunks;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMergeBlockRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kMergeBlockCols;
  const MergeLane lane(row0, col0, threadIdx.x);

  WeightRun<TW> runs[kRowsPerThread];
  load_weights<TW>(args, lane, runs);
  float delta[kRowsPerThread][kColsPerThread] = {};
  for (int64_t k0 = 0; k0 < args.rank; k0 += kRankChunk) {
    const int chunk = chunk_size(args, k0);
    __syncthreads();  // the previous chunk is consumed
    stage_rank_chunk<TL>(args, k0, chunk, row0, col0, threadIdx.x, chunks);
    __syncthreads();
    accumulate_rank_chunk<exact_products<TL>()>(chunks, chunk, threadIdx.x, delta);
  }
  merge_and_store<TW>(args, lane, runs, delta);
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

void merge_lowrank_(at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A,
                    double coeff, bool stochastic, int64_t rounding_key, int64_t remove_key,
                    double remove_scale, int64_t add_key, double add_scale, int64_t row_offset) {
  check_cuda_weight_type("weight", weight, 2);
  check_cuda_weight_type("lora_B", lora_B, 2);
  check_cuda_weight_type("lora_A", lora_A, 2);
  check_same_device("lora_B", lora_B, weight);
  check_same_device("lora_A", lora_A, weight);
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(),
              "lora_A and lora_B must share a dtype, got ", lora_A.scalar_type(), " and ",
              lora_B.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1), rank = lora_A.size(0);
  TORCH_CHECK(rank >= 1 && lora_A.size(1) == cols, "lora_A must be (r, ", cols,
              ") with r >= 1, got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == rows && lora_B.size(1) == rank, "lora_B must be (", rows, ", ",
              rank, "), got ", lora_B.sizes());
  TORCH_CHECK(row_offset >= 0 && row_offset + rows <= (int64_t(1) << 32),
              "row_offset must be in [0, 2**32 - rows], got ", row_offset);
  TORCH_CHECK(ceil_div(cols, kMergeBlockCols) <= 65535, "weight has too many columns: ", cols);
  const MergeArgs args =
      make_merge_args(weight, lora_B, lora_A, coeff, stochastic, rounding_key, remove_key,
                      remove_scale, add_key, add_scale, row_offset);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const dim3 grid(ceil_div(rows, kMergeBlockRows), ceil_div(cols, kMergeBlockCols));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LORASC_DISPATCH_WEIGHT_TYPES(weight.scalar_type(), "weight", [&] {
    using TW = scalar_t;
    LORASC_DISPATCH_WEIGHT_TYPES(lora_A.scalar_type(), "lora_A", [&] {
      merge_kernel<TW, scalar_t><<<grid, kMergeThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace lorasc
