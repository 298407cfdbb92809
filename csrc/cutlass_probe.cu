// Whether a device runs the extension's sm_90a code: the CUTLASS kernels' bodies exist
// only there (elsewhere CUTLASS compiles them to an error message and no result), and a
// device of compute capability 9.0 loads the sm_90 cubin instead when
// TORCH_CUDA_ARCH_LIST names 9.0, not 9.0a. One probe launch per device, outside CUDA graph
// capture, then cached.
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
  static std::mutex mutex;
  static int runs[kMaxDevices] = {};
  static bool probed[kMaxDevices] = {};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "device index out of range: ", device);
  const std::lock_guard<std::mutex> lock(mutex);
  if (probed[device]) return runs[device] == 1;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  // The probe waits for its result, which a stream being captured into a CUDA graph must
  // not do: until a call outside a capture has probed, say no (the WMMA kernel runs).
  if (capturing != cudaStreamCaptureStatusNone) return false;
  at::Tensor flag = at::zeros(
      {1}, at::TensorOptions().dtype(at::kInt).device(c10::Device(c10::kCUDA, device)));
  sm90a_probe_kernel<<<1, 1, 0, stream>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  runs[device] = flag.item<int>();
  probed[device] = true;
  return runs[device] == 1;
}

}  // namespace lorasc
