// The merge kernel's data path for one CTA, shared by merge.cu and its host emulation
// (host_check.cpp), so the CPU tests run this exact index math bit for bit.
//
// Shapes: W (rows, cols), B (rows, r), A (r, cols); rows are global rows row_offset + i.
// A CTA of 8 warps owns kMergeBlockRows × kMergeBlockCols of W: a warp owns
// kRowsPerThread rows, a lane kColsPerThread consecutive columns of them. Phases:
// load_weights (W into registers), then per rank chunk stage_rank_chunk (A and B as
// float32 into shared memory) and accumulate_rank_chunk (delta in order of k), then
// merge_and_store: one read and one write of W.
#pragma once

#include "elementwise.cuh"

namespace lorasc {

constexpr int kMergeThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kMergeBlockRows = (kMergeThreads / 32) * kRowsPerThread;  // 32
constexpr int kMergeBlockCols = 32 * kColsPerThread;                    // 256
constexpr int kRankChunk = 16;

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

// Shared memory: a float32 chunk of A's columns and of B's rows for the CTA.
struct MergeChunks {
  alignas(16) float a[kRankChunk][kMergeBlockCols];  // A[k0 + k, col0 + c]
  float b[kMergeBlockRows][kRankChunk + 1];          // B[row0 + i, k0 + k]
};

// A thread's place in the CTA: its first row and column in W.
struct MergeLane {
  int64_t row, col;
  LORASC_HD MergeLane(int64_t row0, int64_t col0, int thread)
      : row(row0 + (thread / 32) * kRowsPerThread), col(col0 + (thread % 32) * kColsPerThread) {}
};

// A lane's kColsPerThread weights of one row, from column `col` on.
template <typename TW>
struct WeightRun {
  static constexpr int kVectors = kColsPerThread * sizeof(TW) / 16;
  struct alignas(16) Vector {
    uint32_t words[4];
  };
  Vector vectors[kVectors];

  LORASC_HD TW& value(int e) { return reinterpret_cast<TW*>(vectors)[e]; }

  LORASC_HD void load(const MergeArgs& a, const TW* row, int64_t col) {
    if (a.vectorized && col + kColsPerThread <= a.cols) {
#pragma unroll
      for (int v = 0; v < kVectors; ++v) vectors[v] = reinterpret_cast<const Vector*>(row + col)[v];
    } else {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e)
        value(e) = col + e < a.cols ? row[(col + e) * a.stride_col] : TW(0.0f);
    }
  }

  LORASC_HD void store(const MergeArgs& a, TW* row, int64_t col) {
    if (a.vectorized && col + kColsPerThread <= a.cols) {
#pragma unroll
      for (int v = 0; v < kVectors; ++v) reinterpret_cast<Vector*>(row + col)[v] = vectors[v];
    } else {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e)
        if (col + e < a.cols) row[(col + e) * a.stride_col] = value(e);
    }
  }
};

template <typename TW>
LORASC_HD void load_weights(const MergeArgs& args, const MergeLane& lane,
                            WeightRun<TW> (&runs)[kRowsPerThread]) {
  const TW* weight = static_cast<const TW*>(args.weight);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
    if (lane.row + i < args.rows) runs[i].load(args, weight + (lane.row + i) * args.stride_row,
                                               lane.col);
}

// This thread's share of staging A[k0 : k0 + chunk, col0 : col0 + kMergeBlockCols] and
// B[row0 : row0 + kMergeBlockRows, k0 : k0 + chunk] as float32 (zero outside).
template <typename TL>
LORASC_HD void stage_rank_chunk(const MergeArgs& args, int64_t k0, int chunk, int64_t row0,
                                int64_t col0, int thread, MergeChunks& chunks) {
  const TL* A = static_cast<const TL*>(args.lora_A);
  const TL* B = static_cast<const TL*>(args.lora_B);
  for (int idx = thread; idx < kRankChunk * kMergeBlockCols; idx += kMergeThreads) {
    const int k = idx / kMergeBlockCols, c = idx % kMergeBlockCols;
    const int64_t col = col0 + c;
    chunks.a[k][c] = k < chunk && col < args.cols
                         ? to_float(A[(k0 + k) * args.a_stride_rank + col * args.a_stride_col])
                         : 0.0f;
  }
  for (int idx = thread; idx < kMergeBlockRows * kRankChunk; idx += kMergeThreads) {
    const int i = idx / kRankChunk, k = idx % kRankChunk;
    const int64_t row = row0 + i;
    chunks.b[i][k] = k < chunk && row < args.rows
                         ? to_float(B[row * args.b_stride_row + (k0 + k) * args.b_stride_rank])
                         : 0.0f;
  }
}

// delta[i][e] = delta[i][e] + B[row + i, k] · A[k, col + e] for the chunk's k, in order
// (lowrank_step: one rounding with exact products).
template <bool kExactProducts>
LORASC_HD void accumulate_rank_chunk(const MergeChunks& chunks, int chunk, int thread,
                                     float (&delta)[kRowsPerThread][kColsPerThread]) {
  const int first_row = (thread / 32) * kRowsPerThread, first_col = (thread % 32) * kColsPerThread;
  for (int k = 0; k < chunk; ++k) {
    float a[kColsPerThread];
#ifdef __CUDA_ARCH__  // two 16-byte shared-memory loads
    const float4* a_row = reinterpret_cast<const float4*>(&chunks.a[k][first_col]);
    const float4 low = a_row[0], high = a_row[1];
    a[0] = low.x, a[1] = low.y, a[2] = low.z, a[3] = low.w;
    a[4] = high.x, a[5] = high.y, a[6] = high.z, a[7] = high.w;
    static_assert(kColsPerThread == 8, "a lane reads its columns of A as two float4");
#else
    for (int e = 0; e < kColsPerThread; ++e) a[e] = chunks.a[k][first_col + e];
#endif
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float b = chunks.b[first_row + i][k];
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e) delta[i][e] = lowrank_step<kExactProducts>(delta[i][e], b, a[e]);
    }
  }
}

template <typename TW>
LORASC_HD void merge_and_store(const MergeArgs& args, const MergeLane& lane,
                               WeightRun<TW> (&runs)[kRowsPerThread],
                               const float (&delta)[kRowsPerThread][kColsPerThread]) {
  TW* weight = static_cast<TW*>(args.weight);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = lane.row + i;
    if (row >= args.rows) continue;
    const MergeRowHashes hashes =
        merge_row_hashes(args.params, static_cast<uint32_t>(args.row_offset + row));
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e)
      runs[i].value(e) = merge_element<TW>(to_float(runs[i].value(e)), delta[i][e], hashes,
                                            static_cast<uint32_t>(lane.col + e), args.params);
    runs[i].store(args, weight + row * args.stride_row, lane.col);
  }
}

// The rank chunks of a merge: [k0, k0 + chunk_size(k0)).
LORASC_HD int chunk_size(const MergeArgs& args, int64_t k0) {
  return static_cast<int>(args.rank - k0 < kRankChunk ? args.rank - k0 : kRankChunk);
}

}  // namespace lorasc
