// Host-side dtype dispatch over the three storage types the kernels take.
#pragma once

#include <ATen/Dispatch.h>

// Runs __VA_ARGS__ (a lambda body) with scalar_t = float, c10::Half or c10::BFloat16.
#define LORASC_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
