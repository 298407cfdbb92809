// CPU build of the shared element-wise headers (csrc/lorasc/*.cuh), compiled with g++ so
// tests/test_cuda_host.py can compare them bit for bit with noise.py, rounding.py and the
// reference merge. Inputs are CPU tensors; keys are uint32 values in int64.
#include <torch/extension.h>

#include "lorasc/dispatch.h"
#include "lorasc/elementwise.cuh"

namespace {

using lorasc::MergeParams;

uint32_t as_key(int64_t key) {
  TORCH_CHECK(key >= 0 && key < (int64_t(1) << 32), "key must be in [0, 2**32), got ", key);
  return static_cast<uint32_t>(key);
}

// bits(key, row_offset + i, j) for an (rows, cols) block, as int64.
torch::Tensor noise_bits(int64_t key, int64_t rows, int64_t cols, int64_t row_offset) {
  auto out = torch::empty({rows, cols}, torch::kInt64);
  auto acc = out.accessor<int64_t, 2>();
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t hashed = lorasc::row_hash(as_key(key), static_cast<uint32_t>(row_offset + i));
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
  LORASC_DISPATCH_FLOAT_TYPES(out.scalar_type(), "round_from_fp32", [&] {
    for (int64_t i = 0; i < v.numel(); ++i)
      out.data_ptr<scalar_t>()[i] = lorasc::round_from_fp32<scalar_t>(
          v.data_ptr<float>()[i], static_cast<uint32_t>(b.data_ptr<int64_t>()[i]), stochastic);
  });
}

// noisy_weight (kind 0) or dropout (kind 1) of a 2-D tensor, keyed by (row, col).
torch::Tensor transform(torch::Tensor x, int64_t kind, int64_t key, int64_t threshold,
                        double value) {
  auto in = x.contiguous();
  auto out = torch::empty_like(in);
  LORASC_DISPATCH_FLOAT_TYPES(in.scalar_type(), "transform", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t rows = in.size(0), cols = in.size(1);
    for (int64_t i = 0; i < rows; ++i) {
      const uint32_t hashed = lorasc::row_hash(as_key(key), static_cast<uint32_t>(i));
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t bits = lorasc::element_bits(hashed, static_cast<uint32_t>(j));
        dst[i * cols + j] =
            kind == 0 ? lorasc::noisy_element(src[i * cols + j], static_cast<float>(value), bits)
                      : lorasc::dropout_element(src[i * cols + j], static_cast<uint32_t>(threshold),
                                                static_cast<float>(value), bits);
      }
    }
  });
  return out;
}

// The merge on CPU tensors, element by element with the kernels' functions; keys < 0 mean
// "no noise". W is contiguous; A and B have the same dtype.
void merge_lowrank_(torch::Tensor weight, torch::Tensor lora_B, torch::Tensor lora_A, double coeff,
                    bool stochastic, int64_t rounding_key, int64_t remove_key, double remove_scale,
                    int64_t add_key, double add_scale, int64_t row_offset) {
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const MergeParams params{static_cast<float>(coeff), remove_key >= 0,
                           remove_key >= 0 ? as_key(remove_key) : 0u,
                           static_cast<float>(remove_scale), add_key >= 0,
                           add_key >= 0 ? as_key(add_key) : 0u, static_cast<float>(add_scale),
                           stochastic, as_key(rounding_key)};
  auto A = lora_A.to(at::kFloat).contiguous();  // exact upcast, as the kernels do on load
  auto B = lora_B.to(at::kFloat).contiguous();
  const int64_t rows = weight.size(0), cols = weight.size(1), rank = A.size(0);
  LORASC_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "merge_lowrank_", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    const float* a = A.data_ptr<float>();
    const float* b = B.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i) {
      const auto hashes = lorasc::merge_row_hashes(params, static_cast<uint32_t>(row_offset + i));
      for (int64_t j = 0; j < cols; ++j) {
        float delta = 0.0f;
        for (int64_t k = 0; k < rank; ++k)
          delta = lorasc::lowrank_step(delta, b[i * rank + k], a[k * cols + j]);
        w[i * cols + j] = lorasc::merge_element<scalar_t>(
            lorasc::to_float(w[i * cols + j]), delta, hashes, static_cast<uint32_t>(j), params);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host build of the CUDA backend's shared element-wise functions (tests only)";
  m.def("noise_bits", &noise_bits, "bits(key, row_offset + i, j) as int64 (rows, cols)");
  m.def("uniform", &uniform, "uniform_centered of int64 bits, float32");
  m.def("round_from_fp32", &round_from_fp32, "float32 values -> out's dtype");
  m.def("transform", &transform, "kind 0: noisy weight (value=scale); 1: dropout (value=1/(1-p))");
  m.def("merge_lowrank_", &merge_lowrank_, "in-place merge on CPU tensors");
}
