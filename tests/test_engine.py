"""Engine.generate / score end to end on tiny random checkpoints, against transformers as the reference."""

from dataclasses import replace

import pytest
import torch
from helpers import make_tiny_checkpoint, save_adapter
from mope.engine.engine import Engine
from mope.engine.loader import load_model, load_tokenizer
from mope.engine.sampling_params import SamplingParams
from mope.engine.sequence import row_seed
from mope.kernels import mix_sample
from peft import PeftModel
from transformers import AutoModelForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 5, 9, 23, 44], [1, 7, 8] * 7, [1, 100], [1, 42, 43, 44, 45, 46, 47, 48, 49]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {
        "llama": make_tiny_checkpoint(root / "llama", "llama", seed=1),
        "qwen2": make_tiny_checkpoint(root / "qwen2", "qwen2", seed=2, num_key_value_heads=1),
        "pcm": make_tiny_checkpoint(root / "pcm", "llama", seed=3, hidden_size=32, num_attention_heads=2),
        "other_vocab": make_tiny_checkpoint(root / "other_vocab", "llama", vocab=336, seed=4),
    }


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in checkpoints.items()}


def hf_next_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def reference_mixture(models, weights: list[float], prompt: list[int], steps: int, mode: str = "prob"):
    """The plain loop a user would write: every expert over the whole sequence, mix, argmax."""
    ids, tokens, logprobs, expert_logprobs = list(prompt), [], [], []
    for _ in range(steps):
        log_p = torch.stack([torch.log_softmax(hf_next_logits(m, ids), -1) for m in models])
        w = torch.tensor(weights)[:, None]
        if mode == "prob":
            log_pi = torch.log((w * log_p.exp()).sum(0))
        else:
            log_pi = torch.log_softmax((w * torch.where(w > 0, log_p, 0)).sum(0), -1)
        token = int(log_pi.argmax())
        tokens.append(token)
        logprobs.append(float(log_pi[token]))
        expert_logprobs.append(torch.where(w[:, 0] > 0, log_p[:, token], -torch.inf))
        ids.append(token)
    return tokens, torch.tensor(logprobs), torch.stack(expert_logprobs)


def test_one_expert_greedy_equals_transformers_generate(checkpoints, hf_models):
    engine = Engine([checkpoints["llama"]])
    steps = 32
    sampling = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    outputs = engine.generate(PROMPTS, sampling=sampling)
    hf = hf_models["llama"]
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                          output_logits=True, return_dict_in_generate=True)
        assert out.token_ids == ref.sequences[0, len(prompt):].tolist()
        ref_logprobs = torch.stack([torch.log_softmax(logits[0].float(), -1)[t] for logits, t in
                                    zip(ref.logits, out.token_ids, strict=True)])
        torch.testing.assert_close(out.logprobs, ref_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.expert_logprobs[:, 0], out.logprobs)
        assert out.weights.shape == (steps, 1) and bool((out.weights == 1).all())
        assert out.finish_reason == "length" and out.prompt_token_ids == prompt
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_engines_follow_transformers(checkpoints, hf_models, dtype, atol):
    """Greedy tokens as transformers' in the same dtype; log-probs within the dtype's rounding of the fp32
    model's (measured 0.05 for bf16, 0.006 for fp16); generate's log-probs are score's."""
    engine = Engine([checkpoints["llama"]], dtype=dtype)
    half = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=dtype).eval()
    sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt, out in zip(PROMPTS[:2], engine.generate(PROMPTS[:2], sampling=sampling), strict=True):
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        ref = half.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False, max_new_tokens=8,
                            min_new_tokens=8)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        with torch.no_grad():
            log_p = torch.log_softmax(hf_models["llama"](ref).logits[0].float(), -1)
        fp32 = log_p[torch.arange(len(prompt) - 1, len(prompt) + 7), torch.tensor(out.token_ids)]
        torch.testing.assert_close(out.logprobs, fp32, atol=atol, rtol=0)
        torch.testing.assert_close(engine.score([prompt], [out.token_ids])[0][:, 0], out.logprobs, atol=1e-3,
                                   rtol=0)


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_mixture_greedy_equals_a_reference_loop(checkpoints, hf_models, mode):
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], mix_mode=mode)
    weights = [[0.3, 0.7], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    outputs = engine.generate(PROMPTS, weights=weights, sampling=GREEDY)
    models = [hf_models["llama"], hf_models["qwen2"]]
    for prompt, w, out in zip(PROMPTS, weights, outputs, strict=True):
        tokens, logprobs, expert_logprobs = reference_mixture(models, w, prompt, GREEDY.max_tokens, mode)
        assert out.token_ids == tokens
        torch.testing.assert_close(out.logprobs, logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.expert_logprobs, expert_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.weights, torch.tensor([w] * GREEDY.max_tokens))


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_sampling_follows_mix_sample_on_transformers_logits(checkpoints, hf_models, mode):
    """temperature, top_p, top_k, the seed and the step offset all reach the draw: each token is the one
    mix_sample's torch reference draws from transformers' logits with the row's seed at that step."""
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], mix_mode=mode)
    sampling = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, seed=11, max_tokens=12, ignore_eos=True)
    weights = [[0.3, 0.7], [0.5, 0.5]]
    outputs = engine.generate(PROMPTS[:2], weights=weights, sampling=sampling)
    models = [hf_models["llama"], hf_models["qwen2"]]
    for request, (prompt, w, out) in enumerate(zip(PROMPTS[:2], weights, outputs, strict=True)):
        ids = list(prompt)
        for step, token in enumerate(out.token_ids):
            logits = torch.stack([hf_next_logits(m, ids) for m in models])[:, None]  # (K, 1, V)
            ref = mix_sample(logits, torch.tensor([w]), temperature=0.7, top_p=0.8, top_k=5, mode=mode,
                             seed=row_seed(11, request, 0), offset=step, backend="torch")
            assert token == int(ref.tokens[0]), (request, step)
            torch.testing.assert_close(out.logprobs[step], ref.logprobs[0], atol=1e-4, rtol=1e-4)
            ids.append(token)
    other_seed = engine.generate(PROMPTS[:2], weights=weights, sampling=replace(sampling, seed=12))
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in outputs]


def test_a_pool_far_too_small_preempts_and_gives_the_same_outputs(checkpoints):
    experts = [checkpoints["llama"], checkpoints["qwen2"]]
    prompts = PROMPTS * 2
    weights = [[0.5, 0.5], [1.0, 0.0], [0.2, 0.8], [0.0, 1.0]] * 2
    sampling = [SamplingParams(temperature=i % 2, max_tokens=12, ignore_eos=True, seed=7, n=1 + (i % 3 == 1))
                for i in range(8)]  # greedy and sampled rows, some forked
    roomy = Engine(experts, block_size=4).generate(prompts, weights=weights, sampling=sampling)
    small = Engine(experts, block_size=4, num_kv_blocks=16)
    tight = small.generate(prompts, weights=weights, sampling=sampling)
    assert small.scheduler.num_preemptions > 0
    assert len(tight) == 8 + 3
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    for a, b in zip(tight, roomy, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    assert small.block_manager.num_free_blocks == 16


def count_prefill_tokens(engine: Engine) -> list[int]:
    """Tokens each model computes in prefill steps, counted by a forward hook."""
    counts = [0] * len(engine.runner.models)
    for i, model in enumerate(engine.runner.models):
        def hook(module, args, i=i):
            if args[2].is_prefill:
                counts[i] += args[0].numel()
        model.register_forward_pre_hook(hook)
    return counts


def test_n_samples_fork_after_one_prefill_and_match_teacher_forcing(checkpoints):
    engine = Engine([checkpoints["llama"]], block_size=4)
    computed = count_prefill_tokens(engine)
    prompts = [[1, 5, 9, 23, 44, 50], [1, 100, 101]]  # partly filled last blocks: copy-on-write
    outputs = engine.generate(prompts, sampling=SamplingParams(max_tokens=12, ignore_eos=True, n=2, seed=3))
    assert len(outputs) == 4
    assert [o.prompt_token_ids for o in outputs] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert computed[0] == 6 + 3  # each prompt computed once for both samples
    assert outputs[0].token_ids != outputs[1].token_ids and outputs[2].token_ids != outputs[3].token_ids
    scores = engine.score([o.prompt_token_ids for o in outputs], [o.token_ids for o in outputs])
    for out, score in zip(outputs, scores, strict=True):
        # each fork's cache held its own tokens: its recorded log-probs are the teacher-forced ones
        torch.testing.assert_close(out.logprobs, score[:, 0], atol=1e-4, rtol=1e-4)
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    again = engine.generate(prompts[:1], sampling=SamplingParams(max_tokens=12, ignore_eos=True, n=2, seed=3))
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs[:2]]  # batch invariant, seeded


def test_identical_prompts_of_one_prefill_are_computed_once_and_then_decode_apart(checkpoints):
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], block_size=4)
    computed = count_prefill_tokens(engine)
    same, other = [1, 5, 9, 23, 44, 50], [1, 100, 101]  # partly filled last blocks: copy-on-write
    weights = [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]  # the last runs only the second expert
    sampling = SamplingParams(max_tokens=12, ignore_eos=True, seed=3)
    outputs = engine.generate([same, other, same, same], weights=weights, sampling=sampling)
    assert computed == [6 + 3, 6 + 3]  # `same` once per model, for all three requests
    assert len({tuple(o.token_ids) for o in outputs}) == 4  # each request draws with its own seed
    scores = engine.score([o.prompt_token_ids for o in outputs], [o.token_ids for o in outputs])
    for out, score, w in zip(outputs, scores, weights, strict=True):
        # each request's cache held its own tokens after the shared prefill: teacher forcing agrees
        active = torch.tensor(w) > 0
        torch.testing.assert_close(out.expert_logprobs[:, active], score[:, active], atol=1e-4, rtol=1e-4)
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    alone = [engine.generate([prompt], weights=[w], sampling=GREEDY)[0].token_ids
             for prompt, w in zip([same, other, same, same], weights, strict=True)]
    together = engine.generate([same, other, same, same], weights=weights, sampling=GREEDY)
    assert [o.token_ids for o in together] == alone


def test_a_shared_prompt_prefix_is_computed_once_per_model(checkpoints):
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], block_size=4)
    computed = count_prefill_tokens(engine)
    prefix = [1, 5, 9, 23, 44, 50, 51, 52]  # two full blocks
    first = engine.generate([prefix + [60, 61]], weights=[[0.5, 0.5]], sampling=GREEDY)
    assert computed == [10, 10]
    second = engine.generate([prefix + [70]], weights=[[0.5, 0.5]], sampling=GREEDY)
    assert computed == [10 + 1, 10 + 1]  # only the new token: 8 cached for each model
    only_qwen = engine.generate([prefix + [80]], weights=[[0.0, 1.0]], sampling=GREEDY)
    assert computed == [11, 12]
    engine.reset_prefix_cache(0)
    engine.generate([prefix + [90]], weights=[[0.5, 0.5]], sampling=GREEDY)
    assert computed == [11 + 9, 12 + 1]  # model 0 recomputes the whole prompt, model 1 hits its cache
    with pytest.raises(ValueError, match="model must be"):
        engine.reset_prefix_cache(2)
    fresh = Engine([checkpoints["llama"], checkpoints["qwen2"]], block_size=4)
    for out, prompt, w in ((first, prefix + [60, 61], [0.5, 0.5]), (second, prefix + [70], [0.5, 0.5]),
                           (only_qwen, prefix + [80], [0.0, 1.0])):
        assert out[0].token_ids == fresh.generate([prompt], weights=[w], sampling=GREEDY)[0].token_ids


def test_score_gives_every_experts_teacher_forced_logprobs(checkpoints, hf_models):
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]])
    tokenizer = load_tokenizer(checkpoints["llama"])
    prompts, responses = ["The quick brown fox", [1, 7, 8, 9]], [" jumps over", [30, 31, 32, 33, 34]]
    scores = engine.score(prompts, responses)
    for prompt, response, score in zip(prompts, responses, scores, strict=True):
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        response_ids = tokenizer.encode(response, add_special_tokens=False) if isinstance(response, str) \
            else response
        ids = torch.tensor([prompt_ids + response_ids])
        expected = []
        for name in ("llama", "qwen2"):
            with torch.no_grad():
                log_p = torch.log_softmax(hf_models[name](ids).logits[0].float(), -1)
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
            expected.append(log_p[positions, torch.tensor(response_ids)])
        torch.testing.assert_close(score, torch.stack(expected, 1), atol=1e-4, rtol=1e-4)
    # over the token budget of one pass, score splits the requests into several: the same result
    split = Engine([checkpoints["llama"], checkpoints["qwen2"]], max_num_batched_tokens=12)
    passes, score_batch = [], split.runner._score_batch
    split.runner._score_batch = lambda batch: passes.append(len(batch)) or score_batch(batch)
    for whole, part in zip(scores, split.score(prompts, responses), strict=True):
        torch.testing.assert_close(part, whole, atol=1e-5, rtol=1e-5)
    assert passes == [1, 1]


class StubProvider:
    """A tiny random CausalLM plus a linear head; the preference string lists the active experts ("ab")."""

    def __init__(self, path, num_experts: int, scale: float = 1.0):
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        self.head = torch.nn.Linear(self.model.config.hidden_size, num_experts)
        torch.nn.init.normal_(self.head.weight, std=scale)
        self.calls = 0

    def prepare(self, prompt: str, preference: str) -> tuple[list[int], list[bool]]:
        return self.tokenizer.encode(f"{preference}: {prompt}"), [c in preference for c in "ab"]

    def weights(self, hidden, active):
        self.calls += 1
        scores = self.head(hidden).masked_fill(~active, -torch.inf)
        return torch.softmax(scores, dim=-1)


def test_a_weight_provider_drives_the_weights(checkpoints, hf_models):
    provider = StubProvider(checkpoints["pcm"], 2)
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], pcm=provider)
    texts = ["The quick brown fox", "Explain the answer"]
    outputs = engine.generate(texts, preferences=["ab", "b"], sampling=GREEDY)
    pcm, experts = hf_models["pcm"], [hf_models["llama"], hf_models["qwen2"]]
    tokenizer = load_tokenizer(checkpoints["llama"])
    for text, preference, out in zip(texts, ["ab", "b"], outputs, strict=True):
        assert out.provider_prompt_ids == tokenizer.encode(f"{preference}: {text}")
        assert out.prompt_token_ids == tokenizer.encode(text)
        active = torch.tensor([[c in preference for c in "ab"]])
        for t in range(GREEDY.max_tokens):
            with torch.no_grad():
                hidden = pcm(torch.tensor([out.provider_prompt_ids + out.token_ids[:t]]),
                             output_hidden_states=True).hidden_states[-1][:, -1]
                expected = provider.weights(hidden, active)[0]
            torch.testing.assert_close(out.weights[t], expected, atol=1e-5, rtol=1e-4)
            ids = out.prompt_token_ids + out.token_ids[:t]
            probs = [torch.softmax(hf_next_logits(m, ids), -1) for m in experts]
            assert out.token_ids[t] == int((expected[0] * probs[0] + expected[1] * probs[1]).argmax())
        assert bool((out.weights[:, ~active[0]] == 0).all())


def test_a_provider_off_the_simplex_is_named(checkpoints):
    provider = StubProvider(checkpoints["pcm"], 2)
    provider.weights = lambda hidden, active: torch.full(active.shape, 0.7)
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], pcm=provider)
    with pytest.raises(ValueError, match="weight provider StubProvider gave weights off the simplex"):
        engine.generate(["hello"], preferences=["ab"], sampling=GREEDY)
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks  # the failed requests were dropped
    assert engine.scheduler.is_finished()


def test_bad_inputs_are_value_errors_naming_the_problem(checkpoints):
    engine = Engine([checkpoints["llama"], checkpoints["qwen2"]], num_kv_blocks=40)
    cases = [
        (dict(prompts=[[1, 2]], weights=[[0.5, 0.3, 0.2]]), r"weights must have shape \(B, K\) = \(1, 2\)"),
        (dict(prompts=[[1, 2]], weights=[[0.7, 0.7]]), "weights gave weights off the simplex"),
        (dict(prompts=[[1, 2]], weights=[[1.5, -0.5]]), "off the simplex"),
        (dict(prompts=[[1, 2], []], weights=[[1, 0], [1, 0]]), r"prompts\[1\] is empty"),
        (dict(prompts=[""], weights=[[1, 0]]), r"prompts\[0\] is empty"),
        (dict(prompts=[[1] * 513], weights=[[0, 1]]), r"prompts\[0\] has 513 tokens for expert 1 .*\(512\)"),
        (dict(prompts=[[1] * 300], weights=[[0.5, 0.5]]), r"prompts\[0\] needs up to 64 KV blocks"),
        (dict(prompts=[[1, 2]]), "pass weights"),
        (dict(prompts=[[1, 2]], weights=[[1, 0]], preferences=["ab"]), "not both"),
        (dict(prompts=[[1, 2]], preferences=["ab"]), "need a weight provider"),
        (dict(prompts=[[1, 999]], weights=[[1, 0]]), r"prompts\[0\] must hold token ids"),
        (dict(prompts=[[1, 2]], weights=[[1, 0]], sampling=[GREEDY, GREEDY]), "sampling must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(**kwargs)
    assert engine.scheduler.is_finished()


BAD_ENGINE_ARGUMENTS = [("block_size", 0), ("num_kv_blocks", 0), ("kv_cache_memory", 100),
                        ("mix_mode", "sum"), ("dtype", torch.int8), ("max_num_seqs", 0),
                        ("max_num_batched_tokens", 1.5)]


@pytest.mark.parametrize("argument, value", BAD_ENGINE_ARGUMENTS)
def test_bad_engine_arguments_are_named(checkpoints, argument, value):
    with pytest.raises(ValueError, match=argument):
        Engine([checkpoints["llama"]], **{argument: value})


def test_missing_or_empty_experts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="experts must be a non-empty list"):
        Engine([])
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine([tmp_path])


def test_mismatched_vocabularies_are_refused_naming_both_models(checkpoints):
    with pytest.raises(ValueError, match=r"expert 0 \(.*llama\) and expert 1 \(.*other_vocab\) do not share"):
        Engine([checkpoints["llama"], checkpoints["other_vocab"]])


BAD_SAMPLING = [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_tokens", 0),
                ("n", 0), ("seed", 1.5), ("ignore_eos", 1)]


@pytest.mark.parametrize("field, value", BAD_SAMPLING)
def test_sampling_params_are_validated(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_generation_stops_at_eos(checkpoints, capsys):
    engine = Engine([checkpoints["llama"]])
    eos = engine.tokenizer.eos_token_id
    first = engine.generate([PROMPTS[0]], sampling=GREEDY)[0]
    # make the greedy 3rd token an end of sequence by declaring it one
    engine.scheduler.eos_ids = {first.token_ids[2], eos}
    stopping = SamplingParams(temperature=0, max_tokens=16)
    out = engine.generate([PROMPTS[0]], sampling=stopping, progress=True)[0]
    assert "generate: 100%" in capsys.readouterr().err  # the progress bar over requests
    assert out.token_ids == first.token_ids[:3] and out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_lora_adapter_experts_share_one_base_forward_and_equal_merged_models(checkpoints, hf_models,
                                                                             tmp_path):
    base = checkpoints["llama"]
    settings = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                dict(r=8, lora_alpha=8, target_modules=["o_proj", "up_proj"])]
    adapters = [save_adapter(base, tmp_path / f"a{i}", i, **kw) for i, kw in enumerate(settings)]
    engine = Engine([adapters[0], adapters[1], base, checkpoints["qwen2"]])
    assert len(engine.runner.groups) == 2  # the two adapters and their base in one forward, qwen2 alone
    weights = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.4, 0.3, 0.2, 0.1]]
    outputs = engine.generate(PROMPTS, weights=weights, sampling=GREEDY)
    merged = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a).merge_and_unload()
              for a in adapters]
    references = [*merged, hf_models["llama"], hf_models["qwen2"]]
    for prompt, w, out in zip(PROMPTS, weights, outputs, strict=True):
        tokens, logprobs, _ = reference_mixture(references, w, prompt, GREEDY.max_tokens)
        assert out.token_ids == tokens
        torch.testing.assert_close(out.logprobs, logprobs, atol=1e-4, rtol=1e-4)
    scores = engine.score(PROMPTS[:1], [outputs[0].token_ids])[0]
    torch.testing.assert_close(scores[:, 0], outputs[0].logprobs, atol=1e-4, rtol=1e-4)
