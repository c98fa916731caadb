import json

import pytest
import yaml
from mope.engine.sampling_params import SamplingParams

from mope.api import Engine
from mope.cli import build_parser, main
from mope.evaluate import UNIFORM_METHOD, koala_prompts
from mope.metrics import read_metrics
from mope.pcm import PCM
from mope.preferences import load_registry
from tests.helpers import run_bench_smoke
from tests.mope_setup import TINY_PCM, make_config, make_training_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("cli"))


def test_every_subcommand_has_help(capsys):
    for command in ("generate", "train", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: mope {command}" in capsys.readouterr().out
    assert len(koala_prompts()) == 50


def test_generate_matches_the_engine(setup, capsys):
    root, experts = setup
    assert main(["generate", "--experts", *experts, "--weights", "0.25,0.25,0.5", "--max-tokens", "5",
                 "--seed", "3", "--json", "Hi there", "Name a colour."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    engine = Engine(experts)
    prompts = engine.format_prompts(["Hi there", "Name a colour."])
    outs = engine.generate(prompts, weights=[[0.25, 0.25, 0.5]] * 2,
                           sampling=SamplingParams(max_tokens=5, seed=3))
    assert [r["response"] for r in rows] == [o.text for o in outs]
    assert rows[0]["mean_weights"] == pytest.approx([0.25, 0.25, 0.5])


def test_generate_with_a_pcm_and_sampling_options_matches_the_engine(setup, tmp_path, capsys):
    root, experts = setup
    registry = load_registry(root / "preferences.json")
    PCM.fresh(experts[0], 3, registry=registry, expert_names=experts, **TINY_PCM).save(tmp_path / "pcm")
    options = ["--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3", "--max-tokens", "6"]
    for raw in (False, True):
        assert main(["generate", "--experts", *experts, "--pcm", str(tmp_path / "pcm"), "--preference",
                     "P1A,P2B", *options, "--json", *(["--raw"] if raw else []), "Hi there"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        engine = Engine(experts, pcm=tmp_path / "pcm")
        prompt = "Hi there" if raw else engine.format_prompts(["Hi there"])[0]
        (out,) = engine.generate([prompt], preferences=["P1A,P2B"], sampling=SamplingParams(
            temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=6))
        assert row["response"] == out.text and row["logprob"] == pytest.approx(float(out.logprobs.sum()))
        assert row["mean_weights"] == pytest.approx(out.weights.mean(0).tolist())
        assert 0 < row["mean_weights"][0] < 1 and row["mean_weights"][1] == 0  # P1A, P2B: experts 0 and 2


@pytest.mark.parametrize("argv, message", [
    (["generate", "--experts", "/nonexistent", "--preference", "P1A", "hi"], "expert directory not found"),
    (["generate", "--experts", "X", "--weights", "a,b", "hi"], "expert directory not found"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    (["eval", "--experts", "/x"], "needs --experts and --rewards"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_bad_weights_and_unknown_config_key(setup, tmp_path, capsys):
    root, experts = setup
    assert main(["generate", "--experts", *experts, "--weights", "a,b", "hi"]) == 2
    assert "--weights must be comma-separated numbers" in capsys.readouterr().err
    config = make_config(setup, tmp_path / "run").to_dict()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "learning_rate": 1}))
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown keys learning_rate" in capsys.readouterr().err


def test_train_then_eval(setup, tmp_path, capsys):
    config = make_config(setup, tmp_path / "run", steps=1, max_tokens=4).to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert "step 1: reward" in capsys.readouterr().out
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--resume"]) == 0
    assert "nothing to do: the run in" in capsys.readouterr().out
    report_path = tmp_path / "eval.json"
    assert main(["eval", "--config", str(tmp_path / "cfg.yaml"), "--prompts-file", config["prompts"],
                 "--limit", "2", "--preferences", "P1A,P2B,P3A", "P1B,P2A", "--max-tokens", "4",
                 "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["pcm"].endswith("step_000001/pcm")
    assert report["methods"][:2] == [UNIFORM_METHOD, "MoPE (PCM)"] and len(report["methods"]) == 6
    for values in report["results"].values():
        assert values[UNIFORM_METHOD] == 0.5  # greedy uniform against itself as the reference
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert UNIFORM_METHOD in capsys.readouterr().out


def test_eval_takes_the_configs_settings_unless_given(setup, tmp_path, monkeypatch):
    import mope.cli

    config = make_config(setup, tmp_path / "run", mix_mode="logit", max_tokens=3, dtype="float16",
                         preferences=["P1A,P2B,P3A"], reference="field:ref").to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    seen = {}

    def stop(args, experts, pcm, registry):
        seen.update(vars(args), registry=registry)
        raise ValueError("stopped before building the engine")

    monkeypatch.setattr(mope.cli, "make_engine", stop)
    given = ["eval", "--config", str(tmp_path / "cfg.yaml"), "--limit", "1"]
    assert main([*given, "--dtype", "float32"]) == 2
    assert (seen["mix_mode"], seen["max_tokens"], seen["dtype"]) == ("logit", 3, "float32")
    assert seen["preferences"] == ["P1A,P2B,P3A"] and seen["reference"] == "field:ref"
    assert seen["registry"].parse("P1A,P2B,P3A").active_mask(config["experts"]) == [True, False, True]
    assert main(["eval", "--experts", *config["experts"], "--rewards", str(tmp_path / "cfg.yaml")]) == 2
    assert (seen["mix_mode"], seen["max_tokens"], seen["registry"]) == ("prob", 128, None)


def test_registry_file_drives_expert_masks(setup):
    root, experts = setup
    registry = load_registry(root / "preferences.json")
    assert registry.parse("P1A,P2B,P3A").active_mask(experts) == [True, False, True]


def test_bench_train_smoke(tmp_path):
    output = "\n".join(run_bench_smoke("train.py", "--cache-dir", str(tmp_path)))
    assert "| ours |" in output and "| naive |" in output
