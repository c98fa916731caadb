"""Our CausalLM against transformers on random tiny checkpoints of every supported architecture:
prefill logits, paged prefill + greedy decode, prefix-cached prefill, training gradients; a fuzz over the
checkpoint configurations (config.json) a model of these architectures can have."""

import json
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine.context import AttentionContext
from mope.engine.loader import load_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so that the scaling bends the frequencies we use
}
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama3-rope-tied-mqa-biases": (
        "llama",
        {
            "rope_parameters": LLAMA3_ROPE,
            "tie_word_embeddings": True,
            "num_key_value_heads": 1,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "mistral": ("mistral", {}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qknorm-wide-heads": ("qwen3", {"head_dim": 32}),  # Hq * D = 128 != hidden 64
}
PROMPT_LENS = (7, 1, 13, 4)
BLOCK_SIZE = 4
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param), arch, seed=len(request.param), **overrides
    )
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # decode all NEW_TOKENS steps
    return load_model(path), reference


def make_prompts(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator) for n in PROMPT_LENS]


class PagedCache:
    """A hand-made paged KV cache: one strided pool per layer (k and v interleaved per block, as a pool
    would), each sequence owning shuffled blocks."""

    def __init__(self, model, num_seqs: int, max_len: int):
        config = model.config
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        num_blocks = num_seqs * blocks_per_seq + 3
        shape = (num_blocks, 2, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        pools = [torch.zeros(shape) for _ in range(config.num_layers)]
        self.kv_cache = [(pool[:, 0], pool[:, 1]) for pool in pools]
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.block_tables = order[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq).int()
        self.lens = [0] * num_seqs

    def slots(self, seq: int, positions: range) -> list[int]:
        return [int(self.block_tables[seq, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    def step(self, model, seqs: list[int], chunks: list[torch.Tensor]) -> torch.Tensor:
        """Feed `chunks[i]` as the next tokens of sequence `seqs[i]`; return each chunk's last logits."""
        is_prefill = any(len(c) != 1 for c in chunks) or all(self.lens[s] == 0 for s in seqs)
        positions, slots, cu = [], [], [0]
        for s, chunk in zip(seqs, chunks, strict=True):
            span = range(self.lens[s], self.lens[s] + len(chunk))
            positions += span
            slots += self.slots(s, span)
            cu.append(cu[-1] + len(chunk))
            self.lens[s] += len(chunk)
        ctx = AttentionContext(
            is_prefill=is_prefill,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            context_lens=torch.tensor([self.lens[s] for s in seqs], dtype=torch.int32),
            slot_mapping=torch.tensor(slots),
            block_tables=self.block_tables[seqs],
        )
        with torch.no_grad():
            hidden = model(torch.cat(chunks), torch.tensor(positions), ctx, self.kv_cache)
            return model.compute_logits(hidden[torch.tensor(cu[1:]) - 1])


def prefill_without_cache(model, prompts: list[torch.Tensor]) -> torch.Tensor:
    cu = torch.tensor([0, *torch.tensor([len(p) for p in prompts]).cumsum(0)], dtype=torch.int32)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    ctx = AttentionContext(is_prefill=True, cu_seqlens_q=cu)
    return model.compute_logits(model(torch.cat(prompts), positions, ctx, None))


def test_prefill_logits_match_transformers(models):
    ours, reference = models
    prompts = make_prompts()
    with torch.no_grad():
        logits = prefill_without_cache(ours, prompts)
        expected = torch.cat([reference(p[None]).logits[0] for p in prompts])
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)


def greedy_paged_decode(model, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill all prompts into a paged cache, then NEW_TOKENS - 1 batched greedy decode steps:
    (S, NEW_TOKENS) tokens and (S, NEW_TOKENS, V) logits."""
    cache = PagedCache(model, len(prompts), max(len(p) for p in prompts) + NEW_TOKENS)
    seqs = list(range(len(prompts)))
    logits = [cache.step(model, seqs, prompts)]
    for _ in range(NEW_TOKENS - 1):
        logits.append(cache.step(model, seqs, list(logits[-1].argmax(-1)[:, None])))
    logits = torch.stack(logits, dim=1)
    return logits.argmax(-1), logits


def test_paged_greedy_decode_matches_full_forward(models):
    """Every decode step's logits equal transformers' full forward over prompt + generated tokens, so
    transformers' greedy search would pick the same tokens."""
    ours, reference = models
    prompts = make_prompts(seed=1)
    tokens, logits = greedy_paged_decode(ours, prompts)
    for s, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference(torch.cat([prompt, tokens[s]])[None]).logits[0, len(prompt) - 1 : -1]
        assert torch.equal(expected.argmax(-1), tokens[s])
        torch.testing.assert_close(logits[s], expected, atol=5e-5, rtol=1e-5)


def test_paged_greedy_decode_matches_generate(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", seed=5)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # decode all NEW_TOKENS steps
    prompts = make_prompts(seed=4)[:2]
    tokens, _ = greedy_paged_decode(load_model(path), prompts)
    for s, prompt in enumerate(prompts):
        with torch.no_grad():
            out = reference.generate(
                prompt[None],
                attention_mask=torch.ones(1, len(prompt)),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        assert torch.equal(out[0, len(prompt) :], tokens[s])


def test_prefill_after_cached_prefix_equals_full_prefill(models):
    ours, _ = models
    prompts = make_prompts(seed=2)
    with torch.no_grad():
        full = prefill_without_cache(ours, prompts)
    ends = torch.tensor(PROMPT_LENS).cumsum(0) - 1
    cache = PagedCache(ours, len(prompts), max(PROMPT_LENS))
    # sequences 0 and 2 get a cached prefix (one ending mid-block, one on a block boundary); 1 and 3 do not
    prefixes = {0: 5, 2: 8}
    cache.step(ours, list(prefixes), [prompts[s][:n] for s, n in prefixes.items()])
    chunks = [prompts[s][prefixes.get(s, 0) :] for s in range(len(prompts))]
    last_logits = cache.step(ours, list(range(len(prompts))), chunks)
    torch.testing.assert_close(last_logits, full[ends], atol=2e-5, rtol=1e-5)


def test_training_forward_gradients_match_transformers(models):
    ours, reference = models
    ours.requires_grad_(True)
    prompts = make_prompts(seed=3)
    targets = [torch.roll(p, -1) for p in prompts]
    loss = torch.nn.functional.cross_entropy(prefill_without_cache(ours, prompts), torch.cat(targets))
    loss.backward()
    reference.zero_grad()
    reference_loss = sum(
        torch.nn.functional.cross_entropy(reference(p[None]).logits[0], t, reduction="sum")
        for p, t in zip(prompts, targets, strict=True)
    ) / sum(PROMPT_LENS)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
    layer, reference_layer = ours.model.layers[0], reference.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        expected = getattr(reference_layer.self_attn, name).weight.grad
        torch.testing.assert_close(qkv.shard(qkv.weight.grad, index), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        ours.model.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4
    )
    ours.zero_grad(set_to_none=True)


def test_decode_without_cache_is_refused(models):
    ours, _ = models
    ctx = AttentionContext(is_prefill=False, context_lens=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_cache"):
        ours(torch.tensor([5]), torch.tensor([0]), ctx, None)


def test_forward_rejects_bad_shapes(models):
    ours, _ = models
    ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="positions"):
        ours(torch.tensor([5, 6]), torch.tensor([0]), ctx, None)
    with pytest.raises(ValueError, match="kv_cache"):
        ours(torch.tensor([5, 6]), torch.tensor([0, 1]), ctx, [])


def test_sliding_window_is_exact_within_and_refused_beyond(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "mistral", sliding_window=8)
    ours, reference = load_model(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = make_prompts()[2][:8]
    with torch.no_grad():
        torch.testing.assert_close(
            prefill_without_cache(ours, [prompt]), reference(prompt[None]).logits[0], atol=2e-5, rtol=1e-5
        )
        with pytest.raises(ValueError, match="sliding window"):
            prefill_without_cache(ours, [make_prompts()[2][:9]])


def edit_checkpoint(path, config=None, weights=None):
    """Rewrite `path`'s config.json (`config(raw dict)` edits it in place) and model.safetensors (same)."""
    if config is not None:
        raw = json.loads((path / "config.json").read_text())
        config(raw)
        (path / "config.json").write_text(json.dumps(raw))
    if weights is not None:
        tensors = load_file(path / "model.safetensors")
        weights(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def move_rope_to_transformers_4_keys(raw: dict, type_key: str = "rope_type") -> None:
    """config.json as transformers 4 wrote it: top-level rope_theta, rope_scaling (none for a plain rope,
    whose other keys, e.g. partial_rotary_factor, are top-level)."""
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    if rope_type == "default":
        raw.update(rope)
    else:
        raw["rope_scaling"] = {type_key: rope_type, **rope}


# Found by the fuzz below; each failed before its fix
CONFIG_CASES = {
    # Qwen3's attention_bias biases o_proj as well as q/k/v (was: o_proj.bias an "unexpected weight")
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}, None),
    # transformers' Qwen2 / Mistral modules have no attention_bias / mlp_bias: keys in their config.json are
    # ignored (were: biases expected, "missing weights")
    "qwen2-mlp-bias-key-ignored": ("qwen2", {"mlp_bias": True}, None),
    "mistral-bias-keys-ignored": ("mistral", {"attention_bias": True, "mlp_bias": True}, None),
    # a top-level original_max_position_embeddings overrides rope_parameters' in transformers 5 (was: ignored,
    # llama3 frequencies bent at the wrong wavelengths)
    "llama3-top-level-original-max-position": (
        "llama",
        {"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 512}},
        lambda raw: raw.update(original_max_position_embeddings=8),
    ),
    # use_sliding_window, but max_window_layers >= the layers: no layer slides (was: refused past the window)
    "qwen2-sliding-window-on-no-layer": (
        "qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 28}, None
    ),
    # Llama never slides: a sliding_window key in its config.json is ignored (was: refused past the window)
    "llama-sliding-window-key-ignored": ("llama", {"sliding_window": 4}, None),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_case_matches_transformers(tmp_path, case):
    arch, overrides, edit = CONFIG_CASES[case]
    path = make_tiny_checkpoint(tmp_path, arch, seed=7, **overrides)
    edit_checkpoint(path, config=edit)
    ours, reference = load_model(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = make_prompts()[2][:10]
    with torch.no_grad():
        torch.testing.assert_close(
            prefill_without_cache(ours, [prompt]), reference(prompt[None]).logits[0], atol=2e-5, rtol=1e-5
        )


UNSUPPORTED = {  # a feature the fuzz may draw -> (config overrides, the word the engine's ValueError names)
    "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
    "dynamic-rope": (
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"
    ),
    "yarn-rope": (
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                             "original_max_position_embeddings": 8}},
        "rope_type",
    ),
    "partial-rotary": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        "partial_rotary_factor",
    ),
}
FUZZ_DECODE_STEPS = 3


@st.composite
def checkpoint_configs(draw):
    """(arch, config overrides, config.json edits, lm_head copy of a tied checkpoint, unsupported feature)."""
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    kv_heads, group = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 3]))  # MQA, MHA, GQA
    heads = kv_heads * group
    config = dict(
        hidden_size=heads * draw(st.sampled_from([4, 8, 12, 16])),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=draw(st.sampled_from([8, 24, 40, 96])),
        num_hidden_layers=draw(st.integers(1, 2)),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        max_position_embeddings=draw(st.sampled_from([16, 64, 512])),
        tie_word_embeddings=draw(st.booleans()),
        bos_token_id=draw(st.sampled_from([1, None])),
        eos_token_id=draw(st.sampled_from([2, [2, 1]])),
        attention_bias=draw(st.booleans()),  # read by Llama and Qwen3 only
        mlp_bias=draw(st.booleans()),  # read by Llama only
    )
    head_dim = draw(st.sampled_from([None, 4, 8, 16, 24, 32, 64]))
    if head_dim is not None or arch == "qwen3":  # Qwen3's default head_dim is 128
        config["head_dim"] = head_dim or 16
    rope_type = draw(st.sampled_from(["default", "linear", "llama3"]))
    rope = {"rope_type": rope_type, "rope_theta": draw(st.sampled_from([100.0, 1e4, 5e5, 1e6]))}
    if rope_type == "linear":
        rope["factor"] = draw(st.sampled_from([1.0, 2.0, 4, 8.0]))
    if rope_type == "llama3":
        low = draw(st.sampled_from([0.5, 1.0, 2.0]))
        rope.update(factor=draw(st.sampled_from([2.0, 8.0, 32.0])), low_freq_factor=low,
                    high_freq_factor=low * draw(st.sampled_from([2, 4, 8])))
        if draw(st.booleans()):  # else max_position_embeddings
            rope["original_max_position_embeddings"] = draw(st.sampled_from([4, 16, 64]))
    config["rope_parameters"] = rope
    if arch == "llama":
        config.update(pretraining_tp=draw(st.sampled_from([1, 2])))  # transformers 5 ignores it
    config["attention_dropout"] = draw(st.sampled_from([0.0, 0.1]))  # training only
    if arch == "mistral":
        config["sliding_window"] = draw(st.sampled_from([None, 4, 8, 16, 4096]))
    elif draw(st.booleans()):  # Qwen's keys; transformers' Llama ignores them
        config.update(use_sliding_window=draw(st.booleans()),
                      sliding_window=draw(st.sampled_from([4, 8, 16])),
                      max_window_layers=draw(st.sampled_from([0, 1, 28])))
        if config["use_sliding_window"] and draw(st.booleans()):
            layers = config["num_hidden_layers"]
            layer_type = st.sampled_from(["full_attention", "sliding_attention"])
            config["layer_types"] = draw(st.lists(layer_type, min_size=layers, max_size=layers))
    unsupported = draw(st.sampled_from([None] * 6 + list(UNSUPPORTED)))
    if unsupported is not None:
        config.update(UNSUPPORTED[unsupported][0])
    spelling = draw(st.sampled_from(["rope_parameters", "rope_scaling+rope_type", "rope_scaling+type"]))
    top_level_original_max = draw(st.sampled_from([None, 8])) if rope_type == "llama3" else None

    def edit(raw):
        if spelling != "rope_parameters":
            move_rope_to_transformers_4_keys(raw, spelling.split("+")[1])
        if top_level_original_max is not None:
            raw["original_max_position_embeddings"] = top_level_original_max

    head_copy = draw(st.sampled_from([None, "equal", "distinct"])) if config["tie_word_embeddings"] else None
    if head_copy == "distinct" and unsupported is None:
        unsupported = "distinct-tied-lm-head"
    return arch, config, edit, head_copy, unsupported


def sliding_window_of(reference) -> int | None:
    """The window transformers slides in some layer of `reference`, or None (Llama never slides)."""
    config = reference.config
    if config.model_type == "mistral" or (
        config.model_type.startswith("qwen") and "sliding_attention" in config.layer_types
    ):
        return config.sliding_window
    return None


def refused_past_window(window: int | None, max_position: int, run):
    """run(), which must raise the sliding-window ValueError if `max_position` is past `window`; None then."""
    if window is None or max_position < window:
        return run()
    with pytest.raises(ValueError, match="sliding window"):
        run()
    return None


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=checkpoint_configs(), lens=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_fuzz_checkpoint_configs_match_transformers_or_are_refused(drawn, lens, seed):
    """What a checkpoint's config.json can say (in transformers 5 or 4 spelling), saved by transformers with
    random weights: loaded, the engine equals transformers on a prefill of a batch of prompts and on a paged
    prefill + decode steps, or it refuses with a ValueError naming the unsupported feature; past the window of
    a model transformers slides in some layer, CausalLM.forward refuses."""
    arch, overrides, edit, head_copy, unsupported = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp), arch, vocab=301 + seed % 40, seed=seed, **overrides)

        def copy_head(tensors):
            embedding = tensors["model.embed_tokens.weight"]
            tensors["lm_head.weight"] = (
                embedding.clone() if head_copy == "equal" else torch.randn_like(embedding)
            )

        edit_checkpoint(path, config=edit, weights=copy_head if head_copy else None)
        if unsupported is not None:
            feature = UNSUPPORTED[unsupported][1] if unsupported in UNSUPPORTED else "tie_word_embeddings"
            with pytest.raises(ValueError, match=feature):
                load_model(path)
            return
        ours = load_model(path)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = reference.config
    assert (ours.config.bos_token_id, ours.config.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    window = sliding_window_of(reference)
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 301, (n,), generator=generator) for n in lens]
    with torch.no_grad():
        logits = refused_past_window(window, max(lens) - 1, partial(prefill_without_cache, ours, prompts))
        if logits is not None:
            expected = torch.cat([reference(p[None]).logits[0] for p in prompts])
            torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
        cache = PagedCache(ours, len(prompts), max(lens) + FUZZ_DECODE_STEPS)
        seqs, chunks, generated = list(range(len(prompts))), prompts, []
        for step in range(FUZZ_DECODE_STEPS):
            last = refused_past_window(window, max(lens) - 1 + step, partial(cache.step, ours, seqs, chunks))
            if last is None:
                break
            for s, prompt in enumerate(prompts):
                context = torch.cat([prompt, *(tokens[s : s + 1] for tokens in generated)])
                expected = reference(context[None]).logits[0, -1]
                torch.testing.assert_close(last[s], expected, atol=5e-5, rtol=1e-5)
            generated.append(last.argmax(-1))
            chunks = list(generated[-1][:, None])


def test_a_model_without_layers_is_its_embedding_norm_and_head(tmp_path):
    """num_hidden_layers = 0 (transformers builds it): prefill and decode give transformers' logits."""
    path = make_tiny_checkpoint(tmp_path / "no-layers", "llama", num_hidden_layers=0)
    ours, reference = load_model(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = make_prompts()[0]
    with torch.no_grad():
        expected = reference(prompt[None]).logits[0]
        torch.testing.assert_close(prefill_without_cache(ours, [prompt]), expected, atol=2e-5, rtol=1e-5)
        cache = PagedCache(ours, 1, len(prompt))
        cache.step(ours, [0], [prompt[:-1]])
        last = cache.step(ours, [0], [prompt[-1:]])[0]
        torch.testing.assert_close(last, expected[-1], atol=2e-5, rtol=1e-5)
