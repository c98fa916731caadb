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

// exp(x) for x <= 0; 0 below kExpMin and for -inf. No libm call, so the loops around it vectorise.
inline float exp_nonpositive(float x) {
  const float clamped = x < kExpMin ? kExpMin : x;
  const float n = (clamped * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = clamped - n * kLn2Hi - n * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kExpMin ? 0.0f : poly * scale;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define MOPE_X86 1

// exp_nonpositive on 16 lanes (same reduction and polynomial), with AVX-512's roundscale for n and scalef
// for 2^n: fewer instructions than the compiler's vectorisation of the scalar form (measured: the mix
// kernel 1.24x faster). Call only where __builtin_cpu_supports("avx512f").
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 low = _mm512_set1_ps(kExpMin);
  const __m512 clamped = _mm512_max_ps(low, x);  // a NaN in x stays (max returns its second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 poly = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __mmask16 below = _mm512_cmp_ps_mask(x, low, _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_scalef_ps(poly, n), below, _mm512_setzero_ps());
}
#endif
