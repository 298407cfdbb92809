// Element types shared by host and device code: the LORASC_HD qualifier, float32 bit
// casts, float32 products/sums that are never contracted to FMA (and the one explicit FMA,
// fma_rn), and conversions between float32 and the storage types (float, c10::Half,
// c10::BFloat16).
//
// The header compiles with g++ (no __CUDACC__) for the host-side bit-exactness tests and
// with nvcc for the kernels. c10::Half / c10::BFloat16 convert from float32 with
// round-to-nearest-even on both sides (cuda_fp16/cuda_bf16 intrinsics on the device).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#define LORASC_HD __host__ __device__ __forceinline__
#else
#define LORASC_HD inline
#endif

namespace lorasc {

// The IEEE-754 bit pattern of a float32, and back.
LORASC_HD uint32_t float_bits(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

LORASC_HD float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// a * b and a + b rounded once each: the reference computes them as separate torch ops,
// so the kernels must not fuse them into one FMA (host code is built with
// -ffp-contract=off for the same reason).
LORASC_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LORASC_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a * b + c rounded once (the merge's rank step when a * b is exact: lorasc/elementwise.cuh).
LORASC_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

LORASC_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Storage type <-> float32; from_float rounds to nearest even.
template <typename T>
LORASC_HD float to_float(T value) {
  return static_cast<float>(value);
}

template <typename T>
LORASC_HD T from_float(float value) {
  return T(value);
}

}  // namespace lorasc
