// A decode step's decoder layers and final norm, of one model or of several, as one call: the same kernels,
// in the same order and on the same tensors as engine/model.py's layers (bit-identical output), without
// Python between them, and several models side by side on the cores (decode_layers below).
//
// A decode step makes ~12 kernel calls per layer. From Python each costs ~2 us warm but ~30 us right
// after a weight-streaming GEMM has evicted the interpreter's objects, and the other core spins meanwhile:
// perf put ~24% of the main thread outside the kernels at 4 rows (bench/README.md, decode layers in C++).
// The kernels live in three extension modules; their entry points come in as capsules (kernel_api.h).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "kernel_api.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

namespace {

namespace py = pybind11;

// One projection: pack_weight's panels (plain linear), or the folded [W; A] panels with the expand of
// pack_lora_expand (LoRA: each row's adapter is the call's adapter_index), as packed_linear.py checked them.
struct Projection {
  torch::Tensor panels;
  int64_t out_features;
  std::optional<torch::Tensor> bias, expand, k_ranges;
  int64_t width;
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  std::optional<torch::Tensor> q_norm, k_norm;  // Qwen3's per-head norms, both or neither
  Projection qkv, o, gate_up, down;
};

template <typename Api>
const Api& api_of(const py::capsule& capsule) {
  const char* name = capsule.name();
  TORCH_CHECK_VALUE(name != nullptr && std::strcmp(name, Api::kName) == 0, "expected the capsule ", Api::kName,
                    ", got ", name == nullptr ? "an unnamed one" : name, " (a stale build: rebuild the extensions)");
  return *static_cast<const Api*>(capsule.get_pointer());
}

void check_same_layout(const torch::Tensor& cache, const torch::Tensor& first, size_t layer, const char* name) {
  TORCH_CHECK_VALUE(cache.sizes() == first.sizes() && cache.strides() == first.strides() &&
                        cache.scalar_type() == first.scalar_type() && cache.device() == first.device(),
                    "layer ", layer, "'s ", name, " must have layer 0's shape, strides, dtype and device (",
                    first.sizes(), " ", first.strides(), "), got ", cache.sizes(), " ", cache.strides());
}

// One model's decode step: x (N, hidden) embedded tokens, one per sequence; cos, sin (N, D/2); kv_caches per
// layer, layer 0's checked by kernels/decode_layers.py and every other layer's against it (check_call);
// adapter_index (N,) int64: each row's adapter in the LoRA projections (checked by their kernel).
struct Call {
  torch::Tensor x, cos, sin;
  std::vector<Layer> layers;
  torch::Tensor final_norm;
  double eps;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> kv_caches;
  torch::Tensor slot_mapping, block_tables, context_lens;
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;
  std::optional<torch::Tensor> adapter_index = std::nullopt;
};

void check_call(const Call& call) {
  const auto& caches = call.kv_caches;
  TORCH_CHECK_VALUE(!call.layers.empty() && caches.size() == call.layers.size(), "need one (k, v) cache per layer ",
                    "and at least one layer, got ", caches.size(), " caches for ", call.layers.size(), " layers");
  TORCH_CHECK_VALUE(call.x.dim() == 2, "x must be (N, hidden), got ", call.x.sizes());
  for (size_t i = 1; i < caches.size(); ++i) {
    check_same_layout(caches[i].first, caches[0].first, i, "k_cache");
    check_same_layout(caches[i].second, caches[0].second, i, "v_cache");
  }
  const int64_t q_size = call.num_heads * call.head_dim, kv_size = call.num_kv_heads * call.head_dim;
  for (size_t i = 0; i < call.layers.size(); ++i) {
    const Layer& layer = call.layers[i];
    TORCH_CHECK_VALUE(layer.qkv.out_features == q_size + 2 * kv_size, "layer ", i, "'s qkv projection must ",
                      "have ", q_size, " + 2 x ", kv_size, " outputs (q | k | v), got ", layer.qkv.out_features);
    for (const Projection* p : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down})
      TORCH_CHECK_VALUE(!p->expand || call.adapter_index, "layer ", i, " has a LoRA projection: the call needs ",
                        "adapter_index");
  }
}

struct Kernels {
  const mope::LinearApi& linear;
  const mope::DecoderOpsApi& ops;
  const mope::AttentionApi& attention;
};

// The layers and the final norm of one call -> its hidden state (N, hidden)
torch::Tensor run_layers(const Kernels& kernels, const Call& call) {
  const auto& [linear_api, ops, attention] = kernels;
  const int64_t rows = call.x.size(0), head_dim = call.head_dim;
  const int64_t q_size = call.num_heads * head_dim, kv_size = call.num_kv_heads * head_dim;
  const double eps = call.eps;
  auto linear = [&](const torch::Tensor& in, const Projection& p) {
    if (!p.expand) return linear_api.linear(in, p.panels, p.out_features, p.bias);
    return linear_api.lora_linear(in, p.panels, p.out_features, p.bias, *call.adapter_index, *p.expand, *p.k_ranges,
                                  p.width);
  };
  auto head_norm = [&](const torch::Tensor& t, const torch::Tensor& weight) {  // over (N, H, D) as rows of D
    return ops.rms_norm(t.reshape({-1, head_dim}), weight, eps, std::nullopt)[0].view(t.sizes());
  };
  torch::Tensor hidden = call.x, residual;
  for (size_t i = 0; i < call.layers.size(); ++i) {
    const Layer& layer = call.layers[i];
    torch::Tensor normed;
    if (residual.defined()) {
      auto out = ops.rms_norm(hidden, layer.input_norm, eps, residual);
      normed = out[0], residual = out[1];
    } else {
      normed = ops.rms_norm(hidden, layer.input_norm, eps, std::nullopt)[0], residual = hidden;
    }
    const torch::Tensor qkv = linear(normed, layer.qkv);
    torch::Tensor q = qkv.narrow(1, 0, q_size).view({rows, call.num_heads, head_dim});
    torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({rows, call.num_kv_heads, head_dim});
    const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, call.num_kv_heads, head_dim});
    if (layer.q_norm) q = head_norm(q, *layer.q_norm), k = head_norm(k, *layer.k_norm);
    auto rotated = ops.rotary(q, k, call.cos, call.sin);
    torch::Tensor k_cache = call.kv_caches[i].first, v_cache = call.kv_caches[i].second;
    attention.store_kv(rotated[1], v, k_cache, v_cache, call.slot_mapping);
    const torch::Tensor attended = attention.paged_decode_attention(rotated[0], k_cache, v_cache, call.block_tables,
                                                                    call.context_lens, call.scale);
    auto post = ops.rms_norm(linear(attended.view({rows, q_size}), layer.o), layer.post_norm, eps, residual);
    residual = post[1];
    hidden = linear(ops.silu_mul(linear(post[0], layer.gate_up)), layer.down);
  }
  return ops.rms_norm(hidden, call.final_norm, eps, residual)[0];
}

// The bytes a call reads: its weights and its cached keys and values (its time, near enough: the steps are
// bound by reading them).
double call_bytes(const Call& call) {
  double bytes = 0;
  for (const Layer& layer : call.layers)
    for (const Projection* p : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down})
      bytes += p->panels.nbytes() + (p->expand ? p->expand->nbytes() : 0);
  const torch::Tensor lens = call.context_lens.contiguous();
  const int32_t* len = lens.data_ptr<int32_t>();
  const double token_bytes = 2.0 * call.num_kv_heads * call.head_dim * call.kv_caches[0].first.element_size();
  for (int64_t i = 0; i < lens.numel(); ++i) bytes += len[i] * token_bytes * call.layers.size();
  return bytes;
}

// The order of the calls (indices into `bytes`) in rounds: a round of `threads` calls runs side by side, a
// call per thread (the kernels inside on that thread alone: no fork, join or barrier per op, and one model's
// attention overlaps another's GEMMs; 4 llama-160m models' layers measured 4-9% faster at 4-32 rows,
// bench/README.md), a round of one call on all threads. Largest first; side by side only while a round's
// smallest call is within kBalance of its largest: the thread of a smaller call waits for the larger one,
// and alone on all threads each would take about half its one-thread time (a LoRA group's 12 rows beside a
// 4-row model of the same shape measured 5% slower side by side than one after another).
std::vector<std::vector<int64_t>> plan_rounds(const std::vector<double>& bytes, int64_t threads) {
  constexpr double kBalance = 0.85;
  std::vector<int64_t> order(bytes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return bytes[a] > bytes[b]; });
  std::vector<std::vector<int64_t>> rounds;
  for (size_t next = 0; next < order.size();) {
    const size_t left = order.size() - next;
    const bool together = threads > 1 && left >= size_t(threads) &&
                          bytes[order[next + threads - 1]] >= kBalance * bytes[order[next]];
    const size_t size = together ? threads : 1;
    rounds.emplace_back(order.begin() + next, order.begin() + next + size);
    next += size;
  }
  return rounds;
}

// The hidden state of each call, the calls run in the rounds of plan_rounds. Calls running together must not
// share K/V blocks (the engine's models never do: each (sequence, model) track has its own).
std::vector<torch::Tensor> decode_layers(const py::capsule& linear_capsule, const py::capsule& ops_capsule,
                                         const py::capsule& attention_capsule, const std::vector<Call>& calls) {
  const Kernels kernels{api_of<mope::LinearApi>(linear_capsule), api_of<mope::DecoderOpsApi>(ops_capsule),
                        api_of<mope::AttentionApi>(attention_capsule)};
  for (const Call& call : calls) check_call(call);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  std::vector<double> bytes;
  for (const Call& call : calls) bytes.push_back(call_bytes(call));
  std::vector<torch::Tensor> hidden(calls.size());
  py::gil_scoped_release no_gil;  // nothing below touches a Python object
  for (const auto& round : plan_rounds(bytes, threads)) {
    if (round.size() == 1) {
      hidden[round[0]] = run_layers(kernels, calls[round[0]]);
      continue;
    }
    std::vector<std::exception_ptr> errors(round.size());
#pragma omp parallel for num_threads(threads)
    for (size_t i = 0; i < round.size(); ++i) {
      try {
        hidden[round[i]] = run_layers(kernels, calls[round[i]]);
      } catch (...) {  // nothing may leave an OpenMP region
        errors[i] = std::current_exception();
      }
    }
    for (const auto& error : errors)
      if (error) std::rethrow_exception(error);
  }
  return hidden;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Projection>(m, "Projection")
      .def(py::init<torch::Tensor, int64_t, std::optional<torch::Tensor>, std::optional<torch::Tensor>,
                    std::optional<torch::Tensor>, int64_t>(),
           py::arg("panels"), py::arg("out_features"), py::arg("bias"), py::arg("expand") = py::none(),
           py::arg("k_ranges") = py::none(), py::arg("width") = 0);
  py::class_<Layer>(m, "Layer")
      .def(py::init<torch::Tensor, torch::Tensor, std::optional<torch::Tensor>, std::optional<torch::Tensor>,
                    Projection, Projection, Projection, Projection>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"));
  py::class_<Call>(m, "Call")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, std::vector<Layer>, torch::Tensor, double,
                    std::vector<std::pair<torch::Tensor, torch::Tensor>>, torch::Tensor, torch::Tensor, torch::Tensor,
                    int64_t, int64_t, int64_t, double>())
      .def_readwrite("adapter_index", &Call::adapter_index);
  m.def("decode_layers", &decode_layers, "each call's decoder layers and final norm -> its hidden state (N, hidden)");
  m.def("plan_rounds", &plan_rounds, "the calls' order in rounds (side by side, or one on all threads) from their bytes",
        py::arg("bytes"), py::arg("threads"));
}
