// The small ops of a decoder layer between its GEMMs, fp32 on CPU, each one pass over its rows.
//
// In a decode step these tensors are a few rows. Done as torch ops they are ~30 dispatches per layer
// (F.rms_norm alone is six on CPU), and each one right after a weight-streaming GEMM finds its inputs
// evicted from L1/L2. Here each op reads its rows once and writes new tensors (no input is modified).
// Each op splits its rows over torch's threads once there are a few tasks' worth (kRowsPerTask for
// rms_norm and rotary, fewer for the exps of silu_mul): at B = 32 they ran on the calling thread while
// the other core waited for the next GEMM.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "kernel_api.h"
#include "simd_math.h"

#include <cmath>

namespace {

constexpr int64_t kRowsPerTask = 16;      // rms_norm, rotary: ~2-4 us per 16 rows
constexpr int64_t kSiluRowsPerTask = 4;   // silu_mul: ~4.5 us per 4 rows of 3072

void check_rows(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim && t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.stride(-1) == 1,
                    name, " must be a ", dim, "-D float32 CPU tensor contiguous in its last dim, got ", t.sizes(),
                    " ", t.scalar_type(), " strides ", t.strides());
}

HOT_LOOP void rms_norm_row(const float* x, const float* residual, const float* weight, int64_t hidden, float eps,
                           float* out, float* sum) {
  float squares = 0.0f;
  if (residual != nullptr) {
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) {
      const float s = x[i] + residual[i];
      sum[i] = s;
      squares += s * s;
    }
    x = sum;
  } else {
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) squares += x[i] * x[i];
  }
  const float inv_rms = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = x[i] * inv_rms * weight[i];
}

// (norm(x) or norm(x + residual), x + residual) per row; `sum` is empty without a residual.
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                    const std::optional<torch::Tensor>& residual) {
  check_rows(x, "x", 2);
  check_rows(weight, "weight", 1);
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == hidden, "weight must have ", hidden, " entries (x's last dim), got ",
                    weight.size(0));
  if (residual) {
    check_rows(*residual, "residual", 2);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                      residual->sizes());
  }
  auto out = torch::empty({rows, hidden}, x.options());
  auto sum = residual ? torch::empty({rows, hidden}, x.options()) : torch::Tensor();
  const float* x_ptr = x.data_ptr<float>();
  const float* r_ptr = residual ? residual->data_ptr<float>() : nullptr;
  float* sum_ptr = residual ? sum.data_ptr<float>() : nullptr;
  const int64_t x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      rms_norm_row(x_ptr + n * x_stride, r_ptr ? r_ptr + n * r_stride : nullptr, weight.data_ptr<float>(), hidden,
                   static_cast<float>(eps), out.data_ptr<float>() + n * hidden,
                   sum_ptr ? sum_ptr + n * hidden : nullptr);
  });
  return {out, sum};
}

HOT_LOOP void silu_mul_row(const float* gate, const float* up, int64_t size, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    const float g = gate[i];
    const float e = exp_nonpositive(-std::fabs(g));  // sigmoid(g) from exp(-|g|): no overflow
    const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);  // one division
    out[i] = g * sigmoid * up[i];
  }
}

// (N, 2I) [gate | up] -> (N, I) silu(gate) * up
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, "gate_up must have an even last dim ([gate | up]), got ",
                    gate_up.size(1));
  const int64_t rows = gate_up.size(0), size = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({rows, size}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  at::parallel_for(0, rows, kSiluRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      silu_mul_row(in + n * stride, in + n * stride + size, size, out.data_ptr<float>() + n * size);
  });
  return out;
}

HOT_LOOP void rotate_heads(const float* x, int64_t head_stride, int64_t heads, const float* cos, const float* sin,
                           int64_t half, float* out) {
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * head_stride;
    float* oh = out + h * 2 * half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      oh[i] = a * cos[i] - b * sin[i];
      oh[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

// Rotate-half rope of q (N, Hq, D) and k (N, Hk, D) by cos, sin (N, D/2) -> new contiguous q, k.
std::vector<torch::Tensor> rotary(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                  const torch::Tensor& sin) {
  check_rows(q, "q", 3);
  check_rows(k, "k", 3);
  const int64_t rows = q.size(0), head_dim = q.size(2), half = head_dim / 2;
  TORCH_CHECK_VALUE(k.size(0) == rows && k.size(2) == head_dim && head_dim % 2 == 0,
                    "q and k must be (N, H, D) with one N and one even D, got ", q.sizes(), " and ", k.sizes());
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK_VALUE(t->sizes() == torch::IntArrayRef({rows, half}) && t->is_contiguous() &&
                          t->scalar_type() == torch::kFloat32,
                      "cos and sin must be contiguous float32 (", rows, ", ", half, "), got ", t->sizes(), " ",
                      t->scalar_type());
  }
  auto q_out = torch::empty(q.sizes(), q.options()), k_out = torch::empty(k.sizes(), k.options());
  const int64_t hq = q.size(1), hk = k.size(1);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* c = cos.data_ptr<float>() + n * half;
      const float* s = sin.data_ptr<float>() + n * half;
      rotate_heads(q.data_ptr<float>() + n * q.stride(0), q.stride(1), hq, c, s, half,
                   q_out.data_ptr<float>() + n * hq * head_dim);
      rotate_heads(k.data_ptr<float>() + n * k.stride(0), k.stride(1), hk, c, s, half,
                   k_out.data_ptr<float>() + n * hk * head_dim);
    }
  });
  return {q_out, k_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "(norm(x [+ residual]) * weight, x + residual or an empty tensor)");
  m.def("silu_mul", &silu_mul, "(N, 2I) [gate | up] -> silu(gate) * up");
  m.def("rotary", &rotary, "rotate-half rope of q and k -> new q, k");
  static const mope::DecoderOpsApi api{&rms_norm, &silu_mul, &rotary};
  m.attr("api") = mope::api_capsule(api);
}
