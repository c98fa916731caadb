"""A decode step's decoder layers and final norm, of one model or several, in one C++ call
(csrc/decode_layers.cpp).

The call runs, per layer, exactly the kernels that engine/model.py's layers call one by one on CPU in fp32
(rms_norm, the packed GEMMs or their LoRA form, rotary, store_kv, paged decode attention, silu_mul), on
the same tensors, so the result is bit-identical; what it saves is Python between them (~24% of a 4-row
step's main thread, bench/README.md), and with several models it runs them side by side, one per core.
The reference is the layers themselves (tests/test_decode_layers.py).
"""

from __future__ import annotations

import functools

from torch import Tensor

from . import packed_linear
from .cpp_build import load_cpp
from .paged_attention import check_paged_attention_args
from .validate import describe

_KERNELS = ("packed_linear", "decoder_ops", "paged_attention")


@functools.cache
def available() -> bool:
    """Whether the C++ modules are built (and this CPU runs the packed GEMM)."""
    modules = (*_KERNELS, "decode_layers")
    return packed_linear.available() and all(load_cpp(name) is not None for name in modules)


def projection(packed: packed_linear.PackedWeight, bias: Tensor | None,
               expand: packed_linear.PackedExpand | None = None):
    """A linear layer as `decode_layers` takes it: `packed_linear(x, packed, bias)`, or with `expand`
    `packed_lora_linear(x, packed, bias, adapter_index, expand)` (packed: the folded [W; A]; adapter_index:
    the call's). It holds no step's data: a model may keep it while its weights stay."""
    module = _module()
    if expand is None:
        return module.Projection(packed_linear._checked_packed(packed).panels, packed.out_features, bias)
    return module.Projection(*packed_linear.lora_weight_args(packed, bias, expand))


def layer(input_norm: Tensor, post_norm: Tensor, qkv, o, gate_up, down, q_norm: Tensor | None = None,
          k_norm: Tensor | None = None):
    """One pre-norm decoder layer: norm weights (hidden,), projections from `projection` (qkv: [q | k | v]
    outputs, gate_up: [gate | up]); q_norm, k_norm (D,): Qwen3's per-head norms, both or neither."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together: give both or neither")
    return _module().Layer(input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down)


def decode_call(x: Tensor, cos: Tensor, sin: Tensor, layers: list, final_norm: Tensor, eps: float,
                kv_caches: list[tuple[Tensor, Tensor]], slot_mapping: Tensor, block_tables: Tensor,
                context_lens: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                adapter_index: Tensor | None = None):
    """One model's decode step for `decode_layers`: x (N, hidden) fp32, one new token per sequence; cos, sin
    (N, D/2) of its position; layer i stores its K/V at `slot_mapping` in kv_caches[i] and attends through
    `block_tables` over `context_lens` tokens (as `paged_decode_attention`); adapter_index (N,) integer in
    [-1, L): each row's adapter in the LoRA projections (needed when there are any)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] > packed_linear.MAX_ROWS:
        raise ValueError(f"x must be (N, hidden) with N <= {packed_linear.MAX_ROWS}, got {describe(x)}")
    if len(kv_caches) != len(layers) or not layers:
        raise ValueError(f"need one (k, v) cache per layer, got {len(kv_caches)} for {len(layers)} layers")
    q_like = x.new_empty(head_dim).expand(len(x), num_heads, head_dim)  # the attention's q, for its checks
    check_paged_attention_args(q_like, *kv_caches[0], block_tables, context_lens, scale)
    if kv_caches[0][0].shape[2] != num_kv_heads:
        raise ValueError(f"num_kv_heads is {num_kv_heads}, the caches hold {kv_caches[0][0].shape[2]}")
    call = _module().Call(x, cos, sin, layers, final_norm, eps, kv_caches, slot_mapping, block_tables,
                          context_lens, num_heads, num_kv_heads, head_dim, scale)
    if adapter_index is not None:
        call.adapter_index = packed_linear.lora_index(len(x), adapter_index)
    return call


def decode_layers(calls: list) -> list[Tensor | None]:
    """norm(layers(x)) of each `decode_call` -> its hidden state (N, hidden); None for a None call (a model
    that runs its layers one by one). Largest first (by the bytes each reads), as many calls of about the
    same size as torch has threads run side by side, one per thread; any other call runs alone on all
    threads: calls must not share K/V blocks."""
    given = [call for call in calls if call is not None]
    if not given:
        return [None] * len(calls)
    hidden = iter(_module().decode_layers(*[load_cpp(name).api for name in _KERNELS], given))
    return [None if call is None else next(hidden) for call in calls]


def _module():
    if not available():
        raise RuntimeError("decode_layers needs the C++ kernels (a compiler) and a CPU with AVX-512 or AVX2 "
                           "and FMA")
    return load_cpp("decode_layers")
