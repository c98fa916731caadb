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

// exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts, Cody-Waite), and exp(r) by
// Cephes' expf polynomial on |r| <= ln 2 / 2 (~1 ulp): 1 + r + r^2 (p0 r^5 + ... + p5).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpMin = -87.33654f;  // below: 0 (where torch would return a denormal)
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x) for x <= 0; 0 below kExpMin and for -inf. No libm call and no branch, so the loops around it
// vectorise: the clamp and the 0 below kExpMin are bit masks, since with `x < kExpMin ? ... : ...` GCC gave the
// constant outcome a branch of its own and left the AVX2 (x86-64-v3) clones scalar (AVX-512 masks the branch
// away): silu_mul on AMD Zen 3 ran 5-10 ns an element (bench/README.md).
inline float exp_nonpositive(float x) {
  const int32_t below = -int32_t(x < kExpMin);  // all ones below kExpMin (and for -inf), else 0
  int32_t x_bits, min_bits;
  std::memcpy(&x_bits, &x, sizeof(x));
  std::memcpy(&min_bits, &kExpMin, sizeof(kExpMin));
  const int32_t clamped_bits = (x_bits & ~below) | (min_bits & below);
  float clamped;
  std::memcpy(&clamped, &clamped_bits, sizeof(clamped));
  const float n = (clamped * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = clamped - n * kLn2Hi - n * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float value = poly * scale;
  int32_t value_bits;
  std::memcpy(&value_bits, &value, sizeof(value));
  value_bits &= ~below;  // +0 below kExpMin
  float out;
  std::memcpy(&out, &value_bits, sizeof(out));
  return out;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define MOPE_X86 1

// 2^t on 16 lanes for t <= 0 (exp(x) = 2^(x log2 e): callers fold log2 e into their scale): 2^t = 2^n 2^f,
// n = round(t), f = t - n (exact) in [-1/2, 1/2], 2^f by a degree-6 polynomial (~1 ulp), 2^n by scalef.
// Exactly 0 for t = -inf (and below -149); a NaN stays NaN. Call only where __builtin_cpu_supports("avx512f").
constexpr float kExp2Poly[7] = {1.5345811e-4f, 1.3399931e-3f, 9.6184891e-3f, 5.5503286e-2f,
                                0.24022646f, 0.69314718f, 1.0f};
__attribute__((target("avx512f"))) inline __m512 exp2_nonpositive16(__m512 t) {
  const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);  // a NaN in t stays
  const __m512 n = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(clamped, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}
#endif
