// CPU build of the shared headers (csrc/lorasc/*.cuh), compiled with g++ so
// tests/backends/test_cuda_host.py can compare the element-wise functions bit for bit with noise.py,
// formats/rounding.py and the reference merge, and run the data paths of the merge kernel and of
// the fused GEMM (loads, transforms, tiles, schedule, output writes) one CTA after the
// other. Inputs are CPU tensors; keys are uint32 values in int64.
#include <torch/extension.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "lorasc/weight_types.h"
#include "lorasc/cutlass_problem.h"
#include "lorasc/elementwise.cuh"
#include "lorasc/gemm_tile.cuh"
#include "lorasc/launch_args.h"
#include "lorasc/merge_tile.cuh"

namespace {

using lorasc::GemmArgs;
using lorasc::Slice;
using lorasc::Vec16;


// bits(key, row_offset + i, j) for an (rows, cols) block, as int64.
torch::Tensor noise_bits(int64_t key, int64_t rows, int64_t cols, int64_t row_offset) {
  auto out = torch::empty({rows, cols}, torch::kInt64);
  auto acc = out.accessor<int64_t, 2>();
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t hashed = lorasc::row_hash(lorasc::check_key("key", key), static_cast<uint32_t>(row_offset + i));
    for (int64_t j = 0; j < cols; ++j)
      acc[i][j] = lorasc::element_bits(hashed, static_cast<uint32_t>(j));
  }
  return out;
}

torch::Tensor uniform(torch::Tensor bits) {
  auto flat = bits.contiguous().view(-1);
  auto out = torch::empty(flat.sizes(), torch::kFloat32);
  for (int64_t i = 0; i < flat.numel(); ++i)
    out.data_ptr<float>()[i] =
        lorasc::uniform_centered(static_cast<uint32_t>(flat.data_ptr<int64_t>()[i]));
  return out.view(bits.sizes());
}

// Rounds float32 `values` into `out` (its dtype is the target) with random `bits`.
void round_from_fp32(torch::Tensor values, torch::Tensor bits, torch::Tensor out, bool stochastic) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values must be float32");
  auto v = values.contiguous().view(-1);
  auto b = bits.contiguous().view(-1);
  TORCH_CHECK(out.is_contiguous() && out.numel() == v.numel(), "out must match values");
  LORASC_DISPATCH_WEIGHT_TYPES(out.scalar_type(), "out", [&] {
    for (int64_t i = 0; i < v.numel(); ++i)
      out.data_ptr<scalar_t>()[i] = lorasc::round_from_fp32<scalar_t>(
          v.data_ptr<float>()[i], static_cast<uint32_t>(b.data_ptr<int64_t>()[i]), stochastic);
  });
}

// The load-time transform of lowrank_gemm on every element of a 2-D tensor, keyed by
// (row, col): kTransformNoise (reference.noisy_weight, value = scale) or kTransformDropout
// (reference.apply_dropout, value = 1 / (1 - p)).
torch::Tensor transform(torch::Tensor x, int64_t kind, int64_t key, int64_t threshold,
                        double value) {
  TORCH_CHECK(kind == lorasc::kTransformNoise || kind == lorasc::kTransformDropout,
              "kind must be 1 (noise) or 2 (dropout), got ", kind);
  auto in = x.contiguous();
  auto out = torch::empty_like(in);
  LORASC_DISPATCH_WEIGHT_TYPES(in.scalar_type(), "x", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t rows = in.size(0), cols = in.size(1);
    for (int64_t i = 0; i < rows; ++i) {
      const uint32_t hashed = lorasc::row_hash(lorasc::check_key("key", key), static_cast<uint32_t>(i));
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t bits = lorasc::element_bits(hashed, static_cast<uint32_t>(j));
        dst[i * cols + j] =
            kind == lorasc::kTransformNoise ? lorasc::noisy_element(src[i * cols + j], static_cast<float>(value), bits)
                      : lorasc::dropout_element(src[i * cols + j], static_cast<uint32_t>(threshold),
                                                static_cast<float>(value), bits);
      }
    }
  });
  return out;
}

// One CTA of merge_kernel, run serially: each phase for every thread, as the kernel's
// __syncthreads separate them (lorasc/merge_tile.cuh).
template <typename TW, typename TL>
void emulate_merge_tile(const lorasc::MergeArgs& args, int64_t row0, int64_t col0) {
  struct ThreadState {
    lorasc::WeightRun<TW> runs[lorasc::kRowsPerThread];
    float delta[lorasc::kRowsPerThread][lorasc::kColsPerThread];
  };
  std::vector<ThreadState> threads(lorasc::kMergeThreads, ThreadState{});
  auto chunks = std::make_unique<lorasc::MergeChunks>();
  for (int t = 0; t < lorasc::kMergeThreads; ++t)
    lorasc::load_weights<TW>(args, lorasc::MergeLane(row0, col0, t), threads[t].runs);
  for (int64_t k0 = 0; k0 < args.rank; k0 += lorasc::kRankChunk) {
    const int chunk = lorasc::chunk_size(args, k0);
    for (int t = 0; t < lorasc::kMergeThreads; ++t)
      lorasc::stage_rank_chunk<TL>(args, k0, chunk, row0, col0, t, *chunks);
    for (int t = 0; t < lorasc::kMergeThreads; ++t)
      lorasc::accumulate_rank_chunk<lorasc::exact_products<TL>()>(*chunks, chunk, t,
                                                                 threads[t].delta);
  }
  for (int t = 0; t < lorasc::kMergeThreads; ++t)
    lorasc::merge_and_store<TW>(args, lorasc::MergeLane(row0, col0, t), threads[t].runs,
                                threads[t].delta);
}

// merge_lowrank_ (csrc/lorasc/entry_points.h) on CPU tensors through emulate_merge_tile.
void merge_lowrank_(torch::Tensor weight, torch::Tensor lora_B, torch::Tensor lora_A, double coeff,
                    bool stochastic, int64_t rounding_key, int64_t remove_key, double remove_scale,
                    int64_t add_key, double add_scale, int64_t row_offset) {
  const lorasc::MergeArgs args =
      lorasc::make_merge_args(weight, lora_B, lora_A, coeff, stochastic, rounding_key,
                              remove_key, remove_scale, add_key, add_scale, row_offset);
  LORASC_DISPATCH_WEIGHT_TYPES(weight.scalar_type(), "weight", [&] {
    using TW = scalar_t;
    LORASC_DISPATCH_WEIGHT_TYPES(lora_A.scalar_type(), "lora_A", [&] {
      for (int64_t row0 = 0; row0 < args.rows; row0 += lorasc::kMergeBlockRows)
        for (int64_t col0 = 0; col0 < args.cols; col0 += lorasc::kMergeBlockCols)
          emulate_merge_tile<TW, scalar_t>(args, row0, col0);
    });
  });
}

// One CTA of lowrank_gemm_kernel, run serially: the kernel's loads, stores, slice schedule
// and output writes (lorasc/gemm_tile.cuh) around a plain fp32 multiply of the tiles.
template <typename T>
void emulate_tile(const GemmArgs& args, int64_t row0, int64_t col0) {
  using S = Slice<T>;
  constexpr int kTile = lorasc::kGemmTile;
  std::vector<T> tiles(2 * S::kOperandElems);
  std::vector<float> acc(kTile * kTile, 0.0f);
  for (int slice = 0; slice < args.rank_slices + args.main_slices; ++slice) {
    for (int thread = 0; thread < lorasc::kGemmThreads; ++thread) {
      Vec16 left[S::kLoads], right[S::kLoads];
      lorasc::load_operands<T>(args, slice, row0, col0, thread, left, right);
      lorasc::store_operands<T>(args, slice, thread, left, right, tiles.data());
    }
    const T* p_tile = tiles.data();
    const T* q_tile = tiles.data() + S::kOperandElems;
    for (int m = 0; m < kTile; ++m)
      for (int n = 0; n < kTile; ++n)
        for (int d = 0; d < S::kDepth; ++d)
          acc[m * kTile + n] +=
              lorasc::to_float(p_tile[m * S::kLd + d]) * lorasc::to_float(q_tile[n * S::kLd + d]);
    if (slice + 1 == args.rank_slices)
      for (float& value : acc) value *= args.scale;
  }
  // Runs of 8 outputs as the WMMA epilogue writes them for 16-bit types, single ones for fp32.
  const int run = sizeof(T) == 2 ? S::kVec : 1;
  for (int m = 0; m < kTile; ++m)
    for (int n = 0; n < kTile; n += run)
      lorasc::write_run<T>(args, row0 + m, col0 + n, &acc[m * kTile + n], run);
}

// lowrank_gemm (csrc/lorasc/entry_points.h) on CPU tensors through emulate_tile.
torch::Tensor emulate_lowrank_gemm(torch::Tensor p, torch::Tensor q,
                                   std::optional<torch::Tensor> bias,
                                   std::optional<torch::Tensor> u, std::optional<torch::Tensor> v,
                                   double scale, int64_t p_kind, int64_t p_key,
                                   int64_t p_threshold, double p_value, bool p_swap,
                                   int64_t q_kind, int64_t q_key, int64_t q_threshold,
                                   double q_value, bool q_swap) {
  auto out = torch::empty({p.size(0), q.size(0)}, p.options());
  const auto p_transform =
      lorasc::make_transform("p", p_kind, p_key, p_threshold, p_value, p_swap);
  const auto q_transform =
      lorasc::make_transform("q", q_kind, q_key, q_threshold, q_value, q_swap);
  LORASC_DISPATCH_WEIGHT_TYPES(p.scalar_type(), "p", [&] {
    const GemmArgs args = lorasc::make_gemm_args<scalar_t>(p, q, bias, u, v, scale, p_transform,
                                                           q_transform, out);
    for (int64_t row0 = 0; row0 < args.M; row0 += lorasc::kGemmTile)
      for (int64_t col0 = 0; col0 < args.N; col0 += lorasc::kGemmTile)
        emulate_tile<scalar_t>(args, row0, col0);
  });
  return out;
}

// route_gemm (lorasc/cutlass_problem.h) for CPU tensors and a stated target: (kernel, reason).
std::tuple<int64_t, std::string> gemm_route(torch::Tensor p, torch::Tensor q, int64_t p_kind,
                                            int64_t q_kind, int64_t major, int64_t minor,
                                            bool cutlass_built, bool sm90a_code,
                                            bool force_wmma) {
  lorasc::GemmTarget target;
  target.major = static_cast<int>(major);
  target.minor = static_cast<int>(minor);
  target.cutlass_built = cutlass_built;
  target.sm90a_code = sm90a_code;
  target.force_wmma = force_wmma;
  const lorasc::GemmRoute route = lorasc::route_gemm(p, q, p_kind, q_kind, target);
  return {route.kernel, route.reason};
}

// The CUTLASS route of lowrank_gemm on CPU tensors as an sm_90a device would take it: the
// same route, source term and CutlassProblem as fused_linear.cu, then the GEMM the kernel
// computes read through the problem's pointers and strides (fp32 sums in k order),
// out = round(acc + C).
torch::Tensor emulate_cutlass_gemm(torch::Tensor p, torch::Tensor q,
                                   std::optional<torch::Tensor> bias,
                                   std::optional<torch::Tensor> u, std::optional<torch::Tensor> v,
                                   double scale) {
  lorasc::GemmTarget hopper;
  hopper.major = 9;
  hopper.cutlass_built = hopper.sm90a_code = true;
  const lorasc::GemmRoute route = lorasc::route_gemm(p, q, 0, 0, hopper);
  TORCH_CHECK(route.kernel != lorasc::kGemmWmma, "the CUTLASS kernels refuse this problem: ",
              route.reason);
  auto out = torch::empty({p.size(0), q.size(0)}, p.options());
  const at::Tensor source =
      lorasc::source_term(bias, u, v, scale, out.size(0), out.size(1), p.options());
  const lorasc::CutlassProblem problem =
      lorasc::make_cutlass_problem(p, q, source, out, route.kernel);
  LORASC_DISPATCH_WEIGHT_TYPES(p.scalar_type(), "p", [&] {
    const auto* a = static_cast<const scalar_t*>(problem.a);
    const auto* b = static_cast<const scalar_t*>(problem.b);
    auto* d = static_cast<scalar_t*>(problem.d);
    for (int64_t m = 0; m < problem.M; ++m)
      for (int64_t n = 0; n < problem.N; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < problem.K; ++k) {
          const scalar_t b_nk = problem.b_n_major ? b[n + k * problem.ldb] : b[n * problem.ldb + k];
          acc += lorasc::to_float(a[m * problem.lda + k]) * lorasc::to_float(b_nk);
        }
        d[m * problem.ldd + n] = lorasc::from_float<scalar_t>(acc + problem.c[m * problem.ldc + n]);
      }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host build of the CUDA backend's shared element-wise functions (tests only)";
  m.def("noise_bits", &noise_bits, "bits(key, row_offset + i, j) as int64 (rows, cols)");
  m.def("uniform", &uniform, "uniform_centered of int64 bits, float32");
  m.def("round_from_fp32", &round_from_fp32, "float32 values -> out's dtype");
  m.def("transform", &transform, "kind 1: noisy weight (value=scale); 2: dropout (value=1/(1-p))");
  m.def("merge_lowrank_", &merge_lowrank_, "the merge kernel's data path on CPU tensors");
  m.def("emulate_lowrank_gemm", &emulate_lowrank_gemm,
        "lowrank_gemm's data path on CPU tensors, one CTA after the other");
  m.def("gemm_route", &gemm_route, "lowrank_gemm's kernel choice for a stated device");
  m.def("emulate_cutlass_gemm", &emulate_cutlass_gemm,
        "lowrank_gemm's CUTLASS route on CPU tensors (source term, problem, its GEMM)");
}
