// y = x @ W^T + b for fp32 on CPU with few rows (a decode step): a weight-streaming GEMM.
//
// With a few rows the multiply is bound by reading W, and MKL's packed sgemm does not keep the memory
// busy (about 15 GB/s at 12 rows on the 2-core dev machine, against 25-33 GB/s that a plain read
// reaches). Here W is packed once into column panels of 32 outputs, each panel K x 32 contiguous, so
// the whole weight is read as one sequential stream, prefetched ahead into L1 and further ahead into L2;
// a micro-kernel keeps up to 12 rows x 32 outputs of accumulators in AVX-512 registers and reuses each
// loaded weight vector for every row. Beyond 12 rows, a panel is walked in slices of 128 k (16 KB, in
// L1) with every 12-row chunk per slice, each chunk prefetching its share of the stream ahead, so the
// weights keep streaming while the later chunks compute.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>

#include <cstdlib>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOPE_AVX512 1
#endif

namespace {

constexpr int64_t kPanel = 32;        // outputs per panel: two 16-float vectors
constexpr int64_t kMaxRows = 12;      // rows per micro-kernel call: 24 accumulators + 2 weight registers
// Software prefetch of the weight stream, in floats ahead: into L1 8 KB ahead and into L2 64 KB ahead.
// Measured: 7-15% faster at 4-12 rows than one L1 prefetch 16 KB ahead (which was 1.4x no prefetch).
constexpr int64_t kPrefetchL1 = 2048;
constexpr int64_t kPrefetchL2 = 16384;
// k per slice of a panel when more than kMaxRows rows share it. Measured (bench/linear.py's set, from
// memory): 12% faster at 32-64 rows, 5-8% at 16-24, same at 128, than each chunk walking the whole panel
// (where only the first chunk's prefetches reached new lines and memory sat idle under the others).
constexpr int64_t kSlice = 128;

#ifdef MOPE_AVX512
// acc (rows x 32) = x[rows, :] @ panel; stores (Accumulate: adds) `cols` (<= 32) outputs per row, plus
// the bias if any. Prefetches into L2 the stream 64 KB ahead of the panel, or (Shared) the two lines at
// ahead + k * ahead_step at step k: a row chunk's share of the stream.
template <int Rows, bool Accumulate, bool Shared>
__attribute__((target("avx512f"))) void micro_kernel(const float* x, int64_t ldx, const float* panel,
                                                     int64_t k_dim, const float* bias, float* y, int64_t ldy,
                                                     int64_t cols, const char* ahead, int64_t ahead_step) {
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
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
#pragma GCC unroll 12
    for (int r = 0; r < Rows; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
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
    _mm512_mask_storeu_ps(yr, mask0, _mm512_add_ps(acc[r][0], y0));
    _mm512_mask_storeu_ps(yr + 16, mask1, _mm512_add_ps(acc[r][1], y1));
  }
}

using MicroKernel = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t,
                             int64_t, const char*, int64_t);
template <bool Accumulate, bool Shared, int... Rows>
constexpr auto micro_kernels(std::integer_sequence<int, Rows...>) {
  return std::array<MicroKernel, sizeof...(Rows)>{&micro_kernel<Rows + 1, Accumulate, Shared>...};
}
// [shared][accumulate][rows - 1]
const std::array<MicroKernel, kMaxRows> kMicroKernels[2][2] = {
    {micro_kernels<false, false>(std::make_integer_sequence<int, kMaxRows>{}),
     micro_kernels<true, false>(std::make_integer_sequence<int, kMaxRows>{})},
    {micro_kernels<false, true>(std::make_integer_sequence<int, kMaxRows>{}),
     micro_kernels<true, true>(std::make_integer_sequence<int, kMaxRows>{})}};
#endif

bool supported() {
#ifdef MOPE_AVX512
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

void check(bool ok, const std::string& message) {
  TORCH_CHECK_VALUE(ok, "packed_linear: ", message);
}

// (N, K) fp32 -> (ceil(N / 32), K, 32): panel p holds outputs 32p .. 32p + 31 (zeros past N). On Linux the
// panels live in transparent huge pages where the kernel grants them: streaming a weight through 4 KB
// pages evicts the whole TLB, and every small op after a GEMM then paid ~20 us of page walks (measured).
torch::Tensor pack_weight(const torch::Tensor& weight) {
  check(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
        "weight must be a 2-D fp32 CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  auto panels_view = padded.view({panels, kPanel, k}).transpose(1, 2);
#ifdef __linux__
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = size_t(panels * kPanel * k) * sizeof(float);
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* memory = nullptr;
  if (bytes >= kHugePage && posix_memalign(&memory, kHugePage, size) == 0) {
    madvise(memory, size, MADV_HUGEPAGE);  // advice only: without THP it is ordinary memory
    auto packed = torch::from_blob(memory, {panels, k, kPanel}, [](void* data) { free(data); }, weight.options());
    packed.copy_(panels_view);
    return packed;
  }
#endif
  return panels_view.contiguous();
}

void check_packed(const torch::Tensor& packed, int64_t k_dim, int64_t out_features, const char* name) {
  check(packed.dim() == 3 && packed.size(2) == kPanel && packed.size(1) == k_dim && packed.is_contiguous()
            && packed.scalar_type() == torch::kFloat32 && (out_features + kPanel - 1) / kPanel == packed.size(0),
        std::string(name) + " must come from pack_weight of an (" + std::to_string(out_features) + ", "
            + std::to_string(k_dim) + ") weight");
}

#ifdef MOPE_AVX512
// y (rows x out_features, row stride ldy) = x (rows x k_dim, contiguous) @ W^T + bias, W as panels.
void gemm(const float* x, int64_t rows, int64_t k_dim, const float* packed, int64_t out_features,
          const float* bias, float* y, int64_t ldy) {
  at::parallel_for(0, (out_features + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min(kPanel, out_features - p * kPanel);
      const int64_t chunks = (rows + kMaxRows - 1) / kMaxRows, slice = chunks == 1 ? k_dim : kSlice;
      for (int64_t k0 = 0; k0 < k_dim; k0 += slice) {
        const int64_t k_len = std::min(slice, k_dim - k0);
        const float* w = packed + (p * k_dim + k0) * kPanel;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t r = c * kMaxRows, share = k_len * kPanel * int64_t(sizeof(float)) / chunks;
          const char* ahead = reinterpret_cast<const char*>(w + kPrefetchL2) + c * share;
          kMicroKernels[chunks > 1][k0 > 0][std::min(kMaxRows, rows - r) - 1](
              x + r * k_dim + k0, k_dim, w, k_len, k0 == 0 && bias ? bias + p * kPanel : nullptr,
              y + r * ldy + p * kPanel, ldy, cols, ahead, share / k_len);
        }
      }
    }
  });
}
#endif

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                            const c10::optional<torch::Tensor>& bias) {
  check(supported(), "this CPU has no AVX-512 (use F.linear)");
  check(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.is_contiguous(),
        "x must be a contiguous 2-D fp32 CPU tensor");
  check_packed(packed, x.size(1), out_features, "packed");
  check(!bias || (bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous()
                  && bias->scalar_type() == torch::kFloat32),
        "bias must be a contiguous (" + std::to_string(out_features) + ",) fp32 tensor");
  auto y = torch::empty({x.size(0), out_features}, x.options());
#ifdef MOPE_AVX512
  gemm(x.data_ptr<float>(), x.size(0), x.size(1), packed.data_ptr<float>(), out_features,
       bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), out_features);
#endif
  return y;
}

// LoRA over a base linear, A folded into the weight: `folded` packs [W; A_0; ..; A_{L-1}] (out + L*width
// rows), so one GEMM gives y = [x W^T + bias | every adapter's shrink]. Then each row adds its own
// adapter's expand, y[n, :out] += shrink[n, a*width : (a+1)*width] @ B_a^T (a = adapter[n]; -1: none),
// with `expand` = pack_weight([B_0 .. B_{L-1}]) and, for panel p, only the columns k_ranges[p, a] =
// [lo, hi) of adapter a's that are nonzero there (a fused projection's B is block-diagonal over its
// shards). Runs of consecutive rows with the same adapter share a micro-kernel call. bias, if any, is
// (out + L*width,), zeros past out. Returns y (N, out + L*width); y[:, :out] is the layer's output.
torch::Tensor packed_lora_linear(const torch::Tensor& x, const torch::Tensor& folded, int64_t out_features,
                                 const c10::optional<torch::Tensor>& bias, const torch::Tensor& adapter,
                                 const torch::Tensor& expand, const torch::Tensor& k_ranges) {
  check(k_ranges.dim() == 3 && k_ranges.size(2) == 2 && k_ranges.scalar_type() == torch::kInt64
            && k_ranges.is_contiguous() && k_ranges.size(0) == (out_features + kPanel - 1) / kPanel,
        "k_ranges must be a contiguous (panels, L, 2) int64 tensor");
  const int64_t num_adapters = k_ranges.size(1), k_all = expand.size(1), width = k_all / num_adapters;
  check(k_all == num_adapters * width, "expand must have L * width columns");
  check_packed(expand, k_all, out_features, "expand");
  auto y = packed_linear(x, folded, out_features + k_all, bias);
  const int64_t rows = x.size(0), ldy = y.size(1);
  check(adapter.dim() == 1 && adapter.size(0) == rows && adapter.scalar_type() == torch::kInt64
            && adapter.is_contiguous(),
        "adapter must be a contiguous (N,) int64 tensor");
  const int64_t* index = adapter.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) check(index[r] >= -1 && index[r] < num_adapters, "adapter out of range");
  const int64_t* ranges = k_ranges.data_ptr<int64_t>();
  for (int64_t i = 0; i < k_ranges.numel(); i += 2)
    check(0 <= ranges[i] && ranges[i] <= ranges[i + 1] && ranges[i + 1] <= width, "k_ranges out of range");
#ifdef MOPE_AVX512
  std::vector<std::array<int64_t, 3>> runs;  // (first row, rows, adapter)
  for (int64_t r = 0; r < rows;) {
    int64_t n = 1;
    while (r + n < rows && n < kMaxRows && index[r + n] == index[r]) ++n;
    if (index[r] >= 0) runs.push_back({r, n, index[r]});
    r += n;
  }
  float* y_data = y.data_ptr<float>();
  const float* shrink = y_data + out_features;
  const float* w_data = expand.data_ptr<float>();
  at::parallel_for(0, expand.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min(kPanel, out_features - p * kPanel);
      for (const auto& [first, n, a] : runs) {
        const int64_t lo = ranges[(p * num_adapters + a) * 2], hi = ranges[(p * num_adapters + a) * 2 + 1];
        if (lo == hi) continue;
        const int64_t k = a * width + lo;
        kMicroKernels[0][1][n - 1](shrink + first * ldy + k, ldy, w_data + (p * k_all + k) * kPanel, hi - lo,
                                   nullptr, y_data + first * ldy + p * kPanel, ldy, cols, nullptr, 0);
      }
    }
  });
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this CPU runs the kernel (AVX-512F)");
  m.def("pack_weight", &pack_weight, "(N, K) fp32 weight -> (ceil(N/32), K, 32) panels");
  m.def("packed_linear", &packed_linear, "x @ W^T + bias from pack_weight's panels", py::arg("x"),
        py::arg("packed"), py::arg("out_features"), py::arg("bias") = py::none());
  m.def("packed_lora_linear", &packed_lora_linear,
        "[x W^T + b + each row's LoRA delta | every adapter's shrink] from the folded [W; A] panels");
}
