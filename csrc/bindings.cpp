// Python bindings of the CUDA ops: pybind11 functions, and the same ops registered with
// torch.library as lorasc_cuda::* (CUDA kernels here; fake kernels in backends/cuda.py)
// so torch.compile and torch.library.opcheck see them.
#include <torch/extension.h>
#include <torch/library.h>

#include "lorasc/entry_points.h"

TORCH_LIBRARY(lorasc_cuda, m) {
  m.def(
      "lowrank_gemm(Tensor p, Tensor q, Tensor? bias, Tensor? u, Tensor? v, float scale, "
      "int p_kind, int p_key, int p_threshold, float p_value, bool p_swap, "
      "int q_kind, int q_key, int q_threshold, float q_value, bool q_swap) -> Tensor");
  m.def("dropout(Tensor x, int key, int threshold, float inv_keep) -> Tensor");
  m.def(
      "merge_lowrank_(Tensor(a!) weight, Tensor lora_B, Tensor lora_A, float coeff, "
      "bool stochastic, int rounding_key, int remove_key, float remove_scale, int add_key, "
      "float add_scale, int row_offset) -> ()");
}

TORCH_LIBRARY_IMPL(lorasc_cuda, CUDA, m) {
  m.impl("lowrank_gemm", &lorasc::lowrank_gemm);
  m.impl("dropout", &lorasc::dropout);
  m.impl("merge_lowrank_", &lorasc::merge_lowrank_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "LoRASC CUDA kernels: fused low-rank GEMM, dropout, in-place merge";
  m.def("lowrank_gemm", &lorasc::lowrank_gemm,
        "out = p·qᵀ (+ bias) + scale·u·vᵀ with optional noise/dropout on p and q loads",
        py::arg("p"), py::arg("q"), py::arg("bias"), py::arg("u"), py::arg("v"), py::arg("scale"),
        py::arg("p_kind"), py::arg("p_key"), py::arg("p_threshold"), py::arg("p_value"),
        py::arg("p_swap"), py::arg("q_kind"), py::arg("q_key"), py::arg("q_threshold"),
        py::arg("q_value"), py::arg("q_swap"));
  m.def("dropout", &lorasc::dropout, "LoRA-branch dropout of a 2-D tensor", py::arg("x"),
        py::arg("key"), py::arg("threshold"), py::arg("inv_keep"));
  m.def("merge_lowrank_", &lorasc::merge_lowrank_, "in-place merge with noise swap and rounding",
        py::arg("weight"), py::arg("lora_B"), py::arg("lora_A"), py::arg("coeff"),
        py::arg("stochastic"), py::arg("rounding_key"), py::arg("remove_key"),
        py::arg("remove_scale"), py::arg("add_key"), py::arg("add_scale"), py::arg("row_offset"));
}
