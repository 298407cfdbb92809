// lowrank_gemm's CUTLASS sm90a kernel for c10::Half, q N-major (lorasc/cutlass_gemm.cuh).
#include "lorasc/cutlass_gemm.cuh"

LORASC_CUTLASS_GEMM_INSTANCE(c10::Half, true)
