"""evaluate(): every method's reward is the reward of what that method generates, by its definition."""

import pytest
import torch
from mope.engine.sampling_params import SamplingParams

from mope.api import Engine
from mope.evaluate import PCM_METHOD, UNIFORM_METHOD, evaluate
from mope.pcm import PCM
from mope.preferences import load_registry
from mope.rewards import build_reward_model, preference_rewards
from tests.mope_setup import EXPERT_OF, TINY_PCM, make_training_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("evaluate"))


def test_each_method_scores_the_responses_its_definition_generates(setup):
    root, experts = setup
    registry = load_registry(root / "preferences.json")
    pcm = PCM.fresh(experts[0], 3, registry=registry, expert_names=experts, seed=1, **TINY_PCM)
    engine = Engine(experts, pcm=pcm)
    scorers = {code: build_reward_model({"type": "keywords", "words": [word]})
               for code, word in zip(EXPERT_OF, ["e", "t", "a", "o", "s", "n"], strict=True)}
    prompts, preferences = ["Explain the sun.", "Name a colour."], [registry.parse("P1A,P2B")]
    report = evaluate(engine, scorers, prompts, preferences, max_tokens=5, prompting_expert=1)

    greedy = SamplingParams(temperature=0.0, max_tokens=5)
    plain = [registry.format_prompt(p) for p in prompts]
    one_hot = lambda j: [[float(i == j) for i in range(3)]] * len(prompts)
    run = lambda texts, **mix: [o.text for o in engine.generate(texts, sampling=greedy, **mix)]
    responses = {
        UNIFORM_METHOD: run(plain, weights=[[0.5, 0.0, 0.5]] * len(prompts)),  # P1A, P2B: experts 0 and 2
        PCM_METHOD: run(plain, preferences=["P1A,P2B"] * len(prompts)),
        **{f"expert {j}": run(plain, weights=one_hot(j)) for j in range(3)},
        "prompting (expert 1)": run([registry.format_prompt(p, preferences[0]) for p in prompts],
                                    weights=one_hot(1)),
    }
    assert report["methods"] == list(responses)
    prefs = preferences * len(prompts)
    for method, texts in responses.items():
        rewards, _ = preference_rewards(scorers, prompts, prefs, texts, responses[UNIFORM_METHOD])
        assert report["results"]["P1A,P2B"][method] == pytest.approx(float(rewards.mean()), abs=1e-6), method
    assert report["results"]["P1A,P2B"][UNIFORM_METHOD] == 0.5
    assert len({tuple(texts) for texts in responses.values()}) > 2  # the methods really differ
    assert torch.isfinite(torch.tensor(list(report["mean"].values()))).all()
