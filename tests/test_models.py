"""Our CausalLM against transformers on random tiny checkpoints of every supported architecture:
prefill logits, paged prefill + greedy decode, prefix-cached prefill, training gradients."""

import pytest
import torch
from helpers import make_tiny_checkpoint
from mope.engine.context import AttentionContext
from mope.engine.loader import load_model
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
