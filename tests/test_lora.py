"""LoRA adapter experts over one base (engine/lora.py) against the same adapters merged into the base:
by the adapter math into a checkpoint our loader reads, and by peft's merge_and_unload in transformers."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import PACKED_LINEAR_RUNS, make_tiny_checkpoint, save_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine import experts
from mope.engine.context import AttentionContext
from mope.engine.loader import checkpoint_targets, load_model
from mope.engine.lora import LoRAGroup, LoRALinear, load_adapter
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# two adapters with different targets, ranks and scalings (the second uses rslora)
ADAPTERS = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1),
    dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True),
)
BLOCK_SIZE = 4
NEW_TOKENS = 12


def merge_into_checkpoint(base_dir, adapter_dir, out_dir):
    """The adapter merged into a copy of the base checkpoint: W += scaling * B @ A, by the adapter math."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = config["r"]
    scaling = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    weights = load_file(base_dir / "model.safetensors")
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    for key, lora_a in factors.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A", "")
            weights[name] = weights[name] + scaling * factors[key.replace("lora_A", "lora_B")] @ lora_a
    out_dir.mkdir()
    for file in base_dir.iterdir():
        if file.name != "model.safetensors":
            (out_dir / file.name).write_bytes(file.read_bytes())
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_checkpoint(root / "base", "llama", seed=3)
    adapters = [save_adapter(base, root / f"adapter{i}", seed=i, **kw) for i, kw in enumerate(ADAPTERS)]
    merged = [merge_into_checkpoint(base, a, root / f"merged{i}") for i, a in enumerate(adapters)]
    return base, adapters, merged


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=generator) for n in (5, 9)]


class PagedDecoder:
    """Greedy decoding of several sequences over one paged cache, each sequence with its own blocks."""

    def __init__(self, config, num_seqs: int, max_len: int):
        per_seq = -(-max_len // BLOCK_SIZE)
        shape = (num_seqs * per_seq, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.kv_cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.block_tables = torch.arange(num_seqs * per_seq).flip(0).view(num_seqs, per_seq).int()
        self.lens = [0] * num_seqs

    def step(self, forward, chunks: list[torch.Tensor], is_prefill: bool) -> torch.Tensor:
        """Feed chunks[s] to sequence s through `forward(ids, positions, ctx, kv_cache)`; last logits."""
        positions, slots, cu = [], [], [0]
        for s, chunk in enumerate(chunks):
            span = range(self.lens[s], self.lens[s] + len(chunk))
            positions += span
            slots += [int(self.block_tables[s, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in span]
            cu.append(cu[-1] + len(chunk))
            self.lens[s] += len(chunk)
        ctx = AttentionContext(is_prefill=is_prefill, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                               context_lens=torch.tensor(self.lens, dtype=torch.int32),
                               slot_mapping=torch.tensor(slots), block_tables=self.block_tables)
        logits = forward(torch.cat(chunks), torch.tensor(positions), ctx, self.kv_cache)
        return logits[torch.tensor(cu[1:]) - 1]

    def greedy(self, forward, chunks: list[torch.Tensor], steps: int) -> torch.Tensor:
        tokens = [self.step(forward, chunks, is_prefill=True).argmax(-1)]
        for _ in range(steps - 1):
            tokens.append(self.step(forward, list(tokens[-1][:, None]), is_prefill=False).argmax(-1))
        return torch.stack(tokens, dim=1)


def group_forward(group, row_adapters: list[int]):
    """forward for PagedDecoder: each sequence's tokens carry its adapter index."""
    def forward(ids, positions, ctx, kv_cache):
        lens = (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).long()
        index = torch.tensor(row_adapters).repeat_interleave(lens)
        return group.compute_logits(group(ids, positions, ctx, kv_cache, index))
    return forward


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_adapter_rows_match_merged_checkpoints(checkpoints, backend):
    """Logits of every row of a mixed batch (adapter 0, adapter 1, plain base) equal those of the adapter
    merged into the base by hand and loaded as a full expert, and the base is untouched after remove().
    "auto" on CPU takes the folded packed GEMM (42 rows), "torch" the base layer plus add_lora."""
    base_dir, adapter_dirs, merged_dirs = checkpoints
    base = load_model(base_dir)
    group = LoRAGroup(base, adapter_dirs, base_path=base_dir, backend=backend)
    experts = [load_model(d) for d in merged_dirs] + [load_model(base_dir)]
    chunks = prompts() * 3
    row_adapters = [0, 0, 1, 1, -1, -1]
    decoder = PagedDecoder(base.config, len(chunks), 32)
    logits = decoder.step(group_forward(group, row_adapters), chunks, is_prefill=True)
    for row, adapter in enumerate(row_adapters):
        expert = experts[adapter]
        expected = PagedDecoder(base.config, 1, 32).step(lambda *a, m=expert: m.compute_logits(m(*a)),
                                                         [chunks[row]], is_prefill=True)
        torch.testing.assert_close(logits[row], expected[0], atol=2e-5, rtol=1e-5)
    folded = [m._packed is not None for m in base.modules() if isinstance(m, LoRALinear)]
    assert folded and all(folded) == (backend == "auto" and PACKED_LINEAR_RUNS)
    group.remove()
    plain = PagedDecoder(base.config, 1, 32).step(lambda *a: base.compute_logits(base(*a)), [chunks[0]], True)
    expected = PagedDecoder(base.config, 1, 32).step(lambda *a: experts[-1].compute_logits(experts[-1](*a)),
                                                     [chunks[0]], True)
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)


@torch.no_grad()
def test_the_packed_path_is_chosen_per_step(checkpoints):
    """A step takes the folded GEMM on CPU up to 256 rows, in inference, with backend "auto"; a longer
    prefill (base layer + add_lora) in the same group gives the torch backend's logits."""
    base_dir, adapter_dirs, _ = checkpoints
    auto = LoRAGroup(load_model(base_dir), adapter_dirs, base_path=base_dir)
    reference = LoRAGroup(load_model(base_dir), adapter_dirs, base_path=base_dir, backend="torch")
    cpu = torch.device("cpu")
    assert auto.takes_packed_path(256, cpu) == PACKED_LINEAR_RUNS
    assert not auto.takes_packed_path(257, cpu) and not reference.takes_packed_path(8, cpu)
    with torch.enable_grad():
        assert not auto.takes_packed_path(8, cpu)
    long_prompts = [torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(1)), *prompts()] * 2
    row_adapters = [0, 1, -1, 0, 1, -1]
    for chunks in (prompts() * 3, long_prompts):  # 42 rows, then 328
        got, expected = (PagedDecoder(auto.config, len(chunks), 160).step(group_forward(group, row_adapters),
                                                                          chunks, is_prefill=True)
                         for group in (auto, reference))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_decode_matches_peft_merge_and_unload(checkpoints):
    """Each adapter expert, decoding in one batch with the others over its own KV blocks, gives the same
    greedy tokens as transformers' generate on peft's merge_and_unload of that adapter."""
    base_dir, adapter_dirs, _ = checkpoints
    group = LoRAGroup(load_model(base_dir), adapter_dirs, base_path=base_dir)
    chunks = prompts() * 2
    row_adapters = [0, 0, 1, 1]
    decoder = PagedDecoder(group.base.config, len(chunks), 9 + NEW_TOKENS)
    tokens = decoder.greedy(group_forward(group, row_adapters), chunks, NEW_TOKENS)
    for adapter, adapter_dir in enumerate(adapter_dirs):
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        reference = reference.merge_and_unload().eval()
        for row in (r for r, a in enumerate(row_adapters) if a == adapter):
            prompt = chunks[row][None]
            expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                          max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
            assert tokens[row].tolist() == expected[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def test_merge_into_equals_merged_checkpoints(checkpoints):
    """merge_into with a one-hot mix is the hand-merged checkpoint; a uniform mix is the average of both."""
    base_dir, adapter_dirs, merged_dirs = checkpoints
    group = LoRAGroup(load_model(base_dir), adapter_dirs)
    merged = [checkpoint_targets(load_model(d)) for d in merged_dirs]
    base = checkpoint_targets(load_model(base_dir))
    for mix, expected in (([1.0, 0.0], merged[0]), ([0.0, 1.0], merged[1]),
                          ([0.5, 0.5], {n: (merged[0][n] + merged[1][n]) / 2 for n in base})):
        model = load_model(base_dir)
        group.merge_into(model, mix)
        for name, weight in checkpoint_targets(model).items():
            torch.testing.assert_close(weight, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="mix"):
        group.merge_into(model, [1.0])


@torch.no_grad()
def test_merge_into_the_groups_own_base(checkpoints):
    """The base of a group holds LoRALinear wrappers; merging into it reaches their base layers, and
    remove() hands back plain layers carrying the merged weights."""
    base_dir, adapter_dirs, merged_dirs = checkpoints
    group = LoRAGroup(load_model(base_dir), adapter_dirs)
    group.merge_into(group.base, [1.0, 0.0])
    group.remove()
    assert not any(isinstance(m, LoRALinear) for m in group.base.modules())
    expected = checkpoint_targets(load_model(merged_dirs[0]))
    for name, weight in checkpoint_targets(group.base).items():
        torch.testing.assert_close(weight, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_scaling_folds_alpha_and_rslora_and_adapter_dirs_are_recognised(checkpoints):
    base_dir, adapter_dirs, _ = checkpoints
    assert experts.adapter_base(base_dir) is None
    assert experts.adapter_base(adapter_dirs[0]) == base_dir.resolve()
    assert load_adapter(adapter_dirs[0]).scaling == 8 / 4
    assert load_adapter(adapter_dirs[1]).scaling == pytest.approx(16 / 8**0.5)


def edited_adapter(source, out_dir, drop=(), **changes):
    """A copy of the adapter `source` with `changes` written into its adapter_config.json, `drop` removed."""
    out_dir.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    config = {k: v for k, v in {**config, **changes}.items() if k not in drop}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    (out_dir / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    return out_dir


@pytest.mark.parametrize("changes, message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "r must be"),
    ({"r": "4"}, "r must be"),
    ({"lora_alpha": "8"}, "lora_alpha must be a number"),
    ({"lora_alpha": None}, "lora_alpha must be a number"),
])
def test_unsupported_adapter_features_are_refused(checkpoints, tmp_path, changes, message):
    base_dir, adapter_dirs, _ = checkpoints
    adapter = edited_adapter(adapter_dirs[0], tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=message):
        load_adapter(adapter, base_path=base_dir)


@torch.no_grad()
def test_missing_lora_alpha_takes_peft_default(checkpoints, tmp_path):
    """An adapter_config.json without lora_alpha scores like PeftModel.from_pretrained (peft's default
    alpha, not alpha = r): adapter 0 has r=4, so the two readings differ by a factor 2 in the delta."""
    base_dir, adapter_dirs, _ = checkpoints
    adapter = edited_adapter(adapter_dirs[0], tmp_path / "no_alpha", drop=("lora_alpha",))
    group = LoRAGroup(load_model(base_dir), [adapter], base_path=base_dir)
    prompt = prompts()[1]
    ours = PagedDecoder(group.config, 1, 16).step(group_forward(group, [0]), [prompt], is_prefill=True)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    expected = reference(prompt[None]).logits[0, -1]
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=1e-5)


def test_rank_other_than_the_tensors_is_refused_like_peft(checkpoints, tmp_path):
    base_dir, adapter_dirs, _ = checkpoints
    adapter = edited_adapter(adapter_dirs[0], tmp_path / "r8", r=8)  # its tensors have rank 4
    with pytest.raises(ValueError, match=r"r8: layer \d+ \w+_proj: lora_A/lora_B have rank 4.*says r=8"):
        load_adapter(adapter)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[]", "expected a JSON object")])
def test_unreadable_adapter_config_is_refused(checkpoints, tmp_path, text, message):
    adapter = edited_adapter(checkpoints[1][0], tmp_path / "bad")
    (adapter / "adapter_config.json").write_text(text)
    for read in (load_adapter, experts.adapter_base):
        with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
            read(adapter)


def test_unreadable_adapter_weights_are_refused(checkpoints, tmp_path):
    adapter = edited_adapter(checkpoints[1][0], tmp_path / "bad")
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(adapter)


def test_adapter_of_another_base_is_refused(checkpoints, tmp_path):
    base_dir, adapter_dirs, _ = checkpoints
    other = make_tiny_checkpoint(tmp_path / "other", "llama", seed=4)  # same shapes, other weights
    adapter = edited_adapter(adapter_dirs[0], tmp_path / "edited", base_model_name_or_path=str(other))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_adapter(adapter, base_path=base_dir)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in base_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert load_adapter(adapter_dirs[0], base_path=copy).weights  # a copy of the base is the same base


def test_adapter_that_does_not_fit_the_base_is_refused(checkpoints, tmp_path):
    base_dir, _, _ = checkpoints
    wide = make_tiny_checkpoint(tmp_path / "wide", "llama", intermediate_size=96)
    adapter = save_adapter(wide, tmp_path / "adapter", seed=0, r=2, target_modules=["down_proj"])
    with pytest.raises(ValueError, match="do not fit"):
        LoRAGroup(load_model(base_dir), [adapter])


def test_weights_of_unsupported_modules_and_missing_files_are_refused(checkpoints, tmp_path):
    base_dir, adapter_dirs, _ = checkpoints
    head = save_adapter(base_dir, tmp_path / "head", seed=0, r=2, target_modules=["q_proj"])
    factors = load_file(head / "adapter_model.safetensors")
    factors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    save_file(factors, head / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head"):
        load_adapter(head)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path)
    (head / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(head)


def test_bad_adapter_index_is_refused(checkpoints):
    base_dir, adapter_dirs, _ = checkpoints
    group = LoRAGroup(load_model(base_dir), adapter_dirs)
    ids = torch.tensor([1, 5, 9])
    ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="adapter_index"):
        group(ids, torch.arange(3), ctx, None, torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="adapter_index"):
        group(ids, torch.arange(3), ctx, None, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="adapters"):
        LoRAGroup(group.base, [])


# ---------------------------------------------------------------------------------------------------------
# Property: adapters exactly as peft writes them, in any mix of experts, score like PeftModel in transformers

PROPERTY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")  # qwen2: q/k/v bias; qwen3: q/k norm
PROPERTY_LAYERS = 3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def property_checkpoints(tmp_path_factory):
    """Per architecture: a base and an unrelated full checkpoint of the same vocabulary."""
    root = tmp_path_factory.mktemp("lora_property")
    return {arch: tuple(make_tiny_checkpoint(root / f"{arch}{seed}", arch, seed=seed,
                                             num_hidden_layers=PROPERTY_LAYERS) for seed in (5, 6))
            for arch in PROPERTY_ARCHS}


@st.composite
def lora_settings(draw):
    settings = dict(r=draw(st.integers(1, 8)), use_rslora=draw(st.booleans()),
                    target_modules=sorted(draw(st.sets(st.sampled_from(TARGETS), min_size=1))))
    alpha = draw(st.none() | st.integers(1, 32) | st.floats(0.5, 32, allow_nan=False))
    if alpha is not None:  # None: peft's default
        settings["lora_alpha"] = alpha
    layers = draw(st.none() | st.sets(st.integers(0, PROPERTY_LAYERS - 1), min_size=1))
    if layers is not None:
        settings["layers_to_transform"] = sorted(layers)
    return settings


def reference_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt, response[:t]) of a transformers (or peft) model, (T,)."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1: -1].log_softmax(-1)
    return logits.gather(1, torch.tensor(response)[:, None])[:, 0]


@torch.no_grad()
@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(arch=st.sampled_from(PROPERTY_ARCHS), adapters=st.lists(lora_settings(), min_size=1, max_size=3),
       with_base=st.booleans(), with_other=st.booleans(), order_seed=st.integers(0, 2**16),
       seed=st.integers(0, 2**16), prompt_len=st.sampled_from([1, 7, 270]), zero=st.booleans())
def test_adapter_experts_score_like_peft(property_checkpoints, arch, adapters, with_base, with_other,
                                         order_seed, seed, prompt_len, zero):
    """Each adapter expert (1-3 per base, any ranks, alphas, rslora, targets over the fused q/k/v and
    gate/up projections, layers_to_transform), mixed with the plain base and an unrelated full expert in any
    order: Engine.score equals PeftModel's forward of that adapter, and a greedy mixture's per-expert
    log-probs and mixture log-prob follow the references."""
    from mope import Engine, SamplingParams

    base_dir, other_dir = property_checkpoints[arch]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [save_adapter(base_dir, Path(tmp) / f"adapter{i}", seed=seed + i, **kw)
                for i, kw in enumerate(adapters)]
        references = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), d).eval()
                      for d in dirs]
        for use, path in ((with_base, base_dir), (with_other, other_dir)):
            if use:
                dirs.append(path)
                references.append(AutoModelForCausalLM.from_pretrained(path).eval())
        order = torch.randperm(len(dirs), generator=torch.Generator().manual_seed(order_seed)).tolist()
        dirs, references = [dirs[i] for i in order], [references[i] for i in order]
        engine = Engine(dirs, block_size=4, num_kv_blocks=512)
        generator = torch.Generator().manual_seed(seed)
        prompt, response = (torch.randint(3, 300, (n,), generator=generator).tolist()
                            for n in (prompt_len, 5))
        scores = engine.score([prompt], [response])[0]
        expected = torch.stack([reference_logprobs(m, prompt, response) for m in references], dim=1)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)

        weights = torch.rand(len(dirs), generator=generator) + 0.1
        if zero and len(dirs) > 1:  # an inactive expert of the group
            weights[0] = 0
        weights = (weights / weights.sum()).tolist()
        greedy = SamplingParams(temperature=0, max_tokens=4)
        out = engine.generate([prompt], weights=[weights], sampling=greedy)[0]
        expert_logprobs = torch.stack([reference_logprobs(m, prompt, out.token_ids) for m in references], 1)
        active = torch.tensor(weights) > 0
        torch.testing.assert_close(out.expert_logprobs[:, active], expert_logprobs[:, active], atol=1e-4,
                                   rtol=1e-4)
        assert out.expert_logprobs[:, ~active].eq(-torch.inf).all()
        mixture = (expert_logprobs + torch.tensor(weights).log()).logsumexp(1)
        torch.testing.assert_close(out.logprobs, mixture, atol=1e-4, rtol=1e-4)
