// The weight (storage) types the kernels take: one list, read by the dtype dispatch, the
// argument checks and the rounding (host and device code alike). It mirrors
// lorasc_kernels/formats/registry.py (WEIGHT_DTYPES); adding a weight type is one X(...) line here
// and one entry there, then whatever loads and conversions the kernels need for it.
// The scaled formats of formats/registry.py (SCALED_WEIGHT_DTYPES: fp8 e4m3 and e5m2 with per-row
// scales, a ScaledWeight) are not listed: the CUDA kernels do not take them yet
// (docs/fp8.md says what is missing).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

// X(scalar type, C++ storage type, mantissa bits): every weight type, in dispatch order.
#define LORASC_FOR_EACH_WEIGHT_TYPE(X) \
  X(at::kFloat, float, 23)             \
  X(at::kHalf, c10::Half, 10)          \
  X(at::kBFloat16, c10::BFloat16, 7)

namespace lorasc {

constexpr int kFloat32MantissaBits = 23;

// Per storage type: float32 mantissa bits that rounding to it removes, which stochastic
// rounding replaces by a random carry (0: the type holds every float32 exactly).
template <typename T>
struct WeightTraits;

#define LORASC_WEIGHT_TRAITS(SCALAR_TYPE, TYPE, MANTISSA_BITS)                  \
  template <>                                                                   \
  struct WeightTraits<TYPE> {                                                   \
    static constexpr int kDroppedBits = kFloat32MantissaBits - (MANTISSA_BITS); \
  };
LORASC_FOR_EACH_WEIGHT_TYPE(LORASC_WEIGHT_TRAITS)
#undef LORASC_WEIGHT_TRAITS

inline bool is_weight_type(at::ScalarType type) {
#define LORASC_IS_WEIGHT_TYPE(SCALAR_TYPE, TYPE, MANTISSA_BITS) \
  if (type == SCALAR_TYPE) return true;
  LORASC_FOR_EACH_WEIGHT_TYPE(LORASC_IS_WEIGHT_TYPE)
#undef LORASC_IS_WEIGHT_TYPE
  return false;
}

// Calls body(T{}) with T the storage type of `type`; `name` names the tensor in the error.
template <typename Body>
void dispatch_weight_type(at::ScalarType type, const char* name, Body&& body) {
  switch (type) {
#define LORASC_WEIGHT_CASE(SCALAR_TYPE, TYPE, MANTISSA_BITS) \
  case SCALAR_TYPE:                                          \
    body(TYPE{});                                            \
    return;
    LORASC_FOR_EACH_WEIGHT_TYPE(LORASC_WEIGHT_CASE)
#undef LORASC_WEIGHT_CASE
    default:
      TORCH_CHECK(false, name, " has dtype ", type, ", which the kernels do not take");
  }
}

}  // namespace lorasc

// Runs __VA_ARGS__ (a lambda without parameters) with scalar_t the storage type of TYPE,
// as ATen's AT_DISPATCH_* macros do.
#define LORASC_DISPATCH_WEIGHT_TYPES(TYPE, NAME, ...)                                        \
  ::lorasc::dispatch_weight_type(TYPE, NAME, [&](auto lorasc_storage_tag) {                  \
    using scalar_t [[maybe_unused]] = decltype(lorasc_storage_tag);                          \
    __VA_ARGS__();                                                                           \
  })
