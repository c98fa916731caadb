"""Bad training inputs are clear errors before any file is written: config values (YAML numbers included), a
PCM of the wrong size, and an output_dir that already holds another run's checkpoints."""

import json
import math

import pytest
import torch
import yaml

from mope.checkpoint import save_checkpoint
from mope.config import TrainConfig
from mope.metrics import MetricsLog, read_metrics
from mope.pcm import PCM
from mope.preferences import load_registry
from mope.trainer import Trainer
from tests.mope_setup import TINY_PCM, make_config, make_training_dir

BASE = dict(experts=["a"], prompts="p.json", rewards={"P1A": {"type": "length"}}, output_dir="out")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("train"))


def load_yaml(tmp_path, text: str) -> TrainConfig:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(BASE) + text)
    return TrainConfig.load(tmp_path / "cfg.yaml")


def test_yaml_numbers_written_as_strings_are_converted(tmp_path):
    config = load_yaml(tmp_path, "lr: 1e-5\ntemperature: 1e-1\nsteps: '10'\neta: 2\n")
    assert (config.lr, config.temperature, config.steps, config.eta) == (1e-5, 0.1, 10, 2.0)
    assert type(config.lr) is float and type(config.temperature) is float and type(config.steps) is int


@pytest.mark.parametrize("text, message", [
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("steps: 2.5\n", "steps must be an integer, got 2.5"),
    ("steps: '2.5'\n", "steps must be an integer, got '2.5'"),
    ("top_k: true\n", "top_k must be an integer, got True"),
    ("temperature: true\n", "temperature must be a number, got True"),
    ("minibatch_size: [1]\n", r"minibatch_size must be an integer, got \[1\]"),
])
def test_non_numbers_name_the_key_and_value(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_yaml(tmp_path, text)


@pytest.mark.parametrize("overrides, message", [
    (dict(temperature=-1), "temperature must be"),
    (dict(top_p=2), "top_p must be in"),
    (dict(top_k=-3), "top_k must be an int >= 0"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    (dict(device="cuda:x"), "device must be"),
    (dict(plot="no"), "plot must be true or false"),
    (dict(preferences="P1A"), "preferences must be a non-empty list of strings"),
    (dict(preferences=[]), "preferences must be a non-empty list of strings"),
])
def test_sampling_and_device_settings_are_checked_in_the_config(overrides, message):
    with pytest.raises(ValueError, match=f"train config: {message}"):
        TrainConfig(**BASE, **overrides)
    assert TrainConfig(**BASE, device="cuda:1", temperature=0, top_k=5).device == "cuda:1"


def test_pcm_of_another_size_is_refused_before_any_file(setup, tmp_path):
    root, experts = setup
    pcm = PCM.fresh(experts[0], 2, registry=load_registry(root / "preferences.json"), **TINY_PCM)
    with pytest.raises(ValueError, match="the PCM has 2 experts, the config lists 3"):
        Trainer(make_config(setup, tmp_path / "run"), pcm=pcm)
    assert not (tmp_path / "run").exists()


def test_fresh_run_refuses_an_output_dir_with_checkpoints(setup, tmp_path):
    first = Trainer(make_config(setup, tmp_path, seed=0))
    saved = save_checkpoint(tmp_path, 3, first.pcm, first.state_dict())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True.*another output_dir"):
        Trainer(make_config(setup, tmp_path, steps=2, seed=123))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # resuming with other settings that matter names them; steps, checkpoint_every, plot may change
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in: lr, seed \(or choose"):
        Trainer(make_config(setup, tmp_path, seed=123, lr=0.5), resume=True)
    resumed = Trainer(make_config(setup, tmp_path, steps=5, checkpoint_every=2, plot=True), resume=True)
    assert resumed.step == 3 and resumed.checkpoint == saved


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": math.nan, "reward": 0.5})
    log.write({"step": 2, "loss": 0.25, "reward": math.inf})
    strict = [json.loads(line, parse_constant=pytest.fail) for line in (tmp_path / "m.jsonl").open()]
    assert strict == [{"step": 1, "loss": None, "reward": 0.5}, {"step": 2, "loss": 0.25, "reward": None}]
    with (tmp_path / "m.jsonl").open("a") as f:
        f.write('{"step": 3, "rew')
    with pytest.warns(UserWarning, match="dropping its incomplete last line"):
        assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2 is not valid JSON"):
        read_metrics(tmp_path / "m.jsonl")


class FirstRowNaN:
    """Scores 1.0 for every response, NaN for the first of each call: those rows' rewards are NaN."""

    def score(self, prompts, responses):
        return torch.tensor([math.nan] + [1.0] * (len(responses) - 1))


def test_training_twice_keeps_the_log_and_nan_rows_count_in_no_mean(setup, tmp_path):
    config = make_config(setup, tmp_path / "run", steps=2, plot=False)
    trainer = Trainer(config, scorers={code: FirstRowNaN() for code in config.rewards})
    with pytest.warns(UserWarning, match="update skipped"):
        (first,) = trainer.train(until=1)
        trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    # every finite reward is sigmoid(1 - 1) = 0.5 (the old mean divided NaN rows' zeros in too)
    assert first["reward"] == 0.5 and first["skipped"]
