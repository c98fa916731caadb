// The entry points that csrc/decode_layers.cpp calls in the other kernel modules, without Python in between.
//
// Each module exports its table as a capsule (attribute `api`, named by the table's kName); decode_layers
// takes the three capsules. A decode step calls ~12 kernels per decoder layer; from Python each call costs
// ~2 us warm and ~30 us right after a weight-streaming GEMM has evicted the interpreter's objects, while
// the other core waits (bench/README.md, decode layers in C++).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace mope {

struct LinearApi {
  static constexpr const char* kName = "mope.packed_linear.api.v1";
  // x @ W^T + bias from pack_weight's panels (x, panels, out_features, bias)
  torch::Tensor (*linear)(const torch::Tensor&, const torch::Tensor&, int64_t, const std::optional<torch::Tensor>&);
  // batched LoRA over the folded [W; A] panels (x, folded, out_features, bias, adapter, expand, k_ranges, width)
  torch::Tensor (*lora_linear)(const torch::Tensor&, const torch::Tensor&, int64_t, const std::optional<torch::Tensor>&,
                               const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t);
};

struct DecoderOpsApi {
  static constexpr const char* kName = "mope.decoder_ops.api.v1";
  // (x, weight, eps, residual) -> {norm(x [+ residual]) * weight, x + residual or an empty tensor}
  std::vector<torch::Tensor> (*rms_norm)(const torch::Tensor&, const torch::Tensor&, double,
                                         const std::optional<torch::Tensor>&);
  torch::Tensor (*silu_mul)(const torch::Tensor&);
  // (q, k, cos, sin) -> {q, k} rotated
  std::vector<torch::Tensor> (*rotary)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                       const torch::Tensor&);
};

struct AttentionApi {
  static constexpr const char* kName = "mope.paged_attention.api.v1";
  // (k, v, k_cache, v_cache, slot_mapping)
  void (*store_kv)(const torch::Tensor&, const torch::Tensor&, torch::Tensor&, torch::Tensor&, const torch::Tensor&);
  // (q, k_cache, v_cache, block_tables, context_lens, scale)
  torch::Tensor (*paged_decode_attention)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                          double);
};

// The capsule of a module's table, for its PYBIND11_MODULE: m.attr("api") = api_capsule(table).
template <typename Api>
pybind11::capsule api_capsule(const Api& table) {
  return pybind11::capsule(static_cast<const void*>(&table), Api::kName);
}

}  // namespace mope
