// Registers the CUDA ops with torch.library as lorasc_cuda::* (one registration: Python
// calls them as torch.ops.lorasc_cuda.*; fake kernels are in backends/cuda.py). The CPU
// registration runs the same entry points, whose first check names the argument that is
// not a CUDA tensor. The Python module itself only carries the library when imported.
#include <torch/extension.h>
#include <torch/library.h>

#include "lorasc/entry_points.h"

TORCH_LIBRARY(lorasc_cuda, m) {
  m.def(
      "lowrank_gemm(Tensor p, Tensor q, Tensor? bias, Tensor? u, Tensor? v, float scale, "
      "int p_kind, int p_key, int p_threshold, float p_value, bool p_swap, "
      "int q_kind, int q_key, int q_threshold, float q_value, bool q_swap) -> Tensor");
  m.def("lowrank_gemm_route(Tensor p, Tensor q, int p_kind, int q_kind) -> int");
  m.def("dropout(Tensor x, int key, int threshold, float inv_keep) -> Tensor");
  m.def(
      "merge_lowrank_(Tensor(a!) weight, Tensor lora_B, Tensor lora_A, float coeff, "
      "bool stochastic, int rounding_key, int remove_key, float remove_scale, int add_key, "
      "float add_scale, int row_offset) -> ()");
}

TORCH_LIBRARY_IMPL(lorasc_cuda, CUDA, m) {
  m.impl("lowrank_gemm", &lorasc::lowrank_gemm);
  m.impl("lowrank_gemm_route", &lorasc::lowrank_gemm_route);
  m.impl("dropout", &lorasc::dropout);
  m.impl("merge_lowrank_", &lorasc::merge_lowrank_);
}

TORCH_LIBRARY_IMPL(lorasc_cuda, CPU, m) {
  m.impl("lowrank_gemm", &lorasc::lowrank_gemm);
  m.impl("lowrank_gemm_route", &lorasc::lowrank_gemm_route);
  m.impl("dropout", &lorasc::dropout);
  m.impl("merge_lowrank_", &lorasc::merge_lowrank_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LoRASC CUDA kernels, registered as torch.ops.lorasc_cuda.*";
}
