// Paged decode attention on CPU: one query token per sequence against its K/V in a paged cache.
//
// A task is one sequence and a run of its kv heads; the G = Hq / Hkv query heads of a kv head share
// every K/V row it reads, so each cached row is loaded once. The context is walked block by block with
// an online softmax (running max m, running sum l, fp32 accumulator), as in flash-decoding. The caches' block dim may
// have any stride (the KV pool hands out strided views); within a block they are contiguous.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "kernel_api.h"
#include "simd_math.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Online-softmax update of `group` query heads (q pre-scaled, fp32) with n cached K/V rows (row i at
// k + i * row_stride): running max, running sum and the fp32 accumulator `acc` (group x head_dim).
// Rows go four at a time: four independent dot products, and one pass over acc per four V rows.
HOT_LOOP void attend_block(const float* q, int64_t group, int64_t head_dim, const float* k, const float* v,
                           int64_t row_stride, int64_t n, float* scores, float* acc, float* running_max,
                           float* running_sum) {
  const int64_t n4 = n - n % 4;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * head_dim;
    for (int64_t t = 0; t < n4; t += 4) {
      const float *k0 = k + t * row_stride, *k1 = k0 + row_stride, *k2 = k1 + row_stride, *k3 = k2 + row_stride;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t d = 0; d < head_dim; ++d) {
        d0 += qg[d] * k0[d];
        d1 += qg[d] * k1[d];
        d2 += qg[d] * k2[d];
        d3 += qg[d] * k3[d];
      }
      scores[t] = d0, scores[t + 1] = d1, scores[t + 2] = d2, scores[t + 3] = d3;
    }
    for (int64_t t = n4; t < n; ++t) {
      const float* kt = k + t * row_stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kt[d];
      scores[t] = dot;
    }
    float new_max = running_max[g];
#pragma omp simd reduction(max : new_max)
    for (int64_t t = 0; t < n; ++t) new_max = scores[t] > new_max ? scores[t] : new_max;
    const float correction = exp_nonpositive(running_max[g] - new_max);  // 0 on the first block
    float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = exp_nonpositive(scores[t] - new_max);
      block_sum += scores[t];
    }
    running_max[g] = new_max;
    running_sum[g] = running_sum[g] * correction + block_sum;
    float* ag = acc + g * head_dim;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) ag[d] *= correction;
    for (int64_t t = 0; t < n4; t += 4) {
      const float *v0 = v + t * row_stride, *v1 = v0 + row_stride, *v2 = v1 + row_stride, *v3 = v2 + row_stride;
      const float p0 = scores[t], p1 = scores[t + 1], p2 = scores[t + 2], p3 = scores[t + 3];
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
    }
    for (int64_t t = n4; t < n; ++t) {
      const float p = scores[t];
      const float* vt = v + t * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * vt[d];
    }
  }
}

// n rows of head_dim values (row i at src + i * row_stride) -> contiguous fp32
template <typename scalar_t>
void rows_to_float(const scalar_t* src, int64_t row_stride, int64_t n, int64_t head_dim, float* dst) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < head_dim; ++d) dst[t * head_dim + d] = static_cast<float>(src[t * row_stride + d]);
}

// n cached rows of num_kv heads (head h of row t at k + t * token_stride + h * head_dim, same for v)
template <typename scalar_t>
struct Rows {
  const scalar_t* k;
  const scalar_t* v;
  int64_t n, num_kv;
};

// One sequence, kv heads [0, num_kv) of the pointers given: walk the sequence's blocks once, each block
// for all those heads (a block's rows are contiguous across heads, so the walk streams through memory),
// then write acc / sum for their num_kv * group query heads. `after`: the first block of the thread's
// next task, fetched while this task's last block computes.
template <typename scalar_t>
void decode_kv_heads(const scalar_t* q, int64_t q_head_stride, const scalar_t* k_cache, const scalar_t* v_cache,
                     int64_t k_block_stride, int64_t v_block_stride, int64_t token_stride,
                     const int32_t* block_table, int64_t length,
                     int64_t block_size, int64_t num_kv, int64_t group, int64_t head_dim, float scale,
                     scalar_t* out, std::vector<float>& buffer, const Rows<scalar_t>& after) {
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const int64_t rows = num_kv * group;  // query heads served
  const int64_t converted = is_float ? 0 : 2 * block_size * head_dim;  // K and V rows of a block, in fp32
  buffer.assign(2 * rows * head_dim + block_size + 2 * rows + converted, 0.0f);
  float* q_f = buffer.data();
  float* acc = q_f + rows * head_dim;
  float* scores = acc + rows * head_dim;
  float* running_max = scores + block_size;
  float* running_sum = running_max + rows;
  float* k_f = running_sum + rows;
  float* v_f = k_f + block_size * head_dim;
  std::fill(running_max, running_max + rows, -std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < head_dim; ++d) q_f[r * head_dim + d] = static_cast<float>(q[r * q_head_stride + d]) * scale;

  constexpr int64_t line = 64 / sizeof(scalar_t);  // elements per cache line
  for (int64_t start = 0; start < length; start += block_size) {
    const int64_t n = std::min(block_size, length - start);
    const int64_t block = block_table[start / block_size];
    // blocks are scattered, so the hardware prefetcher cannot guess the next one: fetch it (each head's
    // rows of it while that head computes on this one, rather than all at once: 8% faster than one burst
    // at B = 12, 128 tokens, with the caches evicted). Measured with the caches flushed between layers, as
    // in a model step: 5-15% faster at B=32 and B=8, 2x at B=1, than no prefetch.
    // After the last block, the next task's first block: 3-5% faster at B = 12 and 32, same at B = 4.
    const bool has_next = start + block_size < length;
    const int64_t next = has_next ? block_table[start / block_size + 1] : 0;
    const Rows<scalar_t> fetch = has_next ? Rows<scalar_t>{k_cache + next * k_block_stride,
                                                          v_cache + next * v_block_stride,
                                                          std::min(block_size, length - start - block_size), num_kv}
                                          : after;
    for (int64_t h = 0; h < num_kv; ++h) {
      const int64_t r = h * group, k_offset = block * k_block_stride + h * head_dim,
                    v_offset = block * v_block_stride + h * head_dim;
      for (int64_t t = 0; h < fetch.num_kv && t < fetch.n; ++t)
        for (int64_t i = 0; i < head_dim; i += line) {
          __builtin_prefetch(fetch.k + t * token_stride + h * head_dim + i);
          __builtin_prefetch(fetch.v + t * token_stride + h * head_dim + i);
        }
      if constexpr (is_float) {
        attend_block(q_f + r * head_dim, group, head_dim, k_cache + k_offset, v_cache + v_offset, token_stride, n,
                     scores, acc + r * head_dim, running_max + r, running_sum + r);
      } else {
        rows_to_float(k_cache + k_offset, token_stride, n, head_dim, k_f);
        rows_to_float(v_cache + v_offset, token_stride, n, head_dim, v_f);
        attend_block(q_f + r * head_dim, group, head_dim, k_f, v_f, head_dim, n, scores, acc + r * head_dim,
                     running_max + r, running_sum + r);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv_sum = 1.0f / running_sum[r];
    for (int64_t d = 0; d < head_dim; ++d) out[r * head_dim + d] = static_cast<scalar_t>(acc[r * head_dim + d] * inv_sum);
  }
}

}  // namespace

// q (B, Hq, D) last dim contiguous; k_cache, v_cache (num_blocks, block_size, Hkv, D), contiguous
// within a block, each block dim with its own stride; block_tables (B, max_blocks) int32, last dim
// contiguous; context_lens (B,) int32. Shapes and dtypes checked by the caller.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  context_lens = context_lens.contiguous();  // read as lens[b] (a strided view read the wrong lengths)
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  auto out = torch::empty({batch, num_heads, head_dim}, q.options());
  if (batch == 0) return out;  // (the task split below divides by the batch)
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t num_blocks = k_cache.size(0), capacity = block_tables.size(1) * block_size;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 1 && lens[b] <= capacity, "context_lens must be in [1, max_blocks * block_size = ",
                      capacity, "], got ", lens[b], " for sequence ", b);
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int32_t block = tables[b * table_stride + i];
      TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, "block_tables holds block ids outside [0, num_blocks=",
                        num_blocks, ") in its used entries: ", block, " for sequence ", b);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t q_stride_b = q.stride(0), q_stride_h = q.stride(1);
    const int64_t k_block_stride = k_cache.stride(0), v_block_stride = v_cache.stride(0);
    const int64_t token_stride = k_cache.stride(1);
    // a task = one sequence and a run of its kv heads: whole sequences when the batch alone feeds every
    // thread (4 tasks each), else the heads split as finely as needed
    const int64_t splits = std::min(num_kv_heads, (4 * at::get_num_threads() + batch - 1) / batch);
    const int64_t heads_per_task = (num_kv_heads + splits - 1) / splits;
    const int64_t tasks_per_seq = (num_kv_heads + heads_per_task - 1) / heads_per_task;
    at::parallel_for(0, batch * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      // task -> its sequence, first kv head and number of kv heads
      const auto split = [&](int64_t task) {
        const int64_t kv_head = task % tasks_per_seq * heads_per_task;
        return std::tuple{task / tasks_per_seq, kv_head, std::min(heads_per_task, num_kv_heads - kv_head)};
      };
      for (int64_t task = begin; task < end; ++task) {
        const auto [b, kv_head, num_kv] = split(task);
        Rows<scalar_t> after{nullptr, nullptr, 0, 0};
        if (task + 1 < end) {
          const auto [next_b, next_head, next_kv] = split(task + 1);
          const int64_t first = tables[next_b * table_stride], head = next_head * head_dim;
          after = {k_ptr + first * k_block_stride + head, v_ptr + first * v_block_stride + head,
                   std::min<int64_t>(block_size, lens[next_b]), next_kv};
        }
        const int64_t first_head = kv_head * group;
        decode_kv_heads<scalar_t>(q_ptr + b * q_stride_b + first_head * q_stride_h, q_stride_h,
                                  k_ptr + kv_head * head_dim, v_ptr + kv_head * head_dim, k_block_stride,
                                  v_block_stride, token_stride, tables + b * table_stride, lens[b], block_size,
                                  num_kv, group, head_dim, static_cast<float>(scale),
                                  out_ptr + (b * num_heads + first_head) * head_dim, buffer, after);
      }
    });
  });
  return out;
}

constexpr int64_t kStoreRowsPerTask = 8;  // new tokens per store_kv task

// dst = src, bytes long. An aligned row of whole 64-byte lines goes by streaming stores (SSE2, part of
// x86-64): a store that misses must first read its line in, and the cache slots of a step's new tokens
// are scattered and cold, so those reads dominated store_kv (measured below, in `store_kv`).
void copy_row(char* dst, const char* src, int64_t bytes) {
#ifdef MOPE_X86
  if (bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t i = 0; i < bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// k_cache[slot // block_size, slot % block_size] = k[n] for each new token n, same for v: one copy of
// each (token, kv head) row. k, v (N, Hkv, D) and the caches contiguous in their last dim.
void store_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == torch::kInt64 &&
                        slot_mapping.is_contiguous(),
                    "slot_mapping must be a contiguous (N,) int64 tensor, got ", slot_mapping.sizes(), " ",
                    slot_mapping.scalar_type());
  const int64_t rows = slot_mapping.size(0);
  for (const auto& [t, cache, name] : {std::tuple{&k, &k_cache, "k"}, std::tuple{&v, &v_cache, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && cache->dim() == 4 && t->size(0) == rows && t->size(1) == cache->size(2) &&
                          t->size(2) == cache->size(3) && t->scalar_type() == cache->scalar_type() &&
                          t->stride(2) == 1 && cache->stride(3) == 1,
                      name, " must be (N=", rows, ", Hkv, D) with its cache's (blocks, block_size, Hkv, D), dtype and a ",
                      "contiguous last dim, got ", t->sizes(), " ", t->scalar_type(), " and cache ", cache->sizes(), " ",
                      cache->scalar_type());
  }
  // slots are checked against k_cache's geometry: v_cache must share it, or v's rows land outside v_cache
  TORCH_CHECK_VALUE(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1),
                    "v_cache must have k_cache's (blocks, block_size) = (", k_cache.size(0), ", ", k_cache.size(1),
                    "), got ", v_cache.sizes());
  const int64_t block_size = k_cache.size(1), capacity = k_cache.size(0) * block_size;
  const int64_t heads = k.size(1), row_bytes = k.size(2) * k.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n)
    TORCH_CHECK_VALUE(slots[n] >= 0 && slots[n] < capacity, "slot_mapping[", n, "] = ", slots[n],
                      " is outside the cache's [0, ", capacity, ") slots");
  // rows split over the threads (each store waits on memory); cold at B = 32: 44 us -> 30 us by streaming
  // stores alone, measured with random slots in a 100 MB cache
  at::parallel_for(0, rows, kStoreRowsPerTask, [&](int64_t begin, int64_t end) {
    for (const auto& [t, cache] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
      const auto* src = static_cast<const char*>(t->data_ptr());
      auto* dst = static_cast<char*>(cache->data_ptr());
      const int64_t size = t->element_size();
      for (int64_t n = begin; n < end; ++n) {
        const int64_t block = slots[n] / block_size, offset = slots[n] % block_size;
        for (int64_t h = 0; h < heads; ++h)
          copy_row(dst + (block * cache->stride(0) + offset * cache->stride(1) + h * cache->stride(2)) * size,
                   src + (n * t->stride(0) + h * t->stride(1)) * size, row_bytes);
      }
    }
#ifdef MOPE_X86
    _mm_sfence();  // this thread's streaming stores, before the attention that reads them
#endif
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("store_kv", &store_kv, "k_cache, v_cache [slot] = k, v (paged cache write)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (q, k_cache, v_cache, block_tables, context_lens, scale) -> out");
  static const mope::AttentionApi api{&store_kv, &paged_decode_attention};
  m.attr("api") = mope::api_capsule(api);
}
