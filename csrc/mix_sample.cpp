// Fused mix-and-sample on CPU (the "cpu" backend of mope.kernels.mix_sample / mix_logprobs).
//
// One task per row (at::parallel_for); nothing sorts the vocabulary. Per row, with K_a active experts:
//   expert pass  per active expert, one blocked pass over its logits: online max and sum of exps
//                (prob mode also stores the exps, relative to the running max, in a K_a x V scratch)
//   mixture      q(v) = pi(v) up to a constant, into a V-float row buffer: prob mode rescales the
//                stored exps per block; logit mode sums w_k (z_k - lse_k) and exponentiates once
//   top-k/top-p  thresholds searched on the float bits of q (positive floats order like their bits):
//                vectorised passes that interpolate where the weight crosses the target and probe both
//                sides of the guess (the last also collects the few values between its probes), then an
//                exact radix select over those values;
//                counts for top-k, mass for top-p; ties at a threshold are kept
//   draw         inverse CDF in vocabulary order over {q >= threshold}, u from the same Philox
//                stream as kernels/philox.py (tl.rand), so the backends draw the same token
// Experts with w_k = 0 are never read. Logits of an active expert with NaN or +inf (or all -inf) are
// reported per row in `bad` (the expert's index, else -1): the validation costs no extra pass.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 1024;  // logits converted to fp32 per block, in L1
constexpr int64_t kDrawBlock = 256;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSmallestPositive = std::numeric_limits<float>::denorm_min();

// ---- random numbers: Philox4x32-10, as tl.rand(seed, offset) ----

float philox_uniform(int64_t seed, int64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(uint64_t(offset) >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(uint64_t(seed) >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = uint64_t(0xCD9E8D57u) * c2, product_a = uint64_t(0xD2511F53u) * c0;
    c0 = uint32_t(product_b >> 32) ^ c1 ^ k0;
    c2 = uint32_t(product_a >> 32) ^ c3 ^ k1;
    c1 = uint32_t(product_b);
    c3 = uint32_t(product_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = int32_t(c0);
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

// ---- vectorisable elementwise math ----

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

HOT_LOOP float block_max(const float* x, int64_t n, int* bad) {
  float m = -kInf;
  int not_finite = 0;
#pragma omp simd reduction(max : m) reduction(| : not_finite)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    not_finite |= !(x[i] < kInf);  // NaN or +inf
  }
  *bad |= not_finite;
  return m;
}

// Logits to prefetch while a block's exps are computed, one line per 16 values: the next block into L1, so
// its read from memory overlaps these exps instead of stalling the next block_max, and a block further on
// into L2 (more reads in flight than L1's fill buffers allow: 5% faster from memory at B = 64).
struct Ahead {
  const char* next = nullptr;
  int64_t next_bytes = 0;
  const char* far = nullptr;
  int64_t far_bytes = 0;
};

// sum of exp((x - shift) * scale); also stores the terms when out != nullptr
template <bool kStore>
__attribute__((always_inline)) inline float sum_exp_impl(const float* x, int64_t n, float shift, float scale,
                                                        float* out, const Ahead& ahead) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t c = 0; c < full; c += kLanes) {
    if (c * 4 < ahead.next_bytes) __builtin_prefetch(ahead.next + c * 4, 0, 3);
    if (c * 4 < ahead.far_bytes) __builtin_prefetch(ahead.far + c * 4, 0, 2);
    for (int64_t l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive((x[c + l] - shift) * scale);
      if (kStore) out[c + l] = e;
      lanes[l] += e;
    }
  }
  float s = 0.0f;
  for (int64_t i = full; i < n; ++i) {
    const float e = exp_nonpositive((x[i] - shift) * scale);
    if (kStore) out[i] = e;
    s += e;
  }
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

#ifdef MOPE_X86
template <bool kStore>
__attribute__((target("avx512f"))) float sum_exp_avx512(const float* x, int64_t n, float shift, float scale,
                                                          float* out, const Ahead& ahead) {
  // exp((x - shift) scale) = 2^(x a - b), a = scale log2 e, b = shift a in two floats (b_hi + b_lo), so
  // that t is as exact as x - shift: one fma and a subtraction instead of the range reduction's four ops
  const float a = scale * kLog2e;
  const double b = double(shift) * double(a);
  const __m512 va = _mm512_set1_ps(a), b_hi = _mm512_set1_ps(float(b)),
               b_lo = _mm512_set1_ps(float(b - double(float(b))));
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    if (c * 4 < ahead.next_bytes) _mm_prefetch(ahead.next + c * 4, _MM_HINT_T0);
    if (c * 4 < ahead.far_bytes) _mm_prefetch(ahead.far + c * 4, _MM_HINT_T1);
    const __m512 e = exp2_nonpositive16(_mm512_sub_ps(_mm512_fmsub_ps(_mm512_loadu_ps(x + c), va, b_hi), b_lo));
    if (kStore) _mm512_storeu_ps(out + c, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (c < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 z = _mm512_maskz_loadu_ps(tail, x + c);
    const __m512 e = exp2_nonpositive16(_mm512_sub_ps(_mm512_fmsub_ps(z, va, b_hi), b_lo));
    if (kStore) _mm512_mask_storeu_ps(out + c, tail, e);
    acc = _mm512_mask_add_ps(acc, tail, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// MOPE_DISABLE_AVX512=1 in the environment takes the portable path (tests compare the two)
const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && std::getenv("MOPE_DISABLE_AVX512") == nullptr;
#endif

HOT_LOOP float sum_exp_portable(const float* x, int64_t n, float shift, float scale, float* out,
                                const Ahead& ahead) {
  return out == nullptr ? sum_exp_impl<false>(x, n, shift, scale, out, ahead)
                        : sum_exp_impl<true>(x, n, shift, scale, out, ahead);
}

float block_sum_exp(const float* x, int64_t n, float shift, float scale, float* out,
                    const Ahead& ahead = {}) {
#ifdef MOPE_X86
  if (kHasAvx512)
    return out == nullptr ? sum_exp_avx512<false>(x, n, shift, scale, out, ahead)
                          : sum_exp_avx512<true>(x, n, shift, scale, out, ahead);
#endif
  return sum_exp_portable(x, n, shift, scale, out, ahead);
}

// q (+)= coef * e
HOT_LOOP void block_axpy(float* q, const float* e, int64_t n, float coef, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] = coef * e[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] += coef * e[i];
  }
}

// q (+)= w * (x - shift): the logit mode mixture, w_k log_softmax(z_k)
HOT_LOOP void block_add_scaled(float* q, const float* x, int64_t n, float w, float shift, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] = w * (x[i] - shift);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] += w * (x[i] - shift);
  }
}

HOT_LOOP float max_of(const float* q, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = q[i] > m ? q[i] : m;
  return m;
}

// sum (added to *total) and max (into *max) of a block of q, while it is in L1
HOT_LOOP void block_sum_max(const float* q, int64_t n, double* total, float* max) {
  float s = 0.0f, m = *max;
#pragma omp simd reduction(+ : s) reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    s += q[i];
    m = q[i] > m ? q[i] : m;
  }
  *total += s;
  *max = m;
}

// q = exp((q - shift) * scale) in place; returns the sum
HOT_LOOP double exp_in_place(float* q, int64_t n, float shift, float scale) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    total += block_sum_exp(q + start, len, shift, scale, q + start);
  }
  return total;
}

// sum over v of e(v) * (x(v) - shift), skipping e(v) = 0 (where x may be -inf)
HOT_LOOP double block_weighted_sum(const float* e, const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += e[i] > 0.0f ? e[i] * (x[i] - shift) : 0.0f;
  return s;
}

// ---- loading logits as fp32 blocks ----

template <typename scalar_t>
const float* load_block(const scalar_t* src, int64_t n, float* buffer) {
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
  return buffer;
}

template <>
const float* load_block<float>(const float* src, int64_t, float*) {
  return src;
}

// ---- per expert statistics ----

struct ExpertStats {
  float max = -kInf;
  double log_sum_tempered = 0.0;  // log sum exp((z - max) / T)
  double log_sum_plain = 0.0;     // log sum exp(z - max), when asked for (logit mode)
  bool bad = false;
};

// One blocked pass: online max and sums of exps. When `exps` is given, stores exp((z - m_j) / T) where m_j
// is the running max after block j, and m_j in block_max_out[j] (for the prob mode mixture).
template <typename scalar_t>
ExpertStats expert_pass(const scalar_t* z, int64_t vocab, float inv_t, bool want_plain, float* exps,
                        float* block_max_out, float* buffer) {
  ExpertStats stats;
  double sum_t = 0.0, sum_1 = 0.0;
  int bad = 0;
  for (int64_t start = 0, j = 0; start < vocab; start += kBlock, ++j) {
    const int64_t len = std::min(kBlock, vocab - start);
    const float* x = load_block(z + start, len, buffer);
    const float m = block_max(x, len, &bad);
    if (m > stats.max) {  // rescale what was summed against the old max
      sum_t *= std::exp(double(stats.max - m) * inv_t);
      sum_1 *= std::exp(double(stats.max - m));
      stats.max = m;
    }
    if (block_max_out != nullptr) block_max_out[j] = stats.max;
    if (stats.max == -kInf) {  // everything so far is -inf: exps are 0
      if (exps != nullptr) std::fill(exps + start, exps + start + len, 0.0f);
      continue;
    }
    const auto values_from = [&](int64_t from) { return std::clamp<int64_t>(vocab - from, 0, kBlock); };
    const int64_t next = start + kBlock, far = start + 3 * kBlock;
    const Ahead ahead{reinterpret_cast<const char*>(z + next), values_from(next) * int64_t(sizeof(scalar_t)),
                      reinterpret_cast<const char*>(z + far), values_from(far) * int64_t(sizeof(scalar_t))};
    sum_t += block_sum_exp(x, len, stats.max, inv_t, exps == nullptr ? nullptr : exps + start, ahead);
    if (want_plain) sum_1 += block_sum_exp(x, len, stats.max, 1.0f, nullptr);
  }
  stats.bad = bad || stats.max == -kInf || std::isnan(stats.max);
  stats.log_sum_tempered = std::log(sum_t);
  stats.log_sum_plain = want_plain ? std::log(sum_1) : stats.log_sum_tempered;
  return stats;
}

// ---- truncation: threshold search on float bits ----
// Positive floats order like their bit patterns, so a threshold is found by searching the bits. W(x) is the
// weight (mass, or count for top-k) of {q >= x}; the threshold is the largest value t with W(t) >= target
// (the smallest value when none reaches it). Keeping {q >= t} then keeps exactly the tokens whose strictly
// greater weight is < target: ties at the boundary are kept together.

// W(x) over n <= kDrawBlock values (float lanes: a double reduction does not vectorise)
inline float chunk_weight_at_least(const float* q, int64_t n, float x, bool by_mass) {
  float s = 0.0f;
  if (by_mass) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += q[i] >= x ? q[i] : 0.0f;
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += q[i] >= x ? 1.0f : 0.0f;
  }
  return s;
}

// W(x) over all n values, for the threshold search: four 16-lane float partial sums per kDrawBlock chunk
// (four independent add chains, not one), added lane-wise into 16 double sums; one horizontal sum at the
// end. Each lane sums 4 values per chunk in float, so this is as exact as chunk_weight_at_least.
template <bool kByMass>
__attribute__((always_inline)) inline double weight_at_least_impl(const float* q, int64_t n, float x) {
  constexpr int64_t kLanes = 16;
  double lanes[kLanes] = {};
  const int64_t full = n - n % kDrawBlock;
  for (int64_t start = 0; start < full; start += kDrawBlock) {
    float p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
    for (int64_t i = start; i < start + kDrawBlock; i += 4 * kLanes) {
      const float* a = q + i;
      for (int64_t l = 0; l < kLanes; ++l) {
        p0[l] += a[l] >= x ? (kByMass ? a[l] : 1.0f) : 0.0f;
        p1[l] += a[kLanes + l] >= x ? (kByMass ? a[kLanes + l] : 1.0f) : 0.0f;
        p2[l] += a[2 * kLanes + l] >= x ? (kByMass ? a[2 * kLanes + l] : 1.0f) : 0.0f;
        p3[l] += a[3 * kLanes + l] >= x ? (kByMass ? a[3 * kLanes + l] : 1.0f) : 0.0f;
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += double((p0[l] + p1[l]) + (p2[l] + p3[l]));
  }
  double total = full < n ? chunk_weight_at_least(q + full, n - full, x, kByMass) : 0.0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

HOT_LOOP double weight_at_least(const float* q, int64_t n, float x, bool by_mass) {
  return by_mass ? weight_at_least_impl<true>(q, n, x) : weight_at_least_impl<false>(q, n, x);
}

// W(x1) and W(x2) in one pass over q (two add chains each), as exact as weight_at_least. Written out like
// it rather than shared through a template over the number of thresholds: that measured 5-25% slower.
template <bool kByMass>
__attribute__((always_inline)) inline std::pair<double, double> weights_at_least_impl(const float* q, int64_t n,
                                                                                     float x1, float x2) {
  constexpr int64_t kLanes = 16;
  double lanes1[kLanes] = {}, lanes2[kLanes] = {};
  const int64_t full = n - n % kDrawBlock;
  for (int64_t start = 0; start < full; start += kDrawBlock) {
    float a0[kLanes] = {}, a1[kLanes] = {}, b0[kLanes] = {}, b1[kLanes] = {};
    for (int64_t i = start; i < start + kDrawBlock; i += 2 * kLanes) {
      const float* a = q + i;
      for (int64_t l = 0; l < kLanes; ++l) {
        const float u = a[l], v = a[kLanes + l];
        a0[l] += u >= x1 ? (kByMass ? u : 1.0f) : 0.0f;
        a1[l] += v >= x1 ? (kByMass ? v : 1.0f) : 0.0f;
        b0[l] += u >= x2 ? (kByMass ? u : 1.0f) : 0.0f;
        b1[l] += v >= x2 ? (kByMass ? v : 1.0f) : 0.0f;
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes1[l] += double(a0[l] + a1[l]);
      lanes2[l] += double(b0[l] + b1[l]);
    }
  }
  double w1 = full < n ? chunk_weight_at_least(q + full, n - full, x1, kByMass) : 0.0;
  double w2 = full < n ? chunk_weight_at_least(q + full, n - full, x2, kByMass) : 0.0;
  for (int64_t l = 0; l < kLanes; ++l) w1 += lanes1[l], w2 += lanes2[l];
  return {w1, w2};
}

HOT_LOOP std::pair<double, double> weights_at_least(const float* q, int64_t n, float x1, float x2, bool by_mass) {
  return by_mass ? weights_at_least_impl<true>(q, n, x1, x2) : weights_at_least_impl<false>(q, n, x1, x2);
}

// Writes the values whose bits are in [lo, hi) to out, scanning only the 32-value chunks that hold one;
// returns their number.
HOT_LOOP int64_t collect_bits_in(const float* q, int64_t n, uint32_t lo, uint32_t hi, float* out) {
  constexpr int64_t kChunk = 32;
  int64_t count = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t i = 0; i < len; ++i) any |= (float_bits(q[start + i]) - lo) < (hi - lo);
    if (!any) continue;
    for (int64_t i = start; i < start + len; ++i)
      if (float_bits(q[i]) - lo < hi - lo) out[count++] = q[i];
  }
  return count;
}

// A probing pass of the threshold search that also collects the values in [x1, x2), the candidates when
// the threshold lies there: W(x1), W(x2), and the number of values collected (-1: not collected).
struct Probe {
  double w1, w2;
  int64_t count;
};

#ifdef MOPE_X86
// lanes (16 doubles in two registers) += s, lane by lane
__attribute__((target("avx512f"))) inline void add_to_double_lanes(__m512d* lanes, __m512 s) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
  lanes[0] = _mm512_add_pd(lanes[0], _mm512_cvtps_pd(_mm512_castps512_ps256(s)));
  lanes[1] = _mm512_add_pd(lanes[1], _mm512_cvtps_pd(high));
}

// weights_at_least's two-threshold pass with the same sums in the same order, plus the values in [x1, x2)
// written to out by compress stores
template <bool kByMass>
__attribute__((target("avx512f,popcnt"))) Probe probe_avx512(const float* q, int64_t n, float x1, float x2,
                                                             float* out) {
  const __m512 at1 = _mm512_set1_ps(x1), at2 = _mm512_set1_ps(x2), one = _mm512_set1_ps(1.0f);
  __m512d lanes1[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, lanes2[2] = {lanes1[0], lanes1[0]};
  int64_t count = 0;
  const int64_t full = n - n % kDrawBlock;
  for (int64_t start = 0; start < full; start += kDrawBlock) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t i = start; i < start + kDrawBlock; i += 32) {
      const __m512 u = _mm512_loadu_ps(q + i), v = _mm512_loadu_ps(q + i + 16);
      const __mmask16 u1 = _mm512_cmp_ps_mask(u, at1, _CMP_GE_OQ), v1 = _mm512_cmp_ps_mask(v, at1, _CMP_GE_OQ);
      const __mmask16 u2 = _mm512_cmp_ps_mask(u, at2, _CMP_GE_OQ), v2 = _mm512_cmp_ps_mask(v, at2, _CMP_GE_OQ);
      a0 = _mm512_mask_add_ps(a0, u1, a0, kByMass ? u : one);
      a1 = _mm512_mask_add_ps(a1, v1, a1, kByMass ? v : one);
      b0 = _mm512_mask_add_ps(b0, u2, b0, kByMass ? u : one);
      b1 = _mm512_mask_add_ps(b1, v2, b1, kByMass ? v : one);
      const __mmask16 u_in = u1 & ~u2, v_in = v1 & ~v2;
      if (u_in | v_in) {  // rare: the probes are close
        _mm512_mask_compressstoreu_ps(out + count, u_in, u);
        count += __builtin_popcount(u_in);
        _mm512_mask_compressstoreu_ps(out + count, v_in, v);
        count += __builtin_popcount(v_in);
      }
    }
    add_to_double_lanes(lanes1, _mm512_add_ps(a0, a1));
    add_to_double_lanes(lanes2, _mm512_add_ps(b0, b1));
  }
  double w1 = full < n ? chunk_weight_at_least(q + full, n - full, x1, kByMass) : 0.0;
  double w2 = full < n ? chunk_weight_at_least(q + full, n - full, x2, kByMass) : 0.0;
  alignas(64) double sums1[16], sums2[16];
  _mm512_store_pd(sums1, lanes1[0]), _mm512_store_pd(sums1 + 8, lanes1[1]);
  _mm512_store_pd(sums2, lanes2[0]), _mm512_store_pd(sums2 + 8, lanes2[1]);
  for (int l = 0; l < 16; ++l) w1 += sums1[l], w2 += sums2[l];
  for (int64_t i = full; i < n; ++i)
    if (q[i] >= x1 && !(q[i] >= x2)) out[count++] = q[i];
  return {w1, w2, count};
}
#endif

// W(x1), W(x2) and, when W(x1) >= target > W(x2) (or always, with AVX-512), the values in [x1, x2)
Probe probe_collecting(const float* q, int64_t n, float x1, float x2, bool by_mass, double target, float* out) {
#ifdef MOPE_X86
  if (kHasAvx512) return by_mass ? probe_avx512<true>(q, n, x1, x2, out) : probe_avx512<false>(q, n, x1, x2, out);
#endif
  const auto [w1, w2] = weights_at_least(q, n, x1, x2, by_mass);
  const bool closed = w1 >= target && target > w2;
  return {w1, w2, closed ? collect_bits_in(q, n, float_bits(x1), float_bits(x2), out) : -1};
}

// Walks bins from the highest: the first bin where the weight above it plus its own reaches `target`
// (the threshold lies in it), else the lowest non-empty bin. Returns the bin and the weight above it.
std::pair<uint32_t, double> pick_bin(const double* hist, int bins, double above, double target) {
  int lowest = 0;
  double above_lowest = above;
  for (int b = bins - 1; b >= 0; --b) {
    if (hist[b] == 0.0) continue;
    if (above + hist[b] >= target) return {uint32_t(b), above};
    lowest = b;
    above_lowest = above;
    above += hist[b];
  }
  return {uint32_t(lowest), above_lowest};
}

// A truncation threshold t and W(t), the weight of {q >= t} (the draw's total, for a mass threshold)
struct Threshold {
  float value;
  double weight;
};

// The threshold from the values with bits in [lo, hi) (all of them, W(hi) = above): radix select on the
// bits, at most 1024 bins a level, keeping the chosen bin's values for the next level.
Threshold resolve_threshold(float* values, int64_t count, uint32_t lo, uint32_t hi, double above, double target,
                            bool by_mass) {
  double hist[1024];
  while (hi > lo && hi - lo > 1) {
    const int shift = std::max(0, 32 - __builtin_clz(hi - lo - 1) - 10);
    const int bins = int((hi - lo - 1) >> shift) + 1;
    std::fill(hist, hist + bins, 0.0);
    for (int64_t i = 0; i < count; ++i) hist[(float_bits(values[i]) - lo) >> shift] += by_mass ? values[i] : 1.0;
    uint32_t bin;
    std::tie(bin, above) = pick_bin(hist, bins, above, target);
    lo += bin << shift;
    hi = uint32_t(std::min<uint64_t>(hi, uint64_t(lo) + (uint64_t(1) << shift)));
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i)
      if (float_bits(values[i]) - lo < hi - lo) values[kept++] = values[i];
    count = kept;
  }
  double at = above;  // + the values equal to the threshold, all that is left
  for (int64_t i = 0; i < count; ++i) at += by_mass ? values[i] : 1.0;
  return {bits_float(lo), at};
}

// The threshold among {q >= lower}, for W(lower) = total. Vectorised passes over q bracket it within 2^16
// bit patterns (1/128 of a binade: few values), the last of them also collecting the values there, and
// resolve_threshold settles it exactly. The bracket, not the search path, decides the result, so any
// sequence of probes gives the same threshold. Measured at V = 32000, B = 64: plain bisection took 12
// passes, the guided search below ~6 (logits ~ N(0, 2^2), top_p 0.9 or 0.5) and ~11 where the guesses
// miss (N(0, 8^2), top_p 0.3); the whole kernel 1.2-1.4x faster in both cases.
Threshold select_threshold(const float* q, int64_t vocab, float q_max, float lower, bool by_mass, double target,
                           double total, std::vector<float>& candidates) {
  constexpr int kLowBits = 16;
  candidates.resize(vocab);
  uint32_t lo = float_bits(lower), hi = float_bits(q_max) + 1;
  if (by_mass) {  // W(x) >= total - V x, so x = (total - target) / V still has W(x) >= target
    const float floor_value = float((total - target) / double(vocab) * (1.0 - 1e-6));
    lo = std::max(lo, float_bits(floor_value));
  }
  // W(lo) >= target > W(hi) = above. Each pass guesses where W crosses the target by interpolating it
  // linearly over the bits between lo and hi (W(lo) estimated by `total` until measured), and measures W
  // on both sides of the guess: a good guess closes the bracket to the two probes. A pass that does not
  // (the guess was off) is followed by a bisection step, so the bracket at least halves every two passes.
  // Probes 2^16 apart also collect the values between them, for when they close the bracket.
  double above = 0.0, below = total;  // W(hi), W(lo) (an upper bound until measured)
  bool guess = true;
  int64_t count = -1;  // the values in [lo, hi), once collected
  while (hi > lo && hi - lo > (1u << kLowBits)) {
    const uint32_t width = hi - lo;
    if (!guess) {
      const uint32_t mid = lo + width / 2;
      const double w = weight_at_least(q, vocab, bits_float(mid), by_mass);
      if (w >= target) {
        lo = mid, below = w;
      } else {
        hi = mid, above = w;
      }
      guess = true;
      continue;
    }
    const double fraction = std::clamp((below - target) / std::max(below - above, 1e-300), 0.0, 1.0);
    const uint32_t center = lo + uint32_t(fraction * double(width));
    const uint32_t reach = std::max(uint32_t(1u << (kLowBits - 1)), width / 16);
    const uint32_t x1 = center > lo + reach ? center - reach : lo + 1;
    const uint32_t x2 = std::max(x1 + 1, hi - center > reach ? center + reach : hi - 1);
    Probe p{0.0, 0.0, -1};
    if (x2 - x1 <= (1u << kLowBits)) {
      p = probe_collecting(q, vocab, bits_float(x1), bits_float(x2), by_mass, target, candidates.data());
    } else {
      std::tie(p.w1, p.w2) = weights_at_least(q, vocab, bits_float(x1), bits_float(x2), by_mass);
    }
    if (p.w2 >= target) {
      lo = x2, below = p.w2;
    } else if (p.w1 >= target) {
      lo = x1, below = p.w1, hi = x2, above = p.w2;
      count = p.count;
    } else {
      hi = x1, above = p.w1;
    }
    guess = p.w1 >= target && target > p.w2;  // closed on the guess: keep guessing inside
  }
  if (count < 0) count = collect_bits_in(q, vocab, lo, hi, candidates.data());
  return resolve_threshold(candidates.data(), count, lo, hi, above, target, by_mass);
}

// First v, in vocabulary order, whose running sum over {q >= threshold} exceeds u * total (total: their
// sum, known from the search), the blocks' masses summed only up to the one that crosses; the last kept
// token when rounding leaves none.
HOT_LOOP int64_t inverse_cdf(const float* q, int64_t vocab, float threshold, float u, double total) {
  const double target = double(u) * total;
  double running = 0.0;
  int64_t start = 0;
  for (; start < vocab; start += kDrawBlock) {
    const double mass = chunk_weight_at_least(q + start, std::min(kDrawBlock, vocab - start), threshold, true);
    if (running + mass > target) break;
    running += mass;
  }
  for (int64_t v = start; v < vocab; ++v) {
    if (q[v] < threshold) continue;
    running += q[v];
    if (running > target) return v;
  }
  int64_t last = vocab - 1;
  while (last > 0 && q[last] < threshold) --last;
  return last;
}

int64_t first_argmax(const float* q, int64_t vocab) {
  const float m = max_of(q, vocab);
  int64_t v = 0;
  while (v + 1 < vocab && q[v] != m) ++v;
  return v;
}

double log_sum_exp(const std::vector<double>& terms) {
  double top = -std::numeric_limits<double>::infinity();
  for (const double t : terms) top = std::max(top, t);
  if (top == -std::numeric_limits<double>::infinity()) return top;
  double s = 0.0;
  for (const double t : terms) s += std::exp(t - top);
  return top + std::log(s);
}

// ---- one row ----

struct RowScratch {
  std::vector<float> buffer = std::vector<float>(kBlock);
  std::vector<float> q, exps, block_max, candidates;
  std::vector<double> terms;
  std::vector<ExpertStats> stats;
  std::vector<int64_t> active;
};

// One per thread, kept across calls: a fresh one would map and zero its pages on every call (large
// vectors come from mmap).
RowScratch& thread_scratch() {
  thread_local RowScratch scratch;
  return scratch;
}

struct RowInput {
  int64_t num_experts, vocab, stride_k;
  const float* weights;  // (K,) of this row
  float temperature;
  bool logit_mode;
};

// Expert passes (and the prob mode exps). Returns the first active expert with bad logits, or -1.
template <typename scalar_t>
int64_t expert_passes(const scalar_t* row, const RowInput& in, float inv_t, bool store_exps, RowScratch& s) {
  const int64_t blocks = (in.vocab + kBlock - 1) / kBlock;
  s.active.clear();
  for (int64_t k = 0; k < in.num_experts; ++k)
    if (in.weights[k] > 0.0f) s.active.push_back(k);
  s.stats.resize(s.active.size());
  if (store_exps) {
    s.exps.resize(s.active.size() * in.vocab);
    s.block_max.resize(s.active.size() * blocks);
  }
  for (size_t a = 0; a < s.active.size(); ++a) {
    s.stats[a] = expert_pass(row + s.active[a] * in.stride_k, in.vocab, inv_t, in.logit_mode && inv_t != 1.0f,
                             store_exps ? s.exps.data() + a * in.vocab : nullptr,
                             store_exps ? s.block_max.data() + a * blocks : nullptr, s.buffer.data());
    if (s.stats[a].bad) return s.active[a];
  }
  return -1;
}

// log softmax(z_k / T)(token) of active expert a
template <typename scalar_t>
double expert_logprob(const scalar_t* row, const RowInput& in, float inv_t, const RowScratch& s, size_t a,
                      int64_t token) {
  const float z = static_cast<float>(row[s.active[a] * in.stride_k + token]);
  return double(z - s.stats[a].max) * inv_t - s.stats[a].log_sum_tempered;
}

// w_k log_softmax(z_k)(token) summed over active experts: the logit mode mixture logit of a token
template <typename scalar_t>
double mixture_logit(const scalar_t* row, const RowInput& in, const RowScratch& s, int64_t token) {
  double total = 0.0;
  for (size_t a = 0; a < s.active.size(); ++a) {
    const float z = static_cast<float>(row[s.active[a] * in.stride_k + token]);
    total += double(in.weights[s.active[a]]) * (double(z - s.stats[a].max) - s.stats[a].log_sum_plain);
  }
  return total;
}

// Logit mode: q = w-weighted sum of log_softmax(z_k) (one pass per expert); returns its max.
template <typename scalar_t>
float logit_mixture(const scalar_t* row, const RowInput& in, RowScratch& s) {
  for (size_t a = 0; a < s.active.size(); ++a) {
    const scalar_t* z = row + s.active[a] * in.stride_k;
    const float shift = float(double(s.stats[a].max) + s.stats[a].log_sum_plain);
    for (int64_t start = 0; start < in.vocab; start += kBlock) {
      const int64_t len = std::min(kBlock, in.vocab - start);
      block_add_scaled(s.q.data() + start, load_block(z + start, len, s.buffer.data()), len,
                       in.weights[s.active[a]], shift, a == 0);
    }
  }
  return max_of(s.q.data(), in.vocab);
}

// Prob mode: q = sum_k w_k softmax(z_k / T), from the stored exps rescaled per block.
// Block by block, every expert's term in turn: the block of q stays in L1 across the K updates (and gives
// q's sum and max without another pass). Returns {sum, max}.
std::pair<double, float> prob_mixture(const RowInput& in, float inv_t, RowScratch& s) {
  const int64_t blocks = (in.vocab + kBlock - 1) / kBlock;
  s.terms.resize(s.active.size());
  for (size_t a = 0; a < s.active.size(); ++a)
    s.terms[a] = std::log(double(in.weights[s.active[a]])) - s.stats[a].log_sum_tempered;
  double total = 0.0;
  float max = -kInf;
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t start = j * kBlock, len = std::min(kBlock, in.vocab - start);
    for (size_t a = 0; a < s.active.size(); ++a) {
      const double shift = double(s.block_max[a * blocks + j] - s.stats[a].max) * inv_t;
      block_axpy(s.q.data() + start, s.exps.data() + a * in.vocab + start, len,
                 float(std::exp(s.terms[a] + shift)), a == 0);
    }
    block_sum_max(s.q.data() + start, len, &total, &max);
  }
  return {total, max};
}

struct SampleOut {
  int64_t* tokens;
  float* logprobs;
  float* expert_logprobs;
  int64_t* bad;
};

template <typename scalar_t>
void sample_row(const scalar_t* row, const RowInput& in, float top_p, int64_t top_k, float u, int64_t b,
                const SampleOut& out, RowScratch& s) {
  const bool greedy = !(in.temperature > 0.0f);
  const float inv_t = greedy ? 1.0f : 1.0f / in.temperature;
  out.bad[b] = expert_passes(row, in, inv_t, !in.logit_mode, s);
  if (out.bad[b] >= 0) return;
  s.q.resize(in.vocab);
  double log_total = 0.0;  // log of sum of q (prob mode: q is normalised)
  float q_max = 0.0f;       // logit mode: the max of the mixture logits
  double q_sum;             // sum and max of the q the truncation searches
  float q_top;
  if (in.logit_mode) {
    q_max = logit_mixture(row, in, s);
    q_sum = exp_in_place(s.q.data(), in.vocab, q_max, inv_t);
    q_top = max_of(s.q.data(), in.vocab);
    log_total = std::log(q_sum);
  } else {
    std::tie(q_sum, q_top) = prob_mixture(in, inv_t, s);
  }
  int64_t token;
  if (greedy) {
    token = first_argmax(s.q.data(), in.vocab);
  } else {
    float threshold = kSmallestPositive;
    double kept_mass = q_sum;  // of {q >= threshold}
    if (top_k > 0 && top_k < in.vocab) {
      const double positive = weight_at_least(s.q.data(), in.vocab, threshold, false);
      threshold = select_threshold(s.q.data(), in.vocab, q_top, threshold, false, double(top_k), positive,
                                   s.candidates).value;
      kept_mass = weight_at_least(s.q.data(), in.vocab, threshold, true);
    }
    if (top_p < 1.0f) {
      const Threshold kept = select_threshold(s.q.data(), in.vocab, q_top, threshold, true,
                                              double(top_p) * kept_mass, kept_mass, s.candidates);
      threshold = kept.value, kept_mass = kept.weight;
    }
    token = inverse_cdf(s.q.data(), in.vocab, threshold, u, kept_mass);
  }
  out.tokens[b] = token;
  s.terms.clear();
  for (int64_t k = 0; k < in.num_experts; ++k) out.expert_logprobs[b * in.num_experts + k] = -kInf;
  for (size_t a = 0; a < s.active.size(); ++a) {
    const double logp = expert_logprob(row, in, inv_t, s, a, token);
    out.expert_logprobs[b * in.num_experts + s.active[a]] = float(logp);
    s.terms.push_back(std::log(double(in.weights[s.active[a]])) + logp);
  }
  out.logprobs[b] = in.logit_mode ? float((mixture_logit(row, in, s, token) - q_max) * inv_t - log_total)
                                  : float(log_sum_exp(s.terms));
}

// mix_logprobs forward of one row: log pi(token) and its derivatives d log pi(token) / d w_k (0 for w_k = 0).
template <typename scalar_t>
void logprob_row(const scalar_t* row, const RowInput& in, int64_t token, int64_t b, float* logprobs,
                 float* jacobian, int64_t* bad, RowScratch& s) {
  const float inv_t = in.temperature > 0.0f ? 1.0f / in.temperature : 1.0f;
  bad[b] = expert_passes(row, in, inv_t, false, s);
  if (bad[b] >= 0) return;
  float* d_w = jacobian + b * in.num_experts;
  std::fill(d_w, d_w + in.num_experts, 0.0f);
  if (!in.logit_mode) {  // d log pi / d w_k = p_k(token) / pi(token)
    s.terms.clear();
    for (size_t a = 0; a < s.active.size(); ++a)
      s.terms.push_back(expert_logprob(row, in, inv_t, s, a, token));
    std::vector<double> weighted(s.terms);
    for (size_t a = 0; a < s.active.size(); ++a) weighted[a] += std::log(double(in.weights[s.active[a]]));
    const double log_pi = log_sum_exp(weighted);
    logprobs[b] = float(log_pi);
    for (size_t a = 0; a < s.active.size(); ++a) d_w[s.active[a]] = float(std::exp(s.terms[a] - log_pi));
    return;
  }
  // logit mode: d log pi(token) / d w_k = (l_k(token) - E_pi[l_k]) / T, l_k = log_softmax(z_k)
  s.q.resize(in.vocab);
  const float q_max = logit_mixture(row, in, s);
  const double total = exp_in_place(s.q.data(), in.vocab, q_max, inv_t);
  logprobs[b] = float((mixture_logit(row, in, s, token) - q_max) * inv_t - std::log(total));
  for (size_t a = 0; a < s.active.size(); ++a) {
    const scalar_t* z = row + s.active[a] * in.stride_k;
    const float shift = float(double(s.stats[a].max) + s.stats[a].log_sum_plain);
    double expected = 0.0;
    for (int64_t start = 0; start < in.vocab; start += kBlock) {
      const int64_t len = std::min(kBlock, in.vocab - start);
      expected += block_weighted_sum(s.q.data() + start, load_block(z + start, len, s.buffer.data()), len, shift);
    }
    const double l_token = double(static_cast<float>(z[token]) - s.stats[a].max) - s.stats[a].log_sum_plain;
    d_w[s.active[a]] = float((l_token - expected / total) * inv_t);
  }
}

void check_row_args(const at::Tensor& logits, const at::Tensor& weights, const at::Tensor& temperature) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be (K, B, V) with a contiguous last dim");
  TORCH_CHECK(weights.is_contiguous() && weights.scalar_type() == at::kFloat, "weights must be contiguous fp32");
  TORCH_CHECK(temperature.is_contiguous() && temperature.scalar_type() == at::kFloat, "temperature must be fp32");
}

}  // namespace

// Returns (tokens int64 (B,), logprobs fp32 (B,), expert_logprobs fp32 (B, K), bad int64 (B,)).
std::vector<at::Tensor> mix_sample(const at::Tensor& logits, const at::Tensor& weights, const at::Tensor& temperature,
                                   const at::Tensor& top_p, const at::Tensor& top_k, const at::Tensor& seed,
                                   const at::Tensor& offset, bool logit_mode) {
  check_row_args(logits, weights, temperature);
  const int64_t num_experts = logits.size(0), batch = logits.size(1), vocab = logits.size(2);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  auto expert_logprobs = at::empty({batch, num_experts}, logits.options().dtype(at::kFloat));
  auto bad = at::empty({batch}, logits.options().dtype(at::kLong));
  const SampleOut out{tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), expert_logprobs.data_ptr<float>(),
                      bad.data_ptr<int64_t>()};
  const float *w = weights.data_ptr<float>(), *t = temperature.data_ptr<float>(), *p = top_p.data_ptr<float>();
  const int64_t *k = top_k.data_ptr<int64_t>(), *seeds = seed.data_ptr<int64_t>(), *offsets = offset.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mix_sample", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      RowScratch& scratch = thread_scratch();
      for (int64_t b = begin; b < end; ++b) {
        const RowInput in{num_experts, vocab, logits.stride(0), w + b * num_experts, t[b], logit_mode};
        sample_row(base + b * logits.stride(1), in, p[b], k[b], philox_uniform(seeds[b], offsets[b]), b, out,
                   scratch);
      }
    });
  });
  return {tokens, logprobs, expert_logprobs, bad};
}

// Returns (logprobs fp32 (N,), d logprobs / d weights fp32 (N, K), bad int64 (N,)).
std::vector<at::Tensor> mix_logprobs(const at::Tensor& logits, const at::Tensor& weights, const at::Tensor& tokens,
                                     const at::Tensor& temperature, bool logit_mode) {
  check_row_args(logits, weights, temperature);
  const int64_t num_experts = logits.size(0), batch = logits.size(1), vocab = logits.size(2);
  auto logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  auto jacobian = at::empty({batch, num_experts}, logits.options().dtype(at::kFloat));
  auto bad = at::empty({batch}, logits.options().dtype(at::kLong));
  const float *w = weights.data_ptr<float>(), *t = temperature.data_ptr<float>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mix_logprobs", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      RowScratch& scratch = thread_scratch();
      for (int64_t b = begin; b < end; ++b) {
        const RowInput in{num_experts, vocab, logits.stride(0), w + b * num_experts, t[b], logit_mode};
        logprob_row(base + b * logits.stride(1), in, tok[b], b, logprobs.data_ptr<float>(),
                    jacobian.data_ptr<float>(), bad.data_ptr<int64_t>(), scratch);
      }
    });
  });
  return {logprobs, jacobian, bad};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mix_sample", &mix_sample, "fused mixture of experts' distributions, truncation and draw (CPU)");
  m.def("mix_logprobs", &mix_logprobs, "log pi(token) and d log pi(token) / d weights (CPU)");
}
