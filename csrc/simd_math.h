// Shared by the CPU kernels in csrc/: runtime-dispatched SIMD clones and a vectorisable exp.
#pragma once

#include <cstdint>
#include <cstring>

// Runtime-dispatched AVX-512 / AVX2 clones of the hot loops; the build itself stays portable.
#if defined(__GNUC__) && defined(__x86_64__)
#define HOT_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT_LOOP
#endif

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); 0 below the normal range (x < -87.34, where torch
// would return a denormal) and for -inf. No libm call, so the loops around it vectorise.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.33654f ? -87.33654f : x;
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.33654f ? 0.0f : poly * scale;
}
