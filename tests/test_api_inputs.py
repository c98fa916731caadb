"""Bad inputs to the user-facing API get a clear error (a ValueError naming the problem) before any work."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from mope.engine.engine import check_device
from mope.engine.sampling_params import SamplingParams

import mope.cli
from mope.api import Engine, check_pcm_experts
from mope.cli import main
from mope.pcm import PCM
from mope.rebel import rebel_loss
from mope.rewards import build_reward_model
from tests.mope_setup import TINY_PCM, make_training_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("api_inputs"))


@pytest.fixture(scope="module")
def engine(setup):
    return Engine(setup[1][:2])


def trained_pcm(experts, names):
    return PCM.fresh(experts[0], len(names), expert_names=names, **TINY_PCM)


def test_a_pcm_refuses_experts_in_another_order_or_number(setup):
    experts = setup[1]
    pcm = trained_pcm(experts, experts)
    with pytest.raises(ValueError, match="trained with the experts in the order"):
        Engine(list(reversed(experts)), pcm=pcm)
    with pytest.raises(ValueError, match="the PCM weighs 3 experts, but the engine has 2"):
        Engine(experts[:2], pcm=pcm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Engine(experts, pcm=pcm).provider is pcm  # the order it was trained with: no warning
    with pytest.warns(UserWarning, match="its weight k goes to the k-th expert"):
        Engine(experts, pcm=trained_pcm(experts, ["x", "y", "z"]))


@pytest.mark.parametrize("trained, given, outcome", [
    (["/r/a/model", "/r/b/model"], ["/r/a/model", "/r/b/model"], None),
    (["/r/a/model", "/r/b/model"], ["/r/b/model", "/r/a/model"], "order"),  # same folder names: by path
    (["/old/e0", "/old/e1"], ["/new/e0", "/new/e1"], None),  # moved: by their distinct folder names
    (["/old/e0", "/old/e1"], ["/new/e1", "/new/e0"], "order"),
    (["/old/e0", "/old/e1"], ["/new/f0", "/new/f1"], "warn"),
])
def test_pcm_experts_are_matched_by_path_then_by_folder_name(trained, given, outcome):
    pcm = SimpleNamespace(n_experts=2, expert_names=trained)
    if outcome == "order":
        with pytest.raises(ValueError, match="in that order"):
            check_pcm_experts(pcm, given)
    elif outcome == "warn":
        with pytest.warns(UserWarning, match="the PCM was trained with experts"):
            check_pcm_experts(pcm, given)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_pcm_experts(pcm, given)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.generate([[1, -1]], weights=[[0.5, 0.5]]), r"prompts\[0\] must hold token ids in \[0, "),
    (lambda e: e.score([[-3]], [[5]]), r"prompts\[0\] must hold token ids"),
    (lambda e: e.score(["Hello"], [None]), r"responses\[0\] must be a string or a list of token ids"),
    (lambda e: e.generate(["Hi"], weights=[["a", "b"]]), r"weights must be a \(B, K\) = \(1, 2\) table"),
    (lambda e: e.generate(["Hi", "Yo"], weights=[[1.0], [0.5, 0.5]]), r"weights must be a \(B, K\)"),
])
def test_bad_prompts_responses_and_weights(engine, call, message):
    with pytest.raises(ValueError, match=message):
        call(engine)


@pytest.mark.parametrize("settings", [dict(temperature=math.inf), dict(temperature=True), dict(top_p=True)])
def test_sampling_params_need_finite_numbers(settings):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**settings)


def test_devices_are_checked_up_front():
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cpu:x", 3.5):
        with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
            check_device(bad)
    if not torch.cuda.is_available():  # this CPU machine: a clear message, not torch's AssertionError
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA GPU"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_keyword_words_must_be_a_list_and_eta_a_positive_number():
    with pytest.raises(ValueError, match="non-empty list of non-empty words"):
        build_reward_model({"type": "keywords", "words": "the"})  # would count letters
    logp = torch.zeros(4)
    with pytest.raises(ValueError, match="eta must be > 0"):
        rebel_loss(logp, logp, logp, float("nan"))


def test_eval_checks_its_output_path_before_evaluating(setup, tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(mope.cli, "make_engine", lambda *args: built.append(args))
    argv = ["eval", "--experts", *setup[1], "--rewards", str(setup[0] / "preferences.json")]
    assert main([*argv, "--output", str(tmp_path / "missing" / "eval.json")]) == 2
    assert "directory" in capsys.readouterr().err and not built
    assert main([*argv, "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err and not built


def test_prompt_files_in_json_lines_and_any_case(tmp_path):
    from argparse import Namespace

    from mope.cli import read_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "Hello"}\n\n"Bye"\n')
    (tmp_path / "p.JSON").write_text('[{"prompt": "Hi"}]')
    (tmp_path / "p.txt").write_text('{"prompt": "as text"}\n')
    read = lambda name: read_prompts(Namespace(prompts=[], prompts_file=str(tmp_path / name)))
    assert read("p.jsonl") == ["Hello", "Bye"] and read("p.JSON") == ["Hi"]
    assert read("p.txt") == ['{"prompt": "as text"}']  # a text file is one prompt a line, as given
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="not valid JSON Lines"):
        read("bad.jsonl")


def test_prefix_cache_resets(engine):
    engine.forget_provider_cache()  # uniform weights: no provider model, nothing to forget
    with pytest.raises(ValueError, match=r"model must be None or an index in \[0, 2\), got True"):
        engine.reset_prefix_cache(True)
