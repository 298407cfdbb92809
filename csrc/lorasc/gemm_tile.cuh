// The fused GEMM's data path for one CTA, shared by the CUDA kernel (fused_linear.cu) and
// its host emulation (host_check.cpp), so the CPU tests run this exact index math:
// operands read through strides into 16-byte register vectors (with the noise/dropout
// transform), written to shared-memory tiles, the slice schedule (U/V slices first, then
// P/Q) and the epilogue's writes of out (+ bias).
//
// Shapes: P (M, K), Q (N, K), U (M, r), V (N, r), bias (N,), out (M, N) contiguous.
// A CTA of kGemmThreads threads owns a kGemmTile × kGemmTile tile of out.
#pragma once

#include "elementwise.cuh"

namespace lorasc {

constexpr int kGemmThreads = 256;
constexpr int kGemmTile = 128;

// What an operand's loader does to each element: csrc/lorasc/ops.h's lowrank_gemm kinds.
enum TransformKind : int64_t { kTransformNone = 0, kTransformNoise = 1, kTransformDropout = 2 };

// Per storage type T: reduction depth of a slice, elements per 16-byte vector, padded
// shared-memory row length (against bank conflicts), 16-byte vectors per thread per operand.
template <typename T>
struct Slice {
  static constexpr int kDepth = sizeof(T) == 2 ? 32 : 16;
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kLd = kDepth + kVec;
  static constexpr int kLoads = kGemmTile * kDepth / (kVec * kGemmThreads);
  static constexpr int kOperandElems = kGemmTile * kLd;  // one operand's tile [row][depth]
};

// How a loader reads an operand: 16-byte vectors along the depth, along the rows, or
// element by element (any strides).
enum Layout : int { kScalar = 0, kDepthContiguous = 1, kRowContiguous = 2 };

struct Transform {
  int64_t kind;        // TransformKind
  uint32_t key;        // noise.stream_key(seed, stream)
  uint32_t threshold;  // dropout
  float value;         // noise scale, or dropout's 1 / (1 - p)
  bool swap;           // key the hash by (col, row): the operand is a transposed view
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

#ifdef __CUDACC__
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#endif

template <typename T>
LORASC_HD T& element(Vec16& vector, int e) {
  return reinterpret_cast<T*>(&vector)[e];
}

// Where load `l` of thread `thread` sits in the tile: first element and the step between
// the vector's elements, in (row, depth).
template <typename T>
struct VectorSlot {
  int row, depth, row_step, depth_step;

  LORASC_HD VectorSlot(int layout, int thread, int l) {
    using S = Slice<T>;
    const int v = thread + l * kGemmThreads;
    if (layout == kRowContiguous) {
      // Depth fastest across threads: a warp's transposed stores to shared memory hit
      // consecutive addresses (no bank conflicts).
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
LORASC_HD T transformed(T value, const Transform& t, int64_t row, int64_t col) {
  const uint32_t hash_row = static_cast<uint32_t>(t.swap ? col : row);
  const uint32_t hash_col = static_cast<uint32_t>(t.swap ? row : col);
  const uint32_t bits = element_bits(row_hash(t.key, hash_row), hash_col);
  return t.kind == kTransformNoise ? noisy_element(value, t.value, bits)
                                   : dropout_element(value, t.threshold, t.value, bits);
}

// Loads rows [row0, row0 + kGemmTile) × depth [depth0, depth0 + kDepth) of `op`, this
// thread's share, into registers; out-of-range elements are zero (masked tails), in-range
// ones transformed.
template <typename T>
LORASC_HD void load_slice(const Operand& op, int64_t row0, int64_t depth0, int thread,
                          Vec16 (&stage)[Slice<T>::kLoads]) {
  using S = Slice<T>;
  const T* data = static_cast<const T*>(op.data);
#pragma unroll
  for (int l = 0; l < S::kLoads; ++l) {
    const VectorSlot<T> slot(op.layout, thread, l);
    const int64_t row = row0 + slot.row, depth = depth0 + slot.depth;
    const int64_t last_row = row + slot.row_step * (S::kVec - 1);
    const int64_t last_depth = depth + slot.depth_step * (S::kVec - 1);
    if (op.layout != kScalar && last_row < op.rows && last_depth < op.depth) {
      stage[l] = *reinterpret_cast<const Vec16*>(data + row * op.stride_row +
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

// Writes this thread's staged share of a slice into the tile [row][depth] (row length kLd).
template <typename T>
LORASC_HD void store_slice(int layout, int thread, Vec16 (&stage)[Slice<T>::kLoads], T* tile) {
  using S = Slice<T>;
#pragma unroll
  for (int l = 0; l < S::kLoads; ++l) {
    const VectorSlot<T> slot(layout, thread, l);
    if (layout == kRowContiguous) {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e)
        tile[(slot.row + e) * S::kLd + slot.depth] = element<T>(stage[l], e);
    } else {
      *reinterpret_cast<Vec16*>(tile + slot.row * S::kLd + slot.depth) = stage[l];
    }
  }
}

// The slice schedule: slices [0, rank_slices) read U and V, the rest P and Q. (Branches,
// not operand references, so a kernel's parameters stay in constant space.)
template <typename T>
LORASC_HD void load_operands(const GemmArgs& args, int slice, int64_t row0, int64_t col0,
                             int thread, Vec16 (&left)[Slice<T>::kLoads],
                             Vec16 (&right)[Slice<T>::kLoads]) {
  if (slice < args.rank_slices) {
    const int64_t depth0 = static_cast<int64_t>(slice) * Slice<T>::kDepth;
    load_slice<T>(args.u, row0, depth0, thread, left);
    load_slice<T>(args.v, col0, depth0, thread, right);
  } else {
    const int64_t depth0 = static_cast<int64_t>(slice - args.rank_slices) * Slice<T>::kDepth;
    load_slice<T>(args.p, row0, depth0, thread, left);
    load_slice<T>(args.q, col0, depth0, thread, right);
  }
}

// Stores a slice loaded by load_operands into `tiles`: the left tile, then the right one.
template <typename T>
LORASC_HD void store_operands(const GemmArgs& args, int slice, int thread,
                              Vec16 (&left)[Slice<T>::kLoads], Vec16 (&right)[Slice<T>::kLoads],
                              T* tiles) {
  const bool rank_part = slice < args.rank_slices;
  store_slice<T>(rank_part ? args.u.layout : args.p.layout, thread, left, tiles);
  store_slice<T>(rank_part ? args.v.layout : args.q.layout, thread, right,
                 tiles + Slice<T>::kOperandElems);
}

// Writes `count` consecutive fp32 results (+ bias) of out's row `row` from column `col`.
template <typename T>
LORASC_HD void write_run(const GemmArgs& args, int64_t row, int64_t col, const float* values,
                         int count) {
  if (row >= args.M) return;
  constexpr int kVec = Slice<T>::kVec;
  T* out = static_cast<T*>(args.out) + row * args.N;
  const T* bias = static_cast<const T*>(args.bias);
  auto result = [&](int t) {
    return from_float<T>(bias ? values[t] + to_float(bias[col + t]) : values[t]);
  };
  if (count == kVec && col + kVec <= args.N && args.N % kVec == 0) {
    Vec16 packed;
#pragma unroll
    for (int t = 0; t < kVec; ++t) element<T>(packed, t) = result(t);
    *reinterpret_cast<Vec16*>(out + col) = packed;
  } else {
    for (int t = 0; t < count && col + t < args.N; ++t) out[col + t] = result(t);
  }
}

}  // namespace lorasc
