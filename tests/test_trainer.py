import copy
import json
import math

import pytest
import torch
from mope.engine.sampling_params import SamplingParams

from mope.api import Engine
from mope.config import TrainConfig
from mope.metrics import read_metrics
from mope.pcm import PCM
from mope.preferences import load_registry
from mope.rebel import rebel_loss
from mope.rewards import RuleScorer
from mope.trainer import Trainer, lr_factor
from tests.mope_setup import EXPERT_OF, TINY_PCM, make_config, make_training_dir, params

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
