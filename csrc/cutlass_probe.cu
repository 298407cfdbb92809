// Whether a device runs the extension's sm_90a code: the CUTLASS kernels' bodies exist
// only there (CUTLASS compiles them to a trap elsewhere), and a device of compute
// capability 9.0 loads the sm_90 cubin instead when TORCH_CUDA_ARCH_LIST names 9.0, not 9.0a.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "lorasc/cutlass_gemm.h"

namespace lorasc {
namespace {

__global__ void sm90a_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

constexpr int kMaxDevices = 64;

}  // namespace

bool runs_sm90a_code(int device) {
  static std::once_flag once[kMaxDevices];
  static bool runs[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "device index out of range: ", device);
  std::call_once(once[device], [device] {
    const c10::cuda::CUDAGuard guard(device);
    at::Tensor flag = at::zeros(
        {1}, at::TensorOptions().dtype(at::kInt).device(c10::Device(c10::kCUDA, device)));
    sm90a_probe_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    runs[device] = flag.item<int>() == 1;
  });
  return runs[device];
}

}  // namespace lorasc
