// The CUTLASS sm90a kernels of lowrank_gemm, as the launch in fused_linear.cu sees them;
// one translation unit per instance (csrc/cutlass_gemm_*.cu, lorasc/cutlass_gemm.cuh), so
// MAX_JOBS compiles them side by side. Built only with LORASC_WITH_CUTLASS.
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass_problem.h"

namespace lorasc {

// Runs out = round(p qᵀ + C) for `problem` on `stream`, T = c10::Half or c10::BFloat16,
// kNMajorB: q read N-major. False, launching nothing, when CUTLASS's can_implement
// refuses the problem.
template <typename T, bool kNMajorB>
bool run_cutlass_gemm(const CutlassProblem& problem, int device, int sm_count,
                      cudaStream_t stream);

// Whether `device` runs the sm_90a code of the extension (csrc/cutlass_probe.cu): one
// probe launch per device outside CUDA graph capture, then cached; false while capturing
// before the first probe.
bool runs_sm90a_code(int device);

}  // namespace lorasc
