// y = x @ W^T + b for fp32 on CPU with few rows (a decode step): a weight-streaming GEMM.
//
// With a few rows the multiply is bound by reading W, and MKL's packed sgemm does not keep the memory
// busy (about 15 GB/s at 12 rows on the 2-core dev machine, against 25-33 GB/s that a plain read
// reaches). Here W is packed once into column panels of 32 outputs, each panel K x 32 contiguous, so
// the whole weight is read as one sequential stream, prefetched ahead into L1 and further ahead into L2;
// a micro-kernel keeps up to 12 rows x 32 outputs of accumulators in AVX-512 registers and reuses each
// loaded weight vector for every row (up to 12 rows, x packed k-major first). Beyond 12 rows, a panel is
// walked in slices of 128 k (16 KB, in L1) with every 12-row chunk per slice, each chunk prefetching its
// share of the stream ahead, so the weights keep streaming while the later chunks compute. Up to 12 rows,
// the outputs go out by non-temporal stores. LoRA adapters ride along: their A factors as extra panels,
// their expands added inside the micro-kernel.
//
// CPUs without AVX-512 (AMD Zen 2/3, older Intel) take an AVX2 + FMA form over the same panels: with 16
// vector registers a micro-kernel holds 6 rows x 16 outputs (half a panel), so every row count walks each
// panel in L1-sized slices of kSlice k, the slice's 6-row chunks and halves each in turn, the first from
// the stream and the others from L1 (MKL's packed sgemm reached 2.5-5 GB/s there, bench/README.md).
#include <torch/extension.h>

#include "kernel_api.h"

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOPE_X86 1
#endif

namespace {

constexpr int64_t kPanel = 32;        // outputs per panel: two 16-float vectors
constexpr int64_t kMaxRows = 12;      // rows per micro-kernel call: 24 accumulators + 2 weight registers
constexpr int64_t kAvx2Rows = 6;      // AVX2: 6 rows x 16 outputs = 12 accumulators + 2 weights + 1 broadcast
constexpr int64_t kHalf = 16;         // AVX2: outputs per micro-kernel call (two 8-float vectors)
constexpr int64_t kSpanRows = 4;      // AVX-512: rows per LoRA expand span (a third of a chunk)
// Software prefetch of the weight stream, in floats ahead: into L1 8 KB ahead and into L2 64 KB ahead.
// Measured: 7-15% faster at 4-12 rows than one L1 prefetch 16 KB ahead (which was 1.4x no prefetch).
constexpr int64_t kPrefetchL1 = 2048;
constexpr int64_t kPrefetchL2 = 16384;
// k per slice of a panel when more than kMaxRows rows share it. Measured (bench/linear.py's set, from
// memory): 12% faster at 32-64 rows, 5-8% at 16-24, same at 128, than each chunk walking the whole panel
// (where only the first chunk's prefetches reached new lines and memory sat idle under the others).
constexpr int64_t kSlice = 128;

#ifdef MOPE_X86
// A LoRA expand span a micro-kernel adds after its panel: k_len steps, each a k-major row of kMaxRows
// shrink values in x (zero for the rows of other adapters) times a row of 32 expand outputs in w, for the
// chunk's rows first_row .. first_row + span_rows() - 1 (x starts at first_row).
struct Span {
  const float* x;
  const float* w;
  int64_t k_len;
  int64_t first_row;
};

// x[r] of k-major step xk in all 16 lanes. With UseQuad, rows 0-3 come from `quad` (xk[0..3] in each 128-bit
// lane: one 16-byte load) by an in-lane shuffle instead of a broadcast load each: at 4-12 rows the loads
// (two of weights and one per row for each 128 weight bytes) hold the weight stream back more than the
// shuffles' port (which also issues half the FMAs) does. Measured from memory (bench/README.md, decode-size
// linear): 4 rows 4-6% faster, 12 rows 2-4%. Not below 4 rows (slower), nor for rows 4-11 too (8 or 12
// shuffles: 10-15% slower at 12 rows).
template <bool UseQuad>
__attribute__((target("avx512f"), always_inline)) inline __m512 row_value(const float* xk, __m512 quad, int r) {
  if (UseQuad && r < 4) {
    switch (r) {
      case 0: return _mm512_permute_ps(quad, 0x00);
      case 1: return _mm512_permute_ps(quad, 0x55);
      case 2: return _mm512_permute_ps(quad, 0xAA);
      default: return _mm512_permute_ps(quad, 0xFF);
    }
  }
  return _mm512_set1_ps(xk[r]);
}

// acc[First ..] += the span's rows (up to kSpanRows of them) times its expand rows
template <int Rows, int First>
__attribute__((target("avx512f"), always_inline)) inline void add_span(__m512 (&acc)[Rows][2], const Span& span) {
  constexpr int kCount = std::min<int>(kSpanRows, Rows - First);
  if constexpr (kCount > 0) {
    for (int64_t k = 0; k < span.k_len; ++k) {
      const float* w = span.w + k * kPanel;
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
      const float* xk = span.x + k * kMaxRows;
      const __m512 quad = kCount == 4 ? _mm512_broadcast_f32x4(_mm_loadu_ps(xk)) : _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int r = 0; r < kCount; ++r) {
        const __m512 xr = row_value<(kCount == 4)>(xk, quad, r);
        acc[First + r][0] = _mm512_fmadd_ps(xr, w0, acc[First + r][0]);
        acc[First + r][1] = _mm512_fmadd_ps(xr, w1, acc[First + r][1]);
      }
    }
  }
}

// acc (rows x 32) = x[rows, :] @ panel + the spans; stores (Accumulate: adds) `cols` (<= 32) outputs per
// row, plus the bias if any. x is row-major (row r at x + r * ldx) or (KMajor) k-major, kMaxRows values
// per k (`pack_rows`). Prefetches into L2 the stream 64 KB ahead of the panel, or (Shared) the two lines
// at ahead + k * ahead_step at step k: a row chunk's share of the stream.
//
// With Stream, a row's full, 64-byte aligned 32 outputs go out by non-temporal stores. An ordinary store
// first reads its line (the weight stream has long evicted y from the caches), one line per row and 16
// outputs: at 12 rows, 24 scattered reads per panel that take the fill buffers the weight stream needs.
// Measured (48 llama-160m projections from C++): 12 rows 16% faster, 4 rows 7%, 1 row the same; the
// caller fences (_mm_sfence) before another thread reads y.
template <int Rows, bool Accumulate, bool Shared, bool KMajor, bool Stream = false>
__attribute__((target("avx512f"))) void micro_kernel(const float* x, int64_t ldx, const float* panel, int64_t k_dim,
                                                     const Span* spans, int64_t num_spans, const float* bias, float* y,
                                                     int64_t ldy, int64_t cols, const char* ahead, int64_t ahead_step) {
  constexpr bool kQuad = KMajor && Rows >= 4;
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  // the spans' expand rows into L2 now, to be there after the panel: fetched in their loop, they came from
  // memory a line at a time (bench/README.md, LoRA experts)
  for (const Span* span = spans; span < spans + num_spans; ++span)
    if (span == spans || span->w != span[-1].w)  // an adapter's rows in several groups share w
      for (int64_t i = 0; i < span->k_len * kPanel; i += 16)
        _mm_prefetch(reinterpret_cast<const char*>(span->w + i), _MM_HINT_T1);
  for (int64_t k = 0; k < k_dim; ++k) {
    const float* w = panel + k * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchL1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchL1 + 16), _MM_HINT_T0);
    if constexpr (Shared) {
      _mm_prefetch(ahead + k * ahead_step, _MM_HINT_T1);
      _mm_prefetch(ahead + k * ahead_step + 64, _MM_HINT_T1);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchL2), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchL2 + 16), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const float* xk = KMajor ? x + k * kMaxRows : nullptr;
    const __m512 quad = kQuad ? _mm512_broadcast_f32x4(_mm_loadu_ps(xk)) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int r = 0; r < Rows; ++r) {
      const __m512 xr = KMajor ? row_value<kQuad>(xk, quad, r) : _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  static_assert(kMaxRows == 3 * kSpanRows);
  for (const Span* span = spans; span < spans + num_spans; ++span) {
    switch (span->first_row) {
      case 0: add_span<Rows, 0>(acc, *span); break;
      case kSpanRows: add_span<Rows, kSpanRows>(acc, *span); break;
      default: add_span<Rows, 2 * kSpanRows>(acc, *span); break;
    }
  }
  const __mmask16 mask0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 mask1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < Rows; ++r) {
    float* yr = y + r * ldy;
    const __m512 y0 = Accumulate ? _mm512_maskz_loadu_ps(mask0, yr) : b0;
    const __m512 y1 = Accumulate ? _mm512_maskz_loadu_ps(mask1, yr + 16) : b1;
    if (Stream && cols == kPanel && (reinterpret_cast<uintptr_t>(yr) & 63) == 0) {
      _mm512_stream_ps(yr, _mm512_add_ps(acc[r][0], y0));
      _mm512_stream_ps(yr + 16, _mm512_add_ps(acc[r][1], y1));
    } else {
      _mm512_mask_storeu_ps(yr, mask0, _mm512_add_ps(acc[r][0], y0));
      _mm512_mask_storeu_ps(yr + 16, mask1, _mm512_add_ps(acc[r][1], y1));
    }
  }
}

using MicroKernel = void (*)(const float*, int64_t, const float*, int64_t, const Span*, int64_t, const float*, float*,
                             int64_t, int64_t, const char*, int64_t);
template <bool Accumulate, bool Shared, bool KMajor, bool Stream, int... Rows>
constexpr std::array<MicroKernel, kMaxRows> micro_kernels(std::integer_sequence<int, Rows...>) {
  return {&micro_kernel<Rows + 1, Accumulate, Shared, KMajor, Stream>...};
}
constexpr auto kRowCounts = std::make_integer_sequence<int, kMaxRows>{};
// [stream][rows - 1]: a GEMM of at most kMaxRows rows, over k-major x
const std::array<MicroKernel, kMaxRows> kKMajorKernels[2] = {micro_kernels<false, false, true, false>(kRowCounts),
                                                             micro_kernels<false, false, true, true>(kRowCounts)};
// [accumulate][rows - 1]: a row chunk of a larger GEMM, per slice (accumulating after the first)
const std::array<MicroKernel, kMaxRows> kSlicedKernels[2] = {micro_kernels<false, true, false, false>(kRowCounts),
                                                             micro_kernels<true, true, false, false>(kRowCounts)};

// The AVX2 + FMA micro-kernel: outputs half*16 .. half*16 + 15 of a panel's k_len steps from `panel`, for
// Rows (<= 6) rows of x (row r, step k at x[r * ldx + k], or KMajor at x[k * kMaxRows + r]), plus the
// spans (their x k-major); stores (Accumulate: adds) `cols` (<= 16) outputs per row, plus the bias if any.
// Prefetches at step k into L2 a line of the stream at ahead + k * ahead_step (this pass's share of it), and
// into L1 this half's line kPrefetchL1 ahead (measured 10-15% faster at 1-12 rows than L2 alone).
template <int Rows, bool Accumulate, bool KMajor>
__attribute__((target("avx2,fma"))) void half_kernel(const float* x, int64_t ldx, const float* panel, int64_t k_len,
                                                     const Span* spans, int64_t num_spans, int half,
                                                     const float* bias, float* y, int64_t ldy, int64_t cols,
                                                     const char* ahead, int64_t ahead_step) {
  __m256 acc[Rows][2];  // every loop over r unrolled: else GCC keeps acc in memory, storing it every step
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* w = panel + half * kHalf;
  for (int64_t k = 0; k < k_len; ++k) {
    _mm_prefetch(ahead + k * ahead_step, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kPanel + kPrefetchL1), _MM_HINT_T0);  // this half's line
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel), w1 = _mm256_loadu_ps(w + k * kPanel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < Rows; ++r) {
      const __m256 xr = _mm256_broadcast_ss(KMajor ? x + k * kMaxRows + r : x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  for (const Span* span = spans; span < spans + num_spans; ++span) {
    const float* sw = span->w + half * kHalf;
    for (int64_t k = 0; k < span->k_len; ++k) {  // one stream across panels: fetch the next panels' spans
      _mm_prefetch(reinterpret_cast<const char*>(sw + k * kPanel + kPrefetchL1), _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(sw + k * kPanel), w1 = _mm256_loadu_ps(sw + k * kPanel + 8);
#pragma GCC unroll 6
      for (int r = 0; r < Rows; ++r) {
        const __m256 xr = _mm256_broadcast_ss(span->x + k * kMaxRows + r);
        acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
      }
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), lane);
  const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols) - 8), lane);
  const __m256 b0 = bias ? _mm256_maskload_ps(bias, mask0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_maskload_ps(bias + 8, mask1) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) {
    float* yr = y + r * ldy;
    const __m256 y0 = Accumulate ? _mm256_maskload_ps(yr, mask0) : b0;
    const __m256 y1 = Accumulate ? _mm256_maskload_ps(yr + 8, mask1) : b1;
    _mm256_maskstore_ps(yr, mask0, _mm256_add_ps(acc[r][0], y0));
    _mm256_maskstore_ps(yr + 8, mask1, _mm256_add_ps(acc[r][1], y1));
  }
}

using HalfKernel = void (*)(const float*, int64_t, const float*, int64_t, const Span*, int64_t, int, const float*,
                            float*, int64_t, int64_t, const char*, int64_t);
template <bool Accumulate, bool KMajor, int... Rows>
constexpr std::array<HalfKernel, kAvx2Rows> half_kernels(std::integer_sequence<int, Rows...>) {
  return {&half_kernel<Rows + 1, Accumulate, KMajor>...};
}
constexpr auto kAvx2RowCounts = std::make_integer_sequence<int, kAvx2Rows>{};
// [accumulate][k_major][rows - 1]
const std::array<HalfKernel, kAvx2Rows> kHalfKernels[2][2] = {
    {half_kernels<false, false>(kAvx2RowCounts), half_kernels<false, true>(kAvx2RowCounts)},
    {half_kernels<true, false>(kAvx2RowCounts), half_kernels<true, true>(kAvx2RowCounts)}};
#endif

enum class Isa { kNone, kAvx2, kAvx512 };

// The best this CPU runs; MOPE_DISABLE_AVX512=1 in the environment stops at AVX2 (as in mix_sample)
Isa best_isa() {
#ifdef MOPE_X86
  if (__builtin_cpu_supports("avx512f") && std::getenv("MOPE_DISABLE_AVX512") == nullptr) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kNone;
}

Isa active_isa = best_isa();  // set_isa: the tests run every form this CPU has

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "none";
}

bool supported() {
  return active_isa != Isa::kNone;
}

// The forms this CPU runs, best first (an Isa runs every form below it)
std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (int(isa) <= int(best_isa())) isas.push_back(isa);
  return isas;
}

void set_isa(const std::string& name) {
  std::string runnable;
  for (Isa isa : runnable_isas()) {
    if (name == isa_name(isa)) {
      active_isa = isa;
      return;
    }
    runnable += std::string(runnable.empty() ? "" : ", ") + isa_name(isa);
  }
  TORCH_CHECK_VALUE(false, "packed_linear: instruction set ", name, " is not one this CPU runs (", runnable, ")");
}

// Rows per micro-kernel chunk: the unit of the LoRA shrink's k-major layout (`Expand`)
int64_t chunk_rows() {
  return active_isa == Isa::kAvx512 ? kMaxRows : kAvx2Rows;
}

void check(bool ok, const std::string& message) {
  TORCH_CHECK_VALUE(ok, "packed_linear: ", message);
}

// An uninitialised fp32 CPU tensor for a packed weight. On Linux, from 2 MB on, it lives in transparent huge
// pages, its last one included: streaming a weight through 4 KB pages evicts the whole TLB (every small op
// after a GEMM then paid ~20 us of page walks), and each 4 KB page of the stream costs time of its own. Fresh
// mmap'd memory, advised before its first touch: memory from malloc may come back already touched in 4 KB
// pages, which the advice does not turn into huge ones (measured: 58-77% of the llama-160m projections'
// bytes were in huge pages that way, depending on what the process allocated before, 100% this way; the
// GEMMs 6-10% faster where it was 65%; rounding the tail up costs at most 2 MB a weight, 9% at llama-160m's
// sizes, <1% at 7B's; bench/README.md).
torch::Tensor packed_empty(torch::IntArrayRef sizes) {
  const auto options = torch::dtype(torch::kFloat32);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * sizeof(float);
  if (bytes >= kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage, mapped = rounded + kHugePage;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      char* const start = static_cast<char*>(base);
      char* const aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1));
      if (aligned > start) munmap(start, aligned - start);  // keep only the aligned, rounded range
      if (aligned + rounded < start + mapped) munmap(aligned + rounded, start + mapped - (aligned + rounded));
      madvise(aligned, rounded, MADV_HUGEPAGE);  // advice only: without THP it is ordinary memory
      return torch::from_blob(aligned, sizes, [aligned, rounded](void*) { munmap(aligned, rounded); }, options);
    }
  }
#endif
  return torch::empty(sizes, options);
}

// (N, K) fp32 -> (ceil(N / 32), K, 32): panel p holds outputs 32p .. 32p + 31 (zeros past N).
torch::Tensor pack_weight(const torch::Tensor& weight) {
  check(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
        "weight must be a 2-D fp32 CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  auto packed = packed_empty({panels, k, kPanel});
  packed.copy_(padded.view({panels, kPanel, k}).transpose(1, 2));
  return packed;
}

void check_k_ranges(const torch::Tensor& k_ranges, int64_t out_features, int64_t width) {
  check(k_ranges.dim() == 3 && k_ranges.size(2) == 2 && k_ranges.scalar_type() == torch::kInt64
            && k_ranges.is_contiguous() && k_ranges.size(0) == (out_features + kPanel - 1) / kPanel,
        "k_ranges must be a contiguous (panels, L, 2) int64 tensor");
  const int64_t* ranges = k_ranges.data_ptr<int64_t>();
  for (int64_t i = 0; i < k_ranges.numel(); i += 2)
    check(0 <= ranges[i] && ranges[i] <= ranges[i + 1] && ranges[i + 1] <= width, "k_ranges out of range");
}

// Where each (panel p, adapter a) span of pack_expand's rows starts, at [p * L + a]; the last entry is
// their total
std::vector<int64_t> span_offsets(const torch::Tensor& k_ranges) {
  const int64_t spans = k_ranges.numel() / 2;
  const int64_t* ranges = k_ranges.data_ptr<int64_t>();
  std::vector<int64_t> offsets(spans + 1, 0);
  for (int64_t i = 0; i < spans; ++i) offsets[i + 1] = offsets[i] + ranges[2 * i + 1] - ranges[2 * i];
  return offsets;
}

// The LoRA expand factors side by side, B = [B_0 .. B_{L-1}] (N, L * width) -> for each 32-output panel p
// and adapter a in turn, only its columns k_ranges[p, a] = [lo, hi), as (hi - lo) rows of 32 outputs:
// (sum of hi - lo, 32). A fused projection's B is block-diagonal over its shards, so most columns of a
// panel are zero; laid out densely, the micro-kernel's spans walk one stream of just the nonzeros, in
// order (half the memory; on its own measured no faster than the zeros in place, bench/README.md).
torch::Tensor pack_expand(const torch::Tensor& weight, const torch::Tensor& k_ranges) {
  check(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
        "weight must be a 2-D fp32 CPU tensor");
  const int64_t n = weight.size(0), num_adapters = k_ranges.size(1), width = weight.size(1) / num_adapters;
  check(num_adapters > 0 && weight.size(1) == num_adapters * width, "weight must have L * width columns");
  check_k_ranges(k_ranges, n, width);
  const auto w = weight.contiguous();
  const int64_t* ranges = k_ranges.data_ptr<int64_t>();
  auto packed = packed_empty({span_offsets(k_ranges).back(), kPanel});
  float* out = packed.data_ptr<float>();
  const float* src = w.data_ptr<float>();
  for (int64_t p = 0; p < k_ranges.size(0); ++p)
    for (int64_t a = 0; a < num_adapters; ++a)
      for (int64_t k = ranges[(p * num_adapters + a) * 2]; k < ranges[(p * num_adapters + a) * 2 + 1]; ++k, out += kPanel)
        for (int64_t j = 0; j < kPanel; ++j)
          out[j] = p * kPanel + j < n ? src[(p * kPanel + j) * weight.size(1) + a * width + k] : 0.0f;
  return packed;
}

void check_packed(const torch::Tensor& packed, int64_t k_dim, int64_t out_features, const char* name) {
  check(packed.dim() == 3 && packed.size(2) == kPanel && packed.size(1) == k_dim && packed.is_contiguous()
            && packed.scalar_type() == torch::kFloat32 && out_features >= 0  // (-31..-1 round to 0 panels)
            && (out_features + kPanel - 1) / kPanel == packed.size(0),
        std::string(name) + " must come from pack_weight of an (" + std::to_string(out_features) + ", "
            + std::to_string(k_dim) + ") weight");
}

#ifdef MOPE_X86
// x's rows (at most kMaxRows) k-major: xk[k * kMaxRows + r] = x[r, k]. The micro-kernel's broadcasts then
// read one sequential stream instead of one per row: with a whole panel per call (up to 12 KB of each row
// between reuses) the row streams fell out of L1. Measured from memory, bench/linear.py's projection set:
// 3-5% faster at 12 rows, 2% at 4. (Beyond 12 rows a panel goes in 16 KB slices that stay in L1, and
// packing x measured 3% slower at 32 rows: those take x as it is.)
void pack_rows(const float* x, int64_t rows, int64_t k_dim, float* xk) {
  for (int64_t k = 0; k < k_dim; ++k)
    for (int64_t r = 0; r < rows; ++r) xk[k * kMaxRows + r] = x[r * k_dim + k];
}

// Threads for `work` items: torch's pool, at most one per item (one inside a parallel region)
int region_threads(int64_t work) {
#ifdef _OPENMP
  return at::in_parallel_region() ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work)));
#else
  return 1;
#endif
}

// body(thread) on `threads` threads: one OpenMP region, whose threads may meet at `#pragma omp barrier`.
template <typename Body>
void in_parallel(int threads, const Body& body) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num());
#else
  body(0);
#endif
}

// [begin, end): thread t's part of n items
std::pair<int64_t, int64_t> thread_range(int64_t n, int t, int threads) {
  const int64_t each = (n + threads - 1) / threads;
  return {std::min(n, t * each), std::min(n, (t + 1) * each)};
}

// Panels [begin, end) shared by the threads of a region: each thread takes the panels of its own contiguous
// run in order (one weight stream), then, once its run is done, single panels from the end of the run with
// the most left. With fixed runs, whichever core the machine slowed held up the call while the other sat
// idle: measured 0.2-4.7 ms of waiting per 48 projections at 4-32 rows (bench/README.md, decode-size linear).
class PanelQueue {
 public:
  PanelQueue(int64_t begin, int64_t end, int threads) : runs_(threads) {
    for (int t = 0; t < threads; ++t) {
      const auto [first, last] = thread_range(end - begin, t, threads);
      runs_[t].range.store(pack(begin + first, begin + last));
    }
  }

  // The next panel for thread t; -1 when every panel is taken
  int64_t next(int t) {
    const int64_t own = take(runs_[t], true);
    if (own >= 0) return own;
    while (true) {
      Run* victim = nullptr;
      uint64_t most = 0;
      for (Run& run : runs_) {
        const uint64_t range = run.range.load(std::memory_order_relaxed), next = range >> 32, end = range & kMask;
        if (end > next && end - next > most) {
          most = end - next;
          victim = &run;
        }
      }
      if (victim == nullptr) return -1;
      const int64_t stolen = take(*victim, false);
      if (stolen >= 0) return stolen;
    }
  }

 private:
  static constexpr uint64_t kMask = 0xffffffffu;
  struct alignas(64) Run {
    std::atomic<uint64_t> range{0};  // next << 32 | end
  };
  std::vector<Run> runs_;

  static uint64_t pack(int64_t next, int64_t end) { return uint64_t(next) << 32 | uint64_t(end); }

  // The run's first (front) or last panel, taken; -1 when it has none left
  static int64_t take(Run& run, bool front) {
    uint64_t range = run.range.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t next = range >> 32, end = range & kMask;
      if (next >= end) return -1;
      if (run.range.compare_exchange_weak(range, front ? pack(next + 1, end) : pack(next, end - 1)))
        return int64_t(front ? next : end - 1);
    }
  }
};

// Rows per LoRA expand span: the AVX-512 micro-kernel adds a span to a group of kSpanRows rows (a chunk's
// rows of one adapter, where they sit together: a third of the arithmetic at 12 rows), the AVX2 one to its
// whole chunk
int64_t span_rows() {
  return active_isa == Isa::kAvx512 ? kSpanRows : kAvx2Rows;
}

// Row groups of span_rows() per chunk
int64_t span_groups() {
  return chunk_rows() / span_rows();
}

// The LoRA expand of a GEMM's panels: per chunk c, the shrink values k-major with each row's own adapter's
// columns only (masked + c * L * width * kMaxRows), and per panel and adapter the span of expand rows
// (pack_expand's `w`, starting at offsets[p * L + a]) with its first column ranges[...].
struct Expand {
  const float* masked;
  const float* w;
  const int64_t* ranges;
  const int64_t* offsets;
  const char* used;  // [(c * span_groups() + g) * L + a]: whether row group g of chunk c has rows of adapter a
  int64_t num_adapters, width;

  // The spans of chunk c at panel p (into `spans`, L * span_groups() of room; returned count)
  int64_t spans_of(int64_t c, int64_t p, Span* spans) const {
    const int64_t groups = span_groups();
    int64_t n = 0;
    for (int64_t a = 0; a < num_adapters; ++a) {
      const int64_t block = p * num_adapters + a, k_len = offsets[block + 1] - offsets[block];
      for (int64_t g = 0; g < groups && k_len > 0; ++g) {
        if (!used[(c * groups + g) * num_adapters + a]) continue;
        const int64_t first_row = g * span_rows();
        spans[n++] = {masked + (c * num_adapters * width + a * width + ranges[2 * block]) * kMaxRows + first_row,
                      w + offsets[block] * kPanel, k_len, first_row};
      }
    }
    return n;
  }
};

// Thread t's panels from `queue` of y = x (rows x k_dim) @ W^T + bias (+ the expand), W as panels; panel
// p's outputs (at most col_limit - 32p) go to y + 32p - first_col. xk: x packed by pack_rows when rows <=
// kMaxRows. With `stream` (y is the call's result, not read again in it), up to kMaxRows rows go out by
// non-temporal stores, fenced before the thread returns.
void gemm_panels(const float* x, const float* xk, int64_t rows, int64_t k_dim, const float* packed, PanelQueue& queue,
                 int t, int64_t col_limit, const float* bias, float* y, int64_t ldy, int64_t first_col,
                 const Expand* expand, bool stream) {
  if (rows == 0) return;
  const bool avx2 = active_isa == Isa::kAvx2;
  const int64_t per_chunk = chunk_rows(), chunks = (rows + per_chunk - 1) / per_chunk;
  const int halves = avx2 ? 2 : 1;  // an AVX2 micro-kernel takes half a panel
  const bool k_major = rows <= kMaxRows;
  std::vector<Span> spans(expand ? expand->num_adapters * span_groups() : 0);
  for (int64_t p = queue.next(t); p >= 0; p = queue.next(t)) {
    const int64_t cols = std::min(kPanel, col_limit - p * kPanel);
    const float* panel_bias = bias ? bias + p * kPanel : nullptr;
    float* y_panel = y + p * kPanel - first_col;
    if (chunks == 1 && !avx2) {
      const int64_t n = expand ? expand->spans_of(0, p, spans.data()) : 0;
      kKMajorKernels[stream][rows - 1](xk, 0, packed + p * k_dim * kPanel, k_dim, spans.data(), n, panel_bias, y_panel,
                                       ldy, cols, nullptr, 0);
      continue;
    }
    // k_dim = 0 still takes one (empty) slice: it writes the bias, or zeros
    for (int64_t k0 = 0; k0 < std::max<int64_t>(k_dim, 1); k0 += kSlice) {
      const int64_t k_len = std::min(kSlice, k_dim - k0), passes = chunks * halves;
      const float* w = packed + (p * k_dim + k0) * kPanel;
      const int64_t share = k_len * kPanel * int64_t(sizeof(float)) / passes;
      const int64_t ahead_step = share / std::max<int64_t>(k_len, 1);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t r = c * per_chunk, chunk = std::min(per_chunk, rows - r);
        const int64_t n = expand && k0 + k_len == k_dim ? expand->spans_of(c, p, spans.data()) : 0;
        const float* rows_at = k_major ? xk + k0 * kMaxRows + r : x + r * k_dim + k0;
        for (int half = 0; half < halves; ++half) {
          const char* ahead = reinterpret_cast<const char*>(w + kPrefetchL2) + (c * halves + half) * share;
          if (!avx2) {
            kSlicedKernels[k0 > 0][chunk - 1](rows_at, k_dim, w, k_len, spans.data(), n,
                                              k0 == 0 ? panel_bias : nullptr, y_panel + r * ldy, ldy, cols, ahead,
                                              ahead_step);
            continue;
          }
          const int64_t half_cols = std::min(kHalf, cols - half * kHalf);
          if (half_cols <= 0) continue;
          kHalfKernels[k0 > 0][k_major][chunk - 1](rows_at, k_dim, w, k_len, spans.data(), n, half,
                                                   k0 == 0 && panel_bias ? panel_bias + half * kHalf : nullptr,
                                                   y_panel + r * ldy + half * kHalf, ldy, half_cols, ahead,
                                                   ahead_step);
        }
      }
    }
  }
  if (stream && !avx2) _mm_sfence();
}

// x packed for the micro-kernels by this thread: k-major up to kMaxRows rows, else x itself
const float* rows_for_kernel(const float* x, int64_t rows, int64_t k_dim) {
  if (rows > kMaxRows) return x;
  thread_local std::vector<float> k_major;
  k_major.resize(k_dim * kMaxRows);
  pack_rows(x, rows, k_dim, k_major.data());
  return k_major.data();
}

// y (rows x out_features, row stride ldy) = x (rows x k_dim, contiguous) @ W^T + bias, W as panels.
void gemm(const float* x, int64_t rows, int64_t k_dim, const float* packed, int64_t out_features,
          const float* bias, float* y, int64_t ldy) {
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  const int threads = region_threads(panels);
  PanelQueue queue(0, panels, threads);
  in_parallel(threads, [&](int t) {
    const float* xk = rows_for_kernel(x, rows, k_dim);  // each thread its own: a few us, and no barrier
    gemm_panels(x, xk, rows, k_dim, packed, queue, t, out_features, bias, y, ldy, 0, nullptr, true);
  });
}
#endif

// x, the packed weight `name` (packed_outputs rows) and the bias (out_features,), as the GEMMs take them
void check_gemm_args(const torch::Tensor& x, const torch::Tensor& packed, int64_t packed_outputs, const char* name,
                     const c10::optional<torch::Tensor>& bias, int64_t out_features) {
  check(supported(), "this CPU has neither AVX-512 nor AVX2 with FMA (use F.linear)");
  check(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.is_contiguous(),
        "x must be a contiguous 2-D fp32 CPU tensor");
  check_packed(packed, x.size(1), packed_outputs, name);
  check(!bias || (bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous()
                  && bias->scalar_type() == torch::kFloat32),
        "bias must be a contiguous (" + std::to_string(out_features) + ",) fp32 tensor");
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                            const c10::optional<torch::Tensor>& bias) {
  check_gemm_args(x, packed, out_features, "packed", bias, out_features);
  auto y = torch::empty({x.size(0), out_features}, x.options());
#ifdef MOPE_X86
  gemm(x.data_ptr<float>(), x.size(0), x.size(1), packed.data_ptr<float>(), out_features,
       bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), out_features);
#endif
  return y;
}

// LoRA over a base linear, A folded into the weight: `folded` packs [W; A_0; ..; A_{L-1}] (out + L*width
// rows). Row n gets y[n] = x[n] W^T + bias + shrink[n, a*width : (a+1)*width] @ B_a^T, a = adapter[n] (-1:
// none), shrink = x @ [A_0; ..]^T, B_a over the columns k_ranges[p, a] of each panel p, `expand` =
// pack_expand(B, k_ranges). One parallel region: the threads compute the shrink panels (the last of
// `folded`), meet, and then each its run of W's panels, every panel's expand spans added in the
// micro-kernel (no second pass over y). bias, if any, is (out,).
torch::Tensor packed_lora_linear(const torch::Tensor& x, const torch::Tensor& folded, int64_t out_features,
                                 const c10::optional<torch::Tensor>& bias, const torch::Tensor& adapter,
                                 const torch::Tensor& expand, const torch::Tensor& k_ranges, int64_t width) {
  check(k_ranges.dim() == 3 && k_ranges.size(1) > 0, "k_ranges must be a (panels, L, 2) tensor");
  const int64_t num_adapters = k_ranges.size(1), k_all = num_adapters * width, total = out_features + k_all;
  check_k_ranges(k_ranges, out_features, width);
  const int64_t* ranges = k_ranges.data_ptr<int64_t>();
  const int64_t panels = k_ranges.size(0);
  const std::vector<int64_t> offsets = span_offsets(k_ranges);
  check(expand.dim() == 2 && expand.size(0) == offsets.back() && expand.size(1) == kPanel && expand.is_contiguous()
            && expand.scalar_type() == torch::kFloat32,
        "expand must come from pack_expand of the expand factors with these k_ranges");
  check_gemm_args(x, folded, total, "folded", bias, out_features);
  const int64_t rows = x.size(0), k_dim = x.size(1);
  check(adapter.dim() == 1 && adapter.size(0) == rows && adapter.scalar_type() == torch::kInt64
            && adapter.is_contiguous(),
        "adapter must be a contiguous (N,) int64 tensor");
  const int64_t* index = adapter.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) check(index[r] >= -1 && index[r] < num_adapters, "adapter out of range");
  auto y = torch::empty({rows, out_features}, x.options());
#ifdef MOPE_X86
  const int64_t per_chunk = chunk_rows(), chunks = (rows + per_chunk - 1) / per_chunk;
  std::vector<char> used(chunks * span_groups() * num_adapters, 0);
  for (int64_t r = 0; r < rows; ++r)  // row group r / span_rows() is group g of chunk c
    if (index[r] >= 0) used[r / span_rows() * num_adapters + index[r]] = 1;
  // the shrink: the panels of `folded` from the one holding output row out_features on
  const int64_t first_shrink = out_features / kPanel, shrink_panels = (total + kPanel - 1) / kPanel - first_shrink;
  const int64_t ld_shrink = shrink_panels * kPanel, shrink_col = out_features - first_shrink * kPanel;
  std::vector<float> shrink(rows * ld_shrink);
  const float *x_data = x.data_ptr<float>(), *packed = folded.data_ptr<float>();
  const int threads = region_threads(panels);
  PanelQueue shrink_queue(first_shrink, first_shrink + shrink_panels, threads), queue(0, panels, threads);
  in_parallel(threads, [&](int t) {
    const float* xk = rows_for_kernel(x_data, rows, k_dim);
    gemm_panels(x_data, xk, rows, k_dim, packed, shrink_queue, t, total, nullptr, shrink.data(), ld_shrink,
                first_shrink * kPanel, nullptr, false);
#pragma omp barrier
    thread_local std::vector<float> masked;  // this thread's: chunks x k_all x kMaxRows
    masked.assign(chunks * k_all * kMaxRows, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = index[r] * width; index[r] >= 0 && j < (index[r] + 1) * width; ++j)
        masked[(r / per_chunk * k_all + j) * kMaxRows + r % per_chunk] = shrink[r * ld_shrink + shrink_col + j];
    const Expand lora{masked.data(), expand.data_ptr<float>(), ranges, offsets.data(), used.data(), num_adapters, width};
    gemm_panels(x_data, xk, rows, k_dim, packed, queue, t, out_features, bias ? bias->data_ptr<float>() : nullptr,
                y.data_ptr<float>(), out_features, 0, &lora, true);
  });
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this CPU runs the kernel (AVX-512F, or AVX2 and FMA)");
  m.def("isa", [] { return std::string(isa_name(active_isa)); }, "the instruction set the kernels run now");
  m.def("isas", [] {
    std::vector<std::string> names;
    for (Isa isa : runnable_isas()) names.push_back(isa_name(isa));
    return names;
  }, "the instruction sets this CPU runs, best first");
  m.def("set_isa", &set_isa, "run the kernels in this instruction set (one of isas()): for tests", py::arg("name"));
  m.def("pack_weight", &pack_weight, "(N, K) fp32 weight -> (ceil(N/32), K, 32) panels");
  m.def("packed_linear", &packed_linear, "x @ W^T + bias from pack_weight's panels", py::arg("x"),
        py::arg("packed"), py::arg("out_features"), py::arg("bias") = py::none());
  m.def("pack_expand", &pack_expand, "LoRA expand factors (N, L * width) -> their nonzero column spans per panel");
  m.def("packed_lora_linear", &packed_lora_linear,
        "[x W^T + b + each row's LoRA delta | every adapter's shrink] from the folded [W; A] panels");
  static const mope::LinearApi api{&packed_linear, &packed_lora_linear};
  m.attr("api") = mope::api_capsule(api);
}
