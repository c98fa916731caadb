"""Random workloads through a KV pool far too small and tight batch limits, against an unconstrained run of
the same requests and transformers' teacher-forced log-probs.

A workload mixes what the engine tests check one at a time: prompts sharing prefixes of any length, identical
prompts and 1-token prompts (prefix cache, block boundaries), n > 1 (fork, copy-on-write), reachable EOS,
greedy and seeded sampled rows, weight-0 experts, a weight provider with its own track, a LoRA expert, and
preemption with recompute. After every schedule the block bookkeeping must match the running sequences, and
after generate the pool must be free again.
"""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_checkpoint, save_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine.engine import Engine
from mope.engine.loader import load_model, load_tokenizer
from mope.engine.sampling_params import SamplingParams
from peft import PeftModel
from transformers import AutoModelForCausalLM

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)
CODES = "abc"  # a preference names its active experts by these letters, one per expert
STEM_LENGTH = 16
SHORT_CONTEXT = 20  # expert 2's
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


class Provider:
    """A weight provider over a tiny CausalLM: a fixed random head on its last hidden state."""

    def __init__(self, path):
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        self.head = torch.randn(len(CODES), self.model.config.hidden_size,
                                generator=torch.Generator().manual_seed(0))

    def prepare(self, prompt: str, preference: str) -> tuple[list[int], list[bool]]:
        return self.tokenizer.encode(f"{preference}: {prompt}"), [c in preference for c in CODES]

    def weights(self, hidden, active):
        return torch.softmax((hidden.float() @ self.head.T).masked_fill(~active, -torch.inf), dim=-1)


@pytest.fixture(scope="module")
def one_thread():
    """Thousands of steps of tiny models: a second thread gains nothing, and under load the two threads of
    each kernel's parallel region wait for each other (measured 5x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("stress")
    base = make_tiny_checkpoint(root / "llama", "llama", seed=1, **TINY)
    adapter = save_adapter(base, root / "adapter", seed=2, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "up_proj"])
    # models of different KV shapes share the pool: each reads its own strided views of the blocks
    # (and this one's short context ends some responses early)
    qwen = make_tiny_checkpoint(root / "qwen2", "qwen2", seed=3, **dict(
        TINY, hidden_size=48, num_attention_heads=3, num_key_value_heads=3, num_hidden_layers=1,
        max_position_embeddings=SHORT_CONTEXT))
    pcm = make_tiny_checkpoint(root / "pcm", "llama", seed=4, **dict(TINY, num_hidden_layers=3))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    experts = [base, adapter, qwen]
    provider = Provider(pcm)
    return SimpleNamespace(
        experts=experts,
        provider=provider,
        hf_experts=[AutoModelForCausalLM.from_pretrained(base).eval(), merged.eval(),
                    AutoModelForCausalLM.from_pretrained(qwen).eval()],
        hf_pcm=AutoModelForCausalLM.from_pretrained(pcm).eval(),
        reference=Engine(experts, pcm=provider, block_size=16),  # a large pool and the default limits
    )


@st.composite
def workloads(draw):
    """Requests over prefixes of one stem, their sampling, weights or preferences, EOS and limits."""
    stem = draw(st.lists(st.integers(3, 299), min_size=STEM_LENGTH, max_size=STEM_LENGTH))
    block_size = draw(st.integers(1, 6))
    by_preference = draw(st.booleans())
    requests = []
    for _ in range(draw(st.integers(2, 6))):
        if requests and draw(st.integers(0, 3)) == 0:
            prompt = draw(st.sampled_from([r.prompt for r in requests]))  # an identical prompt
        else:
            # a prefix of the stem (simplest: all of it), or one starting a block or two in: its first block
            # is then another prompt's second or third, which must not be a prefix-cache hit
            start = draw(st.sampled_from([0, block_size, 2 * block_size]))
            end = STEM_LENGTH - draw(st.integers(0, STEM_LENGTH))
            tail = draw(st.lists(st.integers(3, 299), min_size=int(end <= start), max_size=3))
            prompt = stem[start:end] + tail
        mask = draw(st.integers(1, 2 ** len(CODES) - 1))  # the active experts, at least one
        active = [bool(mask >> k & 1) for k in range(len(CODES))]
        shares = [draw(st.integers(1, 3)) if a else 0 for a in active]
        sampling = SamplingParams(
            temperature=draw(st.sampled_from([0.0, 1.0, 0.7])), top_p=draw(st.sampled_from([1.0, 0.9])),
            top_k=draw(st.sampled_from([0, 8])), max_tokens=draw(st.integers(1, 14)),
            seed=draw(st.integers(0, 3)), ignore_eos=draw(st.booleans()), n=draw(st.integers(1, 4)))
        requests.append(SimpleNamespace(
            prompt=prompt, sampling=sampling,
            weights=[s / sum(shares) for s in shares],
            preference="".join(c for c, a in zip(CODES, active, strict=True) if a) if by_preference else None,
        ))
    eos_every = draw(st.sampled_from([5, 1000]))  # token t is an end of sequence when t % eos_every == 0
    return SimpleNamespace(
        requests=requests, by_preference=by_preference, eos_ids={2, *range(0, 320, eos_every)},
        block_size=block_size, spare_blocks=draw(st.integers(0, 1)),
        max_num_seqs=4 - draw(st.integers(0, 3)), max_num_batched_tokens=draw(st.integers(1, 24)),
        forget=draw(st.sampled_from([(), (None,), (0,), (1,), (2,), (3,)])),  # models to reset_prefix_cache
    )


def generate(engine: Engine, workload) -> list:
    engine.scheduler.eos_ids = workload.eos_ids
    requests = workload.requests
    mixture = dict(preferences=[r.preference for r in requests]) if workload.by_preference \
        else dict(weights=[r.weights for r in requests])
    return engine.generate([r.prompt for r in requests], sampling=[r.sampling for r in requests], **mixture)


def track_prompts(setup, request) -> list[list[int]]:
    """What each model of the request reads before its response: its active experts, then the provider."""
    prompts = [request.prompt for w in request.weights if w > 0]
    if request.preference is not None:
        text = setup.reference.tokenizer.decode(request.prompt)
        prompts.append(setup.provider.prepare(text, request.preference)[0])
    return prompts


def room(request) -> int:
    """The most tokens a response gets: max_tokens, or less where expert 2's context ends first."""
    if request.weights[2] == 0:
        return request.sampling.max_tokens
    return min(request.sampling.max_tokens, SHORT_CONTEXT - len(request.prompt) + 1)


def blocks_needed(setup, request, block_size: int) -> int:
    """KV blocks the request takes alone at its longest (the last token is never written)."""
    return sum(-(-(len(p) + room(request) - 1) // block_size) for p in track_prompts(setup, request))


def check_step(engine: Engine, seqs: list, is_prefill: bool) -> None:
    """The block bookkeeping after a schedule: reference counts are the running tracks' references, the
    free set is the unreferenced blocks, and every block the step writes belongs to one track only."""
    manager, scheduler, bs = engine.block_manager, engine.scheduler, engine.block_size
    assert all(not t.block_table for seq in scheduler.waiting for t in seq.tracks)
    counts = [0] * len(manager.blocks)
    for seq in scheduler.running:
        for track in seq.tracks:
            for block_id in track.block_table:
                counts[block_id] += 1
    assert [b.ref_count for b in manager.blocks] == counts
    assert set(manager.free_block_ids) == {i for i, c in enumerate(counts) if c == 0}
    written = []
    tracks = [track for seq in seqs for track in seq.tracks]
    for seq in seqs:
        for track in seq.tracks:
            num_tokens = seq.num_tokens(track)
            assert len(track.block_table) == -(-num_tokens // bs)
            if track.twin is not None:  # an identical prompt of this prefill computes it: nothing to write
                twin = track.twin
                assert is_prefill and twin.twin is None and any(twin is t for t in tracks)
                assert (twin.model, twin.block_table) == (track.model, track.block_table)
                assert seq.token_ids(track, 0, num_tokens) == next(
                    s.token_ids(twin, 0, num_tokens) for s in seqs if any(twin is t for t in s.tracks))
                continue
            start = track.num_cached_tokens if is_prefill else num_tokens - 1
            blocks = [track.block_table[p // bs] for p in range(start, num_tokens)]
            sharers = 1 + sum(t.twin is track for t in tracks)  # copy-on-write came first; twins share
            assert all(manager.blocks[b].ref_count == sharers for b in blocks)
            written += [b * bs + p % bs for b, p in zip(blocks, range(start, num_tokens), strict=True)]
    assert len(written) == len(set(written))


def checked(engine: Engine) -> Engine:
    schedule = engine.scheduler.schedule

    def schedule_and_check():
        seqs, is_prefill = schedule()
        check_step(engine, seqs, is_prefill)
        return seqs, is_prefill

    engine.scheduler.schedule = schedule_and_check
    return engine


def assert_pool_is_free(engine: Engine) -> None:
    manager = engine.block_manager
    assert engine.scheduler.is_finished()
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager.num_free_blocks == len(manager.blocks)
    assert all(manager.blocks[block_id].hash == h for h, block_id in manager.hash_to_block.items())


@torch.no_grad()
def teacher_forced_log_probs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """(T, V) log-probs of the tempered next-token distribution before each response token."""
    logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1)


@torch.no_grad()
def provider_weights(setup, provider_prompt: list[int], tokens: list[int], preference: str) -> torch.Tensor:
    hidden = setup.hf_pcm(torch.tensor([provider_prompt + tokens[:-1]]), output_hidden_states=True)
    hidden = hidden.hidden_states[-1][0, len(provider_prompt) - 1:]
    active = torch.tensor([[c in preference for c in CODES]] * len(tokens))
    return setup.provider.weights(hidden, active)


def check_against_teacher_forcing(setup, request, out) -> None:
    """Every recorded number from transformers over prompt + response; greedy tokens are the argmax."""
    tokens, temperature = out.token_ids, request.sampling.temperature
    if request.preference is None:
        weights = torch.tensor([request.weights] * len(tokens))
    else:
        weights = provider_weights(setup, out.provider_prompt_ids, tokens, request.preference)
    torch.testing.assert_close(out.weights, weights, **TOLERANCE)
    steps, chosen = torch.arange(len(tokens)), torch.tensor(tokens)
    mixture = torch.zeros(len(tokens), 1)
    expert_logprobs = torch.full((len(tokens), len(CODES)), -torch.inf)
    for k, model in enumerate(setup.hf_experts):
        if request.weights[k] > 0:  # the active experts, by weights or by preference alike
            log_p = teacher_forced_log_probs(model, request.prompt, tokens, temperature)
            expert_logprobs[:, k] = log_p[steps, chosen]
            mixture = mixture + weights[:, k:k + 1] * log_p.exp()
    torch.testing.assert_close(out.expert_logprobs, expert_logprobs, **TOLERANCE)
    log_mixture = mixture.log()
    torch.testing.assert_close(out.logprobs, log_mixture[steps, chosen], **TOLERANCE)
    if temperature == 0:
        assert bool((log_mixture[steps, chosen] >= log_mixture.max(dim=1).values - 1e-5).all()), tokens


def check_finish(request, out, eos_ids: set[int]) -> None:
    tokens, sampling = out.token_ids, request.sampling
    assert 1 <= len(tokens) <= room(request)
    stops = [not sampling.ignore_eos and t in eos_ids for t in tokens]
    assert not any(stops[:-1]), tokens  # nothing after an end of sequence
    assert out.finish_reason == ("stop" if stops[-1] else "length"), (out.finish_reason, tokens)
    if out.finish_reason == "length":
        assert len(tokens) == room(request)


def compare(setup, workload, tight: list, roomy: list) -> None:
    """The constrained run's outputs against the unconstrained run's and against teacher forcing."""
    expanded = [r for r in workload.requests for _ in range(r.sampling.n)]
    assert len(tight) == len(roomy) == len(expanded)  # every sample of every request, none dropped
    for request, a, b in zip(expanded, tight, roomy, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids == request.prompt
        # greedy and seeded rows alike: a row's draws depend on its request, sample and step only
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        for field in ("logprobs", "expert_logprobs", "weights"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), **TOLERANCE)
        check_finish(request, a, workload.eos_ids)
        check_against_teacher_forcing(setup, request, a)


def first_samples(workload, outputs: list) -> list:
    """The output of sample 0 of each request."""
    starts = [sum(r.sampling.n for r in workload.requests[:i]) for i in range(len(workload.requests))]
    return [outputs[i] for i in starts]


def follow_up(workload, outputs: list):
    """Each request again, its prompt extended by all but the last token of its first sample's response
    (blocks filled while decoding become prefix hits), with the tokens left of max_tokens."""
    requests = []
    for request, out in zip(workload.requests, first_samples(workload, outputs), strict=True):
        kept = out.token_ids[:-1]
        sampling = replace(request.sampling, max_tokens=room(request) - len(kept))
        requests.append(SimpleNamespace(**{**vars(request), "prompt": request.prompt + kept,
                                           "sampling": sampling}))
    return SimpleNamespace(**{**vars(workload), "requests": requests})


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workload=workloads())
def test_random_workloads_in_a_tiny_pool_match_an_unconstrained_run_and_teacher_forcing(setup, workload):
    roomy = generate(setup.reference, workload)
    again = follow_up(workload, roomy)
    # a pool just large enough for the largest request alone (of both runs: the provider re-reads text)
    bs = workload.block_size
    pool = max(blocks_needed(setup, r, bs) for r in workload.requests + again.requests)
    constrained = checked(Engine(setup.experts, pcm=setup.provider, block_size=bs,
                                 num_kv_blocks=pool + workload.spare_blocks,
                                 max_num_seqs=workload.max_num_seqs,
                                 max_num_batched_tokens=workload.max_num_batched_tokens))
    tight = generate(constrained, workload)
    assert_pool_is_free(constrained)
    assert_pool_is_free(setup.reference)
    compare(setup, workload, tight, roomy)

    # again, over what the first run left in the prefix cache (its decode blocks included)
    for model in workload.forget:
        constrained.reset_prefix_cache(model)
    tight_again = generate(constrained, again)
    assert_pool_is_free(constrained)
    compare(setup, again, tight_again, generate(setup.reference, again))
    for request, before, after in zip(again.requests, first_samples(workload, tight),
                                      first_samples(again, tight_again), strict=True):
        # greedy with fixed weights: the first response's last token again (the provider re-reads text)
        if request.sampling.temperature == 0 and request.preference is None:
            assert after.token_ids == before.token_ids[-1:]
