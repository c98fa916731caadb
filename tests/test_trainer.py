import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine.sampling_params import SamplingParams

from mope.api import Engine
from mope.config import TrainConfig
from mope.metrics import read_metrics
from mope.pcm import PCM
from mope.preferences import load_registry
from mope.rebel import rebel_loss
from mope.rewards import RuleScorer
from mope.trainer import Trainer, lr_factor
from tests.mope_setup import EXPERT_OF, PROMPTS, TINY_PCM, make_config, make_training_dir, params

TIMINGS = ("rollout_tokens_per_s", "update_tokens_per_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize("mix_mode", ["prob", "logit"])
def test_recomputed_logp_equals_rollout_before_first_update(setup, tmp_path, mix_mode):
    trainer = Trainer(make_config(setup, tmp_path, mix_mode=mix_mode, batch_size=3, temperature=0.8))
    rollout = trainer.rollout(trainer.batch(1), 1)
    assert len(rollout.response_ids) == 6 and sum(rollout.lengths) > 6
    with torch.no_grad():
        recomputed = trainer.policy_logprobs(rollout)
    torch.testing.assert_close(recomputed, rollout.old_logp, atol=1e-4, rtol=0)
    # the PCM really matters: other weights give other log-probs
    with torch.no_grad():
        trainer.pcm.head.weight.add_(torch.randn_like(trainer.pcm.head.weight))
        assert (trainer.policy_logprobs(rollout) - rollout.old_logp).abs().max() > 1e-3


def test_update_lowers_the_rebel_loss_of_its_batch(setup, tmp_path):
    trainer = Trainer(make_config(setup, tmp_path, epochs=3, lr=2e-3, schedule="constant", warmup_steps=0))
    rollout = trainer.rollout(trainer.batch(1), 1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = lambda: rebel_loss(trainer.policy_logprobs(rollout), rollout.old_logp, rewards, 1.0).item()
    with torch.no_grad():
        before = loss()  # = mean((eta * (r(y) - r(y')))^2) = 1: the policy is still the rollout's
    trainer.update(rollout, rewards)
    with torch.no_grad():
        after = loss()
    assert before == pytest.approx(1.0, abs=1e-4) and after < 0.5 * before


def test_minibatches_are_sequential_adamw_steps_on_each_pairs_rebel_loss(setup, tmp_path):
    """minibatch_size 1 over 2 pairs, 2 epochs: four AdamW steps, each on one pair's loss with that pair's
    rewards, replayed here by hand on a copy of the PCM."""
    config = make_config(setup, tmp_path, batch_size=2, minibatch_size=1, epochs=2, lr=1e-2, grad_clip=1e9,
                         schedule="constant", warmup_steps=0)
    trainer = Trainer(config)
    rollout = trainer.rollout(trainer.batch(1), 1)
    rewards = torch.tensor([0.9, 0.1, 0.3, 0.8])
    reference = copy.deepcopy(trainer.pcm)
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=config.weight_decay)
    for _ in range(2):
        for pair in (0, 1):
            part = rollout.pairs(pair, pair + 1)
            loss = rebel_loss(trainer.policy_logprobs(part, reference), part.old_logp,
                              rewards[2 * pair : 2 * pair + 2], config.eta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trainer.update(rollout, rewards)
    assert trainer.optimizer.state[trainer.params[0]]["step"] == 4
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.pcm.state_dict()[name], value, atol=1e-6, rtol=1e-5)


def test_resume_continues_exactly(setup, tmp_path):
    full = Trainer(make_config(setup, tmp_path / "full"))
    full.train()
    interrupted = Trainer(make_config(setup, tmp_path / "resumed"))
    interrupted.train(until=1)
    resumed = Trainer(make_config(setup, tmp_path / "resumed"), resume=True)
    assert resumed.step == 1
    resumed.train()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    full_rows = strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert full_rows == strip(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in full_rows] == [1, 2, 3]
    for name, value in params(full).items():
        torch.testing.assert_close(params(resumed)[name], value, atol=0, rtol=0, msg=name)
    assert resumed.optimizer.state_dict()["state"].keys() == full.optimizer.state_dict()["state"].keys()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [
        "step_000001", "step_000002", "step_000003"]
    row = full_rows[-1]
    assert set(row) >= {"reward", "loss", "lr", "weight/0", "weight/1", "weight/2"}
    assert any(k.startswith("reward/P") for k in row)
    assert math.isclose(sum(row[f"weight/{j}"] for j in range(3)), 1.0, rel_tol=1e-5)


def test_nan_reward_is_counted_and_step_skipped(setup, tmp_path):
    config = make_config(setup, tmp_path, steps=1)
    nan = RuleScorer(lambda prompt, response: math.nan)
    trainer = Trainer(config, scorers={code: nan for code in EXPERT_OF})
    before = params(trainer)
    with pytest.warns(UserWarning, match="NaN/inf reward or loss, update skipped"):
        (record,) = trainer.train()
    assert record["skipped"] and record["nan_skipped"] == 1 and math.isnan(record["loss"])
    for name, value in params(trainer).items():
        assert torch.equal(value, before[name]), name


def test_metrics_plot_and_field_reference(setup, tmp_path):
    trainer = Trainer(make_config(setup, tmp_path, steps=1, plot=True, reference="field:gold"))
    trainer.train()
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["reference"] == "field:gold"
    saved = PCM.load(tmp_path / "checkpoints" / "step_000001" / "pcm")
    for name, value in params(trainer).items():
        torch.testing.assert_close(saved.state_dict()[name], value, atol=0, rtol=0)


def test_lr_schedule_and_config_errors(setup, tmp_path):
    config = make_config(setup, tmp_path, warmup_steps=2, schedule="cosine")
    assert [lr_factor(config, i, 10) for i in (0, 1)] == [0.5, 1.0]
    assert lr_factor(config, 2, 10) == 1.0 and lr_factor(config, 10, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown keys colour"):
        TrainConfig.from_dict({**make_config(setup, tmp_path).to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="missing required keys experts"):
        TrainConfig.from_dict({"prompts": "p", "rewards": {"P1A": {}}, "output_dir": "o"})
    with pytest.raises(ValueError, match="eta must be > 0"):
        make_config(setup, tmp_path, eta=0)
    with pytest.raises(ValueError, match="no reward model for dimensions P1B, P2A"):
        Trainer(make_config(setup, tmp_path, rewards={"P1A": {"type": "length"}},
                            preferences=["P1A", "P1B,P2A"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(make_config(setup, tmp_path / "empty"), resume=True)


def test_mope_engine_uniform_weights_and_pcm_dir(setup, tmp_path):
    root, experts = setup
    registry = load_registry(root / "preferences.json")
    engine = Engine(experts, registry=registry, num_kv_blocks=64)
    out = engine.generate(engine.format_prompts(["Hi"]), preferences=["P1A,P2A"],
                          sampling=SamplingParams(max_tokens=3, seed=1))[0]
    torch.testing.assert_close(out.weights, torch.tensor([[0.5, 0.5, 0.0]]).expand(len(out.token_ids), 3))
    pcm = PCM.fresh(experts[0], 3, registry=registry, **TINY_PCM)
    pcm.save(tmp_path / "pcm")
    with_pcm = Engine(experts, pcm=str(tmp_path / "pcm"), num_kv_blocks=64)
    out = with_pcm.generate(with_pcm.format_prompts(["Hi"]), preferences=["P1A,P2B,P3A"],
                            sampling=SamplingParams(max_tokens=3, seed=1))[0]
    expected = pcm.forward_weights(out.provider_prompt_ids, out.token_ids, [True, False, True])
    torch.testing.assert_close(out.weights, expected.detach(), atol=1e-5, rtol=1e-5)


# -- property tests of DESIGN.md's invariants over sampling settings, preferences and batches ------------
PROPERTY = settings(max_examples=20, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STOP_IDS = list(range(2, 320, 12))  # 1 token in 12 ends a response: EOS and max_tokens endings
# every preference the registry allows: at most one dimension per axis, at least one
PREFERENCE_CODES = [",".join(f"P{axis + 1}{pick}" for axis, pick in enumerate(picks) if pick)
                    for picks in itertools.product([None, "A", "B"], repeat=3) if any(picks)]
preference_codes = st.sampled_from(PREFERENCE_CODES)
pair_batches = st.lists(st.tuples(st.sampled_from(PROMPTS), preference_codes), min_size=1, max_size=3)
sampling_settings = st.fixed_dictionaries(dict(
    temperature=st.sampled_from([0.0, 0.6, 1.0, 1.7]), top_p=st.sampled_from([1.0, 0.8, 0.2]),
    top_k=st.sampled_from([0, 1, 5]), max_tokens=st.sampled_from([1, 2, 16])))


@pytest.fixture(scope="module")
def stopping_trainers(tmp_path_factory):
    """A prob-mode and a logit-mode trainer over experts that stop on many tokens; each records the engine's
    outputs of its last rollout in ``outs``."""
    root, experts = make_training_dir(tmp_path_factory.mktemp("stopping"))
    (Path(experts[0]) / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS}))
    trainers = {}
    for mode in ("prob", "logit"):
        trainer = Trainer(make_config((root, experts), tmp_path_factory.mktemp(mode), mix_mode=mode,
                                      reference="field:gold"))
        trainer.outs = []
        trainer.engine.generate = recording(trainer.engine.generate, trainer.outs)
        trainers[mode] = trainer
    return trainers


def recording(generate, outs: list):
    """``generate`` that keeps its last outputs in ``outs`` (the per-token log-probs a Rollout sums)."""

    def wrapper(*args, **kwargs):
        outs[:] = generate(*args, **kwargs)
        return outs

    return wrapper


def sampled_rollout(trainer, batch, sampling, step, **config):
    trainer.config = dataclasses.replace(trainer.config, **sampling, **config)
    pairs = [(prompt, trainer.registry.parse(code)) for prompt, code in batch]
    return trainer.rollout(pairs, step)


def hand_token_logprobs(trainer, rollout, log_w):
    """log pi per response token, written out: prob mode from the recorded expert log-probs, logit mode from
    the experts' teacher-forced logits (T = 0 counts as T = 1)."""
    alpha = log_w.exp()
    if trainer.config.mix_mode == "prob":
        return torch.log((alpha * rollout.expert_logprobs.exp()).sum(-1))
    temperature = trainer.config.temperature or 1.0
    logits = trainer._expert_logits(rollout).double()
    mixed = (alpha.double().T[:, :, None] * logits.log_softmax(-1)).sum(0) / temperature
    tokens = torch.tensor([t for r in rollout.response_ids for t in r])
    return mixed.log_softmax(-1).gather(1, tokens[:, None])[:, 0].float()


@PROPERTY
@given(mode=st.sampled_from(["prob", "logit"]), batch=pair_batches, sampling=sampling_settings,
       step=st.integers(1, 1000))
def test_property_rollout_logprobs_equal_the_recomputation_per_token(stopping_trainers, mode, batch, sampling,
                                                                     step):
    trainer = stopping_trainers[mode]
    rollout = sampled_rollout(trainer, batch, sampling, step)
    outs, k = trainer.outs, trainer.pcm.n_experts
    assert len(outs) == 2 * len(batch) == len(rollout.response_ids)
    for out in outs:  # a response ends at a stop token or at max_tokens, and has at least one token
        assert 1 <= len(out.token_ids) <= sampling["max_tokens"]
        stopped = out.token_ids[-1] in STOP_IDS
        assert out.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(out.token_ids) == sampling["max_tokens"]
        assert not any(t in STOP_IDS for t in out.token_ids[:-1])
    active = rollout.active.repeat_interleave(torch.tensor(rollout.lengths), 0)
    with torch.no_grad():
        log_w = trainer.pcm(rollout.pcm_prompt_ids, rollout.response_ids, rollout.active)
        # alpha: a softmax over the active experts, exactly 0 elsewhere, the weights the rollout used
        assert torch.equal(torch.isfinite(log_w), active)
        for alpha in (log_w.exp(), rollout.weights):
            assert (alpha[~active] == 0).all() and (alpha[active] > 0).all()
            torch.testing.assert_close(alpha.sum(-1), torch.ones(len(alpha)), atol=1e-6, rtol=0)
        torch.testing.assert_close(rollout.weights, log_w.exp(), atol=1e-5, rtol=1e-5)
        # the recorded expert log-probs are the teacher-forced experts' tempered ones at the token
        logits = trainer._expert_logits(rollout)
        tokens = torch.tensor([t for r in rollout.response_ids for t in r])
        expert_lp = (logits / (sampling["temperature"] or 1.0)).log_softmax(-1).gather(
            2, tokens.expand(k, -1)[:, :, None])[:, :, 0].T
        torch.testing.assert_close(rollout.expert_logprobs[active], expert_lp[active], atol=1e-4, rtol=0)
        assert (rollout.expert_logprobs[~active] == -math.inf).all()
        # log pi: the rollout's, per token and summed, is the trainer's recomputation
        recorded = torch.cat([out.logprobs for out in outs])
        torch.testing.assert_close(recorded, hand_token_logprobs(trainer, rollout, log_w), atol=1e-4, rtol=0)
        torch.testing.assert_close(trainer.policy_logprobs(rollout), rollout.old_logp, atol=1e-4, rtol=0)


@PROPERTY
@given(mode=st.sampled_from(["prob", "logit"]), batch=pair_batches, sampling=sampling_settings,
       eta=st.sampled_from([0.5, 1.0, 3.0]), minibatch=st.integers(1, 3), epochs=st.integers(1, 2),
       grad_clip=st.sampled_from([1e9, 0.5]), step=st.integers(1, 1000))
def test_property_rewards_loss_gradient_and_minibatch_updates(stopping_trainers, mode, batch, sampling, eta,
                                                              minibatch, epochs, grad_clip, step):
    trainer = stopping_trainers[mode]
    pairs = len(batch)
    rollout = sampled_rollout(trainer, batch, sampling, step, batch_size=pairs, eta=eta, epochs=epochs,
                              minibatch_size=min(minibatch, pairs), schedule="constant", warmup_steps=0,
                              grad_clip=grad_clip)
    with torch.no_grad():  # the PCM of earlier examples' updates is the one that sampled (no stale cache)
        torch.testing.assert_close(trainer.policy_logprobs(rollout), rollout.old_logp, atol=1e-4, rtol=0)
    # rewards: the mean over the preference's dimensions of sigmoid(score - score of the reference)
    rewards, _ = trainer.rewards(rollout)
    references = [p.upper() for p in rollout.prompts]
    for i, (prompt, pref, text) in enumerate(zip(rollout.prompts, rollout.preferences, rollout.texts,
                                                 strict=True)):
        scores = [trainer.scorers[d.code].score([prompt] * 2, [text, references[i]]) for d in pref.dimensions]
        expected = torch.stack([torch.sigmoid(s[0] - s[1]) for s in scores]).mean()
        torch.testing.assert_close(rewards[i], expected)
    # the rebel loss and its gradient w.r.t. the PCM are those of the definition, written out per pair
    params = trainer.params

    def grads_of(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    loss = rebel_loss(trainer.policy_logprobs(rollout), rollout.old_logp, rewards, eta)
    token_logp = hand_token_logprobs(trainer, rollout, trainer.pcm(rollout.pcm_prompt_ids,
                                                                   rollout.response_ids, rollout.active))
    ends = torch.tensor(rollout.lengths).cumsum(0).tolist()
    logp = [token_logp[end - n : end].sum() for end, n in zip(ends, rollout.lengths, strict=True)]
    terms = [((logp[2 * j] - rollout.old_logp[2 * j]) - (logp[2 * j + 1] - rollout.old_logp[2 * j + 1])
              - eta * (rewards[2 * j] - rewards[2 * j + 1])) ** 2 for j in range(pairs)]
    hand = sum(terms) / pairs
    torch.testing.assert_close(loss, hand, atol=1e-5, rtol=1e-4)
    got, want = grads_of(loss), grads_of(hand)
    # fp32: (new - old)(y) cancels sums of up to 16 log-probs; the error scales with their gradient
    scale = max(g.abs().max().item() for g in [*want, *grads_of(sum(logp))])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4 * scale + 1e-6, rtol=0)
    # an update: per epoch, one clipped AdamW step per minibatch of pairs, in order, each on its pairs' loss
    c = trainer.config
    reference = copy.deepcopy(trainer.pcm)
    trainer.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: 1.0)
    reference_params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(reference_params, lr=c.lr, weight_decay=c.weight_decay)
    for _, start in itertools.product(range(epochs), range(0, pairs, c.minibatch_size)):
        part = rollout.pairs(start, min(start + c.minibatch_size, pairs))
        part_loss = rebel_loss(trainer.policy_logprobs(part, reference), part.old_logp,
                               rewards[2 * start : 2 * start + len(part.prompts)], eta)
        optimizer.zero_grad()
        part_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference_params, grad_clip)
        optimizer.step()
    trainer.update(rollout, rewards)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.pcm.state_dict()[name], value, atol=1e-6, rtol=1e-5)
