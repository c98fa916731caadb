// Paged decode attention on CPU: one query token per sequence against its K/V in a paged cache.
//
// One task per (sequence, kv head): the task's G = Hq / Hkv query heads share every K/V row it reads,
// so each cached row is loaded once. The context is walked block by block with an online softmax
// (running max m, running sum l, fp32 accumulator), as in flash-decoding. The caches' block dim may
// have any stride (the KV pool hands out strided views); within a block they are contiguous.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode_one_kv_head(const scalar_t* q, int64_t q_head_stride, const scalar_t* k_cache, const scalar_t* v_cache,
                        int64_t block_stride, int64_t token_stride, const int32_t* block_table, int64_t length,
                        int64_t block_size, int64_t group, int64_t head_dim, float scale, scalar_t* out,
                        int64_t out_head_stride, std::vector<float>& buffer) {
  // buffer layout: q_f (group * head_dim) | acc (group * head_dim) | scores (group * block_size)
  buffer.assign(group * (2 * head_dim + block_size), 0.0f);
  float* q_f = buffer.data();
  float* acc = q_f + group * head_dim;
  float* scores = acc + group * head_dim;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) q_f[g * head_dim + d] = static_cast<float>(q[g * q_head_stride + d]) * scale;
  std::vector<float> running_max(group, -std::numeric_limits<float>::infinity());
  std::vector<float> running_sum(group, 0.0f);

  for (int64_t start = 0; start < length; start += block_size) {
    const int64_t block = block_table[start / block_size];
    const int64_t n = std::min(block_size, length - start);
    const scalar_t* k_block = k_cache + block * block_stride;
    const scalar_t* v_block = v_cache + block * block_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q_f + g * head_dim;
      float* s = scores + g * block_size;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* k = k_block + t * token_stride;
        float dot = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
        s[t] = dot;
        block_max = std::max(block_max, dot);
      }
      const float new_max = std::max(running_max[g], block_max);
      const float correction = std::exp(running_max[g] - new_max);  // exp(-inf) = 0 on the first block
      running_max[g] = new_max;
      float* ag = acc + g * head_dim;
      float block_sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - new_max);
        block_sum += s[t];
      }
      running_sum[g] = running_sum[g] * correction + block_sum;
      for (int64_t d = 0; d < head_dim; ++d) ag[d] *= correction;
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* v = v_block + t * token_stride;
        const float p = s[t];
        for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * static_cast<float>(v[d]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv_sum = 1.0f / running_sum[g];
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * out_head_stride + d] = static_cast<scalar_t>(acc[g * head_dim + d] * inv_sum);
  }
}

}  // namespace

// q (B, Hq, D) last dim contiguous; k_cache, v_cache (num_blocks, block_size, Hkv, D), contiguous
// within a block; block_tables (B, max_blocks) int32; context_lens (B,) int32. Checked by the caller.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(k_cache.stride(0) == v_cache.stride(0), "k_cache and v_cache must share their block stride");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  auto out = torch::empty({batch, num_heads, head_dim}, q.options());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t q_stride_b = q.stride(0), q_stride_h = q.stride(1);
    const int64_t block_stride = k_cache.stride(0), token_stride = k_cache.stride(1);
    at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_kv_heads, kv_head = task % num_kv_heads;
        const int64_t first_head = kv_head * group;
        decode_one_kv_head<scalar_t>(q_ptr + b * q_stride_b + first_head * q_stride_h, q_stride_h,
                                     k_ptr + kv_head * head_dim, v_ptr + kv_head * head_dim, block_stride,
                                     token_stride, tables + b * table_stride, lens[b], block_size, group, head_dim,
                                     static_cast<float>(scale), out_ptr + (b * num_heads + first_head) * head_dim,
                                     head_dim, buffer);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (q, k_cache, v_cache, block_tables, context_lens, scale) -> out");
}
