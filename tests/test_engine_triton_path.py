"""The engine on its CUDA kernel path, run on the CPU: every "auto" backend forced to Triton under
TRITON_INTERPRET=1 (paged decode attention, mix_sample, the LoRA shrink/expand), against the same engine on
its CPU path (itself tested against transformers in tests/test_engine.py). This runs the glue the kernels'
own tests do not: the per-step metadata the runner builds (int32 block tables and lengths, int64 slots and
seeds, strided views of the KV pool and of the logits buffer) and the LoRA tile tables of a step's rows.
Where CUDA is available the Triton run is on the GPU (compiled kernels; conftest.py then leaves the
interpreter off), which also catches tensors left on the wrong device."""

import functools
import importlib

import pytest
import torch
from helpers import make_tiny_checkpoint, save_adapter
from mope.engine import attention, experts, model
from mope.engine.engine import Engine
from mope.engine.lora import LoRAGroup, LoRALinear
from mope.engine.model_runner import ModelRunner
from mope.engine.sampling_params import SamplingParams
from mope.kernels import lora as lora_kernels
from mope.kernels import mix_triton, paged_attention_triton

mix_sample_module = importlib.import_module("mope.kernels.mix_sample")  # the package exports the function

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 4
MAX_TOKENS = 10
PREFIX = [1, 5, 9, 23, 44, 50, 51, 52]  # two full blocks
# experts: the base (adapter -1 of the LoRA group), two adapters of it, a qwen2 model (its own group, MQA)
WEIGHTS = [[0.3, 0.0, 0.3, 0.4], [0.0, 0.5, 0.5, 0.0], [0.2, 0.3, 0.0, 0.5]]
PROMPTS = [PREFIX + [60, 61], [1, 7, 8] * 3, [1, 100, 101, 102, 103]]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Sampled and forked. The C++ and Triton kernels draw the same u and apply the same truncation rules; their
# π differ only by float rounding (~1e-6), so a token could differ only at a boundary. Measured on the CPU
# path's logits of this scenario: every top-k, top-p and inverse-CDF boundary is >= 1.6e-4 of the kept mass
# away from where these rows fall.
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=5, n=2, max_tokens=MAX_TOKENS,
                         ignore_eos=True)
ADAPTERS = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_path")
    base = make_tiny_checkpoint(root / "base", "llama", seed=1)
    adapters = [save_adapter(base, root / f"adapter{i}", seed=i, **kw) for i, kw in enumerate(ADAPTERS)]
    qwen = make_tiny_checkpoint(root / "qwen2", "qwen2", seed=2, num_key_value_heads=1)
    return [base, *adapters, qwen]


def counting(calls: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def force_triton(monkeypatch) -> dict[str, int]:
    """Make every "auto" choice of the engine the CUDA one (Triton); count the Triton launchers' calls."""
    resolve = mix_sample_module.resolve_backend
    monkeypatch.setattr(mix_sample_module, "resolve_backend",
                        lambda backend, device: resolve("triton" if backend == "auto" else backend, device))
    monkeypatch.setattr(attention, "paged_decode_attention",
                        functools.partial(attention.paged_decode_attention, backend="triton"))
    monkeypatch.setattr(experts, "LoRAGroup", functools.partial(LoRAGroup, backend="triton"))
    # on CUDA the layers run one by one (decode_layers is CPU-only)
    monkeypatch.setattr(model, "decode_layers_available", lambda: False)
    calls = dict.fromkeys(["mix", "attention", "lora"], 0)
    for module, name, key in ((mix_triton, "mix_sample_triton", "mix"),
                              (paged_attention_triton, "paged_decode_attention_triton", "attention"),
                              (lora_kernels, "add_lora_triton", "lora")):
        monkeypatch.setattr(module, name, counting(calls, key, getattr(module, name)))
    return calls


def count_steps(monkeypatch) -> dict[str, int]:
    """Runner steps, decode forwards (one per group with rows) and forwards of the LoRA group."""
    steps = dict.fromkeys(["run", "decode", "lora"], 0)
    run, inputs = ModelRunner.run, ModelRunner._inputs

    def counted_run(self, seqs, is_prefill):
        steps["run"] += 1
        return run(self, seqs, is_prefill)

    def counted_inputs(self, group, entries, is_prefill):  # once per group forward
        steps["decode"] += not is_prefill
        steps["lora"] += isinstance(group.module, LoRAGroup)
        return inputs(self, group, entries, is_prefill)

    monkeypatch.setattr(ModelRunner, "run", counted_run)
    monkeypatch.setattr(ModelRunner, "_inputs", counted_inputs)
    return steps


def count_prefill_tokens(engine: Engine) -> list[int]:
    counts = [0] * len(engine.runner.groups)
    for i, group in enumerate(engine.runner.groups):
        def hook(module, args, kwargs, i=i):
            if args[2].is_prefill:
                counts[i] += args[0].numel()
        group.module.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def run_scenario(expert_dirs, device="cpu"):
    """Greedy mixtures over several blocks, a seeded sampled request with n = 2, then a prefix-cache hit."""
    engine = Engine(expert_dirs, device=device, block_size=BLOCK_SIZE, num_kv_blocks=96)
    prefill_tokens = count_prefill_tokens(engine)
    outputs = engine.generate(PROMPTS, weights=WEIGHTS, sampling=[GREEDY, GREEDY, SAMPLED])
    before = list(prefill_tokens)
    # the base and qwen2 only: the LoRA group's steps have no adapter row (adapter index -1 everywhere)
    outputs += engine.generate([PREFIX + [70]], weights=[[0.6, 0.0, 0.0, 0.4]], sampling=GREEDY)
    hit = [after - b for after, b in zip(prefill_tokens, before, strict=True)]
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return engine, outputs, hit


def test_triton_path_matches_the_cpu_path(expert_dirs, monkeypatch):
    _, expected, expected_hit = run_scenario(expert_dirs)
    with monkeypatch.context() as patch:
        calls = force_triton(patch)
        steps = count_steps(patch)
        engine, outputs, hit = run_scenario(expert_dirs, TRITON_DEVICE)

    # the Triton kernels ran, and only they: one mix_sample per step, attention per decode forward and
    # layer, the LoRA pair per LoRA-group forward and adapted projection (none took the packed CPU GEMM)
    group = next(g.module for g in engine.runner.groups if isinstance(g.module, LoRAGroup))
    num_layers = len(group.base.model.layers)
    assert calls["mix"] == steps["run"] > 0
    assert calls["attention"] == steps["decode"] * num_layers > 0
    assert calls["lora"] == steps["lora"] * len(group.stacks) > 0
    assert all(m._packed is None for m in group.base.modules() if isinstance(m, LoRALinear))

    assert hit == expected_hit == [1, 1]  # base and qwen2 computed 1 token each: 8 came from the cache
    assert len(outputs) == len(expected) == 5
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.token_ids == ref.token_ids, i
        assert len(out.token_ids) == MAX_TOKENS and out.finish_reason == "length"
        torch.testing.assert_close(out.weights, ref.weights, atol=0, rtol=0)
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.expert_logprobs, ref.expert_logprobs, atol=1e-4, rtol=1e-4)
    assert outputs[2].token_ids != outputs[3].token_ids  # the two samples of the forked request differ
