// The CUTLASS 3 sm90 GEMM of lowrank_gemm: out (M, N) = round(p (M, K) · q (N, K)ᵀ + C),
// C float32 (M, N) (bias + scale · u vᵀ, lorasc/cutlass_problem.h). All stock CUTLASS: the
// collective builders' TMA warp-specialized cooperative persistent mainloop (HGMMA, fp32
// accumulator, tile 128 × 256 × 64, cluster 2 × 1) and TMA epilogue with the
// LinearCombination fusion (D = alpha · acc + beta · C, alpha = beta = 1, one rounding).
// Included by one csrc/cutlass_gemm_*.cu per instance (LORASC_CUTLASS_GEMM_INSTANCE).
#pragma once

#include <ATen/ops/empty.h>
#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "cutlass_gemm.h"

namespace lorasc {
namespace cutlass_sm90 {

template <typename T>
struct Element;
template <>
struct Element<c10::Half> {
  using type = cutlass::half_t;
};
template <>
struct Element<c10::BFloat16> {
  using type = cutlass::bfloat16_t;
};

// The kernel for storage type T; q (the GEMM's B, (N, K)) K-major (ColumnMajor in CUTLASS's
// K × N terms) or N-major (RowMajor).
template <typename T, bool kNMajorB>
struct Sm90Gemm {
  using ElementAB = typename Element<T>::type;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = std::conditional_t<kNMajorB, cutlass::layout::RowMajor,
                                     cutlass::layout::ColumnMajor>;
  using LayoutCD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int kAlignC = 128 / cutlass::sizeof_bits<float>::value;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<ElementAB, float, float, float>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, float, LayoutCD, kAlignC,
      ElementAB, LayoutCD, kAlignAB, cutlass::epilogue::TmaWarpSpecializedCooperative,
      Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB,
      ElementAB, LayoutB, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static typename Gemm::Arguments arguments(const CutlassProblem& problem, int device,
                                            int sm_count) {
    StrideA stride_a{problem.lda, cute::Int<1>{}, int64_t(0)};
    StrideB stride_b;
    if constexpr (kNMajorB) {
      stride_b = StrideB{cute::Int<1>{}, problem.ldb, int64_t(0)};
    } else {
      stride_b = StrideB{problem.ldb, cute::Int<1>{}, int64_t(0)};
    }
    StrideC stride_c{problem.ldc, cute::Int<1>{}, int64_t(0)};
    StrideD stride_d{problem.ldd, cute::Int<1>{}, int64_t(0)};
    cutlass::KernelHardwareInfo hardware;
    hardware.device_id = device;
    hardware.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {problem.M, problem.N, problem.K, 1},
        {static_cast<const ElementAB*>(problem.a), stride_a,
         static_cast<const ElementAB*>(problem.b), stride_b},
        {{}, problem.c, stride_c, static_cast<ElementAB*>(problem.d), stride_d},
        hardware};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 1.0f;
    return args;
  }
};

}  // namespace cutlass_sm90

template <typename T, bool kNMajorB>
bool run_cutlass_gemm(const CutlassProblem& problem, int device, int sm_count,
                      cudaStream_t stream) {
  using Config = cutlass_sm90::Sm90Gemm<T, kNMajorB>;
  typename Config::Gemm gemm;
  const auto args = Config::arguments(problem, device, sm_count);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  const size_t bytes = Config::Gemm::get_workspace_size(args);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)},
                at::TensorOptions().dtype(at::kByte).device(c10::Device(c10::kCUDA, device)));
  const cutlass::Status status = gemm.run(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "the CUTLASS sm90 GEMM failed to launch: ",
              cutlass::cutlassGetStatusString(status));
  return true;
}

}  // namespace lorasc

// One explicit instance per translation unit.
#define LORASC_CUTLASS_GEMM_INSTANCE(T, N_MAJOR)                                              \
  template bool lorasc::run_cutlass_gemm<T, N_MAJOR>(const lorasc::CutlassProblem&, int, int, \
                                                     cudaStream_t);
