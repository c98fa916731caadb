"""decode_layers (one C++ call for a decode step's decoder layers, of one model or several side by side)
against the same layers run one by one in Python, which call the same kernels: outputs and written K/V must
be bit-identical, for every architecture variant and for LoRA groups. The layers themselves are tested
against transformers (tests/test_models.py and tests/test_engine.py, whose decode steps take this path)."""

import copy
import functools

import pytest
import torch
from helpers import PACKED_LINEAR_RUNS, make_tiny_checkpoint, on_threads, save_adapter
from mope.engine import model as model_module
from mope.engine import model_runner
from mope.engine.context import AttentionContext
from mope.engine.engine import Engine
from mope.engine.loader import load_model
from mope.engine.lora import LoRAGroup
from mope.engine.sampling_params import SamplingParams
from mope.kernels import decode_layers, packed_linear
from mope.kernels.cpp_build import load_cpp

pytestmark = pytest.mark.skipif(not PACKED_LINEAR_RUNS, reason="needs a C++ compiler and AVX-512 or AVX2")

BLOCK_SIZE = 4
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-mqa-biases": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1,
                                        "attention_bias": True, "mlp_bias": True}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm-wide-heads": ("qwen3", {"head_dim": 32}),
}


class DecodeStep:
    """A decode step of `rows` sequences over random cached K/V (a pool per layer, k and v interleaved per
    block as the KV pool lays them out), with lengths 1 .. 3 blocks."""

    def __init__(self, config, rows: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        blocks_per_seq = 3
        num_blocks = rows * blocks_per_seq + 2
        shape = (num_blocks, 2, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.pools = [torch.randn(shape, generator=generator) for _ in range(config.num_layers)]
        tables = torch.randperm(num_blocks, generator=generator)[: rows * blocks_per_seq].view(rows, -1).int()
        lens = torch.randint(1, blocks_per_seq * BLOCK_SIZE + 1, (rows,), generator=generator)
        last = lens - 1
        slots = tables[torch.arange(rows), last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE
        self.ctx = AttentionContext(is_prefill=False, context_lens=lens.int(), block_tables=tables,
                                    slot_mapping=slots)
        self.input_ids = torch.randint(3, 300, (rows,), generator=generator)
        self.positions = last

    def run(self, model, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(hidden, the K/V pools after the step), from fresh copies of the pools."""
        pools = [pool.clone() for pool in self.pools]
        kv_cache = [(pool[:, 0], pool[:, 1]) for pool in pools]
        with torch.no_grad():
            hidden = model(self.input_ids, self.positions, self.ctx, kv_cache, **kwargs)
        return hidden, pools


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the model's decode_layers calls (one per forward that took the C++ path)."""
    counted = []

    @functools.wraps(decode_layers.decode_layers)
    def counting(*args, **kwargs):
        counted.append(1)
        return decode_layers.decode_layers(*args, **kwargs)

    monkeypatch.setattr(model_module, "decode_layers", counting)
    return counted


def layer_by_layer(monkeypatch, run):
    """`run()` with the layers run one by one in Python (the reference)."""
    with monkeypatch.context() as patch:
        patch.setattr(model_module, "decode_layers_available", lambda: False)
        return run()


def assert_identical(got, expected):
    (hidden, pools), (expected_hidden, expected_pools) = got, expected
    assert torch.equal(hidden, expected_hidden)
    for pool, expected_pool in zip(pools, expected_pools, strict=True):
        assert torch.equal(pool, expected_pool)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_decode_layers_equal_the_layers_one_by_one(tmp_path, monkeypatch, calls, variant, rows):
    arch, overrides = VARIANTS[variant]
    model = load_model(make_tiny_checkpoint(tmp_path / variant, arch, seed=rows, **overrides))
    step = DecodeStep(model.config, rows, seed=rows)
    expected = layer_by_layer(monkeypatch, lambda: step.run(model))
    assert not calls
    got = step.run(model)
    assert calls == [1]
    assert_identical(got, expected)
    assert not torch.equal(got[1][0], step.pools[0])  # the new K/V were written


def test_lora_group_decode_equals_the_layers_one_by_one(tmp_path, monkeypatch, calls):
    """Adapter experts (different targets and ranks; rows of the base, adapter -1, among them)."""
    base = make_tiny_checkpoint(tmp_path / "base", "qwen2", seed=3)
    adapters = [save_adapter(base, tmp_path / "a0", seed=0, r=4, lora_alpha=8,
                             target_modules=["q_proj", "down_proj"]),
                save_adapter(base, tmp_path / "a1", seed=1, r=8, lora_alpha=4,
                             target_modules=["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])]
    group = LoRAGroup(load_model(base), adapters, base_path=base)
    step = DecodeStep(group.config, 7, seed=4)
    adapter_index = torch.tensor([0, 1, -1, 1, 0, 0, 1])
    expected = layer_by_layer(monkeypatch, lambda: step.run(group, adapter_index=adapter_index))
    got = step.run(group, adapter_index=adapter_index)
    assert calls == [1]
    assert_identical(got, expected)
    plain = step.run(group.base)  # no step rows: the base alone, also one call
    assert calls == [1, 1] and not torch.equal(plain[0], got[0])


def test_kept_projections_follow_the_weights_and_the_step(tmp_path, monkeypatch, calls):
    """Models keep their projections for decode_layers between steps: a weight changed in place, a bias
    replaced and the next step's adapter_index are each seen (every step equals the layers one by one)."""
    base = make_tiny_checkpoint(tmp_path / "base", "llama", seed=11, attention_bias=True)
    model = load_model(base)
    group = LoRAGroup(load_model(base), [save_adapter(base, tmp_path / "a", seed=4, r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "up_proj"])], base_path=base)
    step = DecodeStep(model.config, 4, seed=2)

    def check(module, **kwargs):
        expected = layer_by_layer(monkeypatch, lambda: step.run(module, **kwargs))
        assert_identical(step.run(module, **kwargs), expected)

    check(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    check(model)
    qkv = model.model.layers[0].self_attn.qkv_proj
    qkv.bias = torch.nn.Parameter(qkv.bias.detach() + 1)
    check(model)
    check(group, adapter_index=torch.tensor([0, -1, 0, 0]))
    check(group, adapter_index=torch.tensor([-1, 0, -1, 0]))
    with torch.no_grad():
        group.base.model.layers[0].mlp.gate_up_proj.base_layer.weight.add_(1)  # a view into [W; A]
    check(group, adapter_index=torch.tensor([0, 0, -1, 0]))
    copied = copy.deepcopy(model)  # what the models keep for decode_layers does not travel with them
    check(copied)
    assert calls == [1] * 7


def test_layers_run_one_by_one_where_the_call_does_not_apply(tmp_path, calls):
    """Module hooks run, autograd records, and steps past the packed GEMM's rows are not one call."""
    model = load_model(make_tiny_checkpoint(tmp_path / "m", "llama", seed=5))
    step = DecodeStep(model.config, 3)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *_: seen.append(1))
    step.run(model)
    handle.remove()
    assert seen == [1] and not calls
    kv_cache = [(pool[:, 0], pool[:, 1]) for pool in (pool.clone() for pool in step.pools)]
    model.requires_grad_(False).model.norm.weight.requires_grad_(True)  # autograd past the cache writes
    hidden = model(step.input_ids, step.positions, step.ctx, kv_cache)
    assert hidden.requires_grad and not calls
    wide = DecodeStep(model.config, packed_linear.MAX_ROWS + 1)
    wide.run(model)
    assert not calls
    step.run(model)
    assert calls == [1]


def test_decode_layers_refuses_bad_inputs(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path / "m", "llama", seed=6))
    config, step = model.config, DecodeStep(model.config, 2)
    kv_cache = [(pool[:, 0], pool[:, 1]) for pool in step.pools]
    with torch.no_grad():
        x = model.model.embed_tokens(step.input_ids)
        layers = model._decode_layers(x)
    cos = torch.ones(2, config.head_dim // 2)
    ctx = step.ctx
    heads = dict(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                 scale=0.25)

    def call(x=x, layers=layers, kv_cache=kv_cache, block_tables=ctx.block_tables, slots=ctx.slot_mapping,
             **kwargs):
        made = decode_layers.decode_call(x, cos, cos, layers, model.model.norm.weight, 1e-6, kv_cache, slots,
                                         block_tables, ctx.context_lens, **(heads | kwargs))
        return decode_layers.decode_layers([made])

    with pytest.raises(ValueError, match="one .k, v. cache per layer"):
        call(kv_cache=kv_cache[:1])
    narrow = [kv_cache[0], (kv_cache[1][0][:-1], kv_cache[1][1])]
    with pytest.raises(ValueError, match="layer 1's k_cache must have layer 0's shape"):
        call(kv_cache=narrow)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(block_tables=ctx.block_tables.long())
    with pytest.raises(ValueError, match=r"x must be \(N, hidden\)"):
        call(x=x[0])
    with pytest.raises(ValueError, match="num_kv_heads is 1, the caches hold 2"):
        call(num_kv_heads=1)
    with pytest.raises(ValueError, match="layer 0's qkv projection must have 32 \\+ 2 x 32 outputs"):
        call(num_heads=2)
    with pytest.raises(ValueError, match="slot"):  # found by store_kv inside the call
        call(slots=ctx.slot_mapping + 10**6)
    with pytest.raises(ValueError, match="q_norm and k_norm go together"):
        decode_layers.layer(x[0], x[0], *[None] * 4, q_norm=x[0])
    first, hidden = model.model.layers[0], config.hidden_size
    plain = first.self_attn.qkv_proj, first.mlp.gate_up_proj, first.mlp.down_proj
    with torch.no_grad():
        qkv, gate_up, down = (p.decode_projection(x) for p in plain)
    lora_o = decode_layers.projection(packed_linear.pack_weight(torch.randn(hidden + 2, hidden)), None,
                                      packed_linear.pack_lora_expand(torch.randn(hidden, 2), 1))
    norms = first.input_layernorm.weight, first.post_attention_layernorm.weight
    lora_layers = [decode_layers.layer(*norms, qkv, lora_o, gate_up, down), *layers[1:]]
    with pytest.raises(ValueError, match="layer 0 has a LoRA projection: the call needs adapter_index"):
        call(layers=lora_layers)
    with pytest.raises(ValueError, match=r"adapter_index must be \(2,\)"):
        call(layers=lora_layers, adapter_index=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="adapter out of range"):  # found by the LoRA kernel inside the call
        call(layers=lora_layers, adapter_index=torch.tensor([0, 1]))
    call(layers=lora_layers, adapter_index=torch.tensor([0, -1]))
    good = decode_layers.decode_call(x, cos, cos, layers, model.model.norm.weight, 1e-6, kv_cache,
                                     ctx.slot_mapping, ctx.block_tables, ctx.context_lens, **heads)
    apis = [load_cpp(name).api for name in ("decoder_ops", "decoder_ops", "paged_attention")]
    with pytest.raises(ValueError, match="expected the capsule mope.packed_linear.api"):
        load_cpp("decode_layers").decode_layers(*apis, [good])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_models_in_one_call_equal_each_alone(tmp_path, monkeypatch, threads):
    """Five models' calls of different sizes (a LoRA group among them) in one decode_layers, in the rounds
    plan_rounds makes of them: each equals its model run layer by layer."""
    base = make_tiny_checkpoint(tmp_path / "base", "llama", seed=7)
    group = LoRAGroup(load_model(base), [save_adapter(base, tmp_path / "a", seed=2, r=4, lora_alpha=8,
                                                      target_modules=["o_proj", "up_proj"])], base_path=base)
    models = [load_model(make_tiny_checkpoint(tmp_path / f"m{i}", arch, seed=i, **overrides))
              for i, (arch, overrides) in enumerate(VARIANTS.values())]
    steps = [DecodeStep(m.config, rows, seed=rows) for m, rows in zip(models, [1, 3, 6, 2], strict=True)]
    steps.append(DecodeStep(group.config, 4, seed=9))
    adapter_index = torch.tensor([0, -1, 0, 0])
    kwargs = [{}] * len(models) + [{"adapter_index": adapter_index}]
    modules = [*models, group]
    runs = zip(modules, steps, kwargs, strict=True)
    expected = layer_by_layer(monkeypatch, lambda: [step.run(m, **kw) for m, step, kw in runs])

    def one_call():
        pools = [[pool.clone() for pool in step.pools] for step in steps]
        with torch.no_grad():
            calls = [m.decode_call(step.input_ids, step.positions, step.ctx,
                                   [(pool[:, 0], pool[:, 1]) for pool in model_pools], **kw)
                     for m, step, model_pools, kw in zip(modules, steps, pools, kwargs, strict=True)]
            return decode_layers.decode_layers(calls), pools, calls

    hidden, pools, _ = on_threads(threads, one_call)
    for got, model_pools, want in zip(hidden, pools, expected, strict=True):
        assert_identical((got, model_pools), want)


@pytest.mark.parametrize("threads", [2, 3])
def test_models_of_one_size_side_by_side_equal_each_alone(tmp_path, monkeypatch, threads):
    """Three models of one shape over as many rows and cached tokens run side by side (a round of `threads`,
    the rest alone); each equals its model run layer by layer. An error inside a call running beside
    another (a slot outside the cache, found by store_kv) is raised after the round."""
    models = [load_model(make_tiny_checkpoint(tmp_path / f"m{i}", "llama", seed=i)) for i in range(3)]
    steps = [DecodeStep(model.config, 4, seed=5) for model in models]
    runs = list(zip(models, steps, strict=True))
    expected = layer_by_layer(monkeypatch, lambda: [step.run(m) for m, step in runs])

    def calls_of(steps, pools):
        return [m.decode_call(step.input_ids, step.positions, step.ctx, [(kv[:, 0], kv[:, 1]) for kv in p])
                for m, step, p in zip(models, steps, pools, strict=True)]

    pools = [[pool.clone() for pool in step.pools] for step in steps]
    with torch.no_grad():
        calls = calls_of(steps, pools)
        hidden = on_threads(threads, decode_layers.decode_layers, calls)
    for got, model_pools, want in zip(hidden, pools, expected, strict=True):
        assert_identical((got, model_pools), want)
    steps[1].ctx.slot_mapping += 10**6
    with torch.no_grad(), pytest.raises(ValueError, match="slot"):
        on_threads(threads, decode_layers.decode_layers, calls_of(steps, pools))


def test_plan_rounds_runs_calls_of_one_size_side_by_side():
    """Largest first; a round of `threads` calls side by side while its smallest is within 85% of its
    largest, else the largest alone (on all threads)."""
    plan = load_cpp("decode_layers").plan_rounds
    assert plan([10, 10, 10, 1], 2) == [[0, 1], [2], [3]]  # three experts and a small PCM
    assert plan([12, 4], 2) == [[0], [1]]  # a LoRA group's step and a smaller model
    assert plan([9, 10, 9, 10], 2) == [[1, 3], [0, 2]]
    assert plan([10, 8.6, 8.4], 2) == [[0, 1], [2]]
    assert plan([10, 8.4, 8.4], 2) == [[0], [1, 2]]
    assert plan([5, 5, 5, 5], 3) == [[0, 1, 2], [3]]
    assert plan([3, 5, 4], 1) == [[1], [2], [0]]
    assert plan([], 2) == []


def test_engine_decode_steps_run_every_group_in_one_call(tmp_path, monkeypatch):
    """The runner hands a decode step's groups (a LoRA group and a full model) to one decode_layers call;
    the outputs and every recorded log-prob equal the engine's with each group's layers run one by one."""
    base = make_tiny_checkpoint(tmp_path / "base", "llama", seed=11)
    adapter = save_adapter(base, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                           target_modules=["q_proj", "up_proj"])
    experts = [base, adapter, make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=12)]
    prompts = [[1, 5, 9, 23, 44], [1, 7, 8, 9], [1, 100]]
    weights = [[0.2, 0.5, 0.3], [0.0, 0.6, 0.4], [0.5, 0.5, 0.0]]
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=8, ignore_eos=True)

    def generate():
        return Engine(experts, block_size=4).generate(prompts, weights=weights, sampling=sampling)

    expected = layer_by_layer(monkeypatch, generate)
    batches = []
    run = model_runner.decode_layers
    monkeypatch.setattr(model_runner, "decode_layers", lambda calls: batches.append(len(calls)) or run(calls))
    outputs = generate()
    assert batches and all(n == 2 for n in batches)  # every decode step: both groups in one call
    for out, ref in zip(outputs, expected, strict=True):
        assert out.token_ids == ref.token_ids
        for name in ("logprobs", "expert_logprobs", "weights"):
            assert torch.equal(getattr(out, name), getattr(ref, name))
