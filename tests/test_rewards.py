import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from mope.preferences import Preference
from mope.rewards import (
    CachedReferences,
    FieldReferences,
    HFRewardModel,
    RuleScorer,
    bt_normalize,
    build_reward_model,
    keyword_scorer,
    length_scorer,
    preference_rewards,
    register_scorer,
)
from tests.helpers import make_tiny_tokenizer


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=24,
                      num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_hf_reward_model_batched_equals_one_by_one_and_truncates(reward_dir):
    rm = HFRewardModel(reward_dir, batch_size=2)
    ref = LlamaForSequenceClassification.from_pretrained(reward_dir).eval()
    tok = make_tiny_tokenizer()
    prompts = ["Explain the answer", "What is", "def add", "Be concise " * 20]
    responses = [" simply.", " the capital of France?", "(a, b):", " and friendly " * 20]
    got = rm.score(prompts, responses)
    assert rm.max_length == 24
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = tok(p + r, return_tensors="pt").input_ids[:, :24]
        with torch.no_grad():
            expected = ref(input_ids=ids).logits[0, 0]
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def test_hf_reward_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFRewardModel(tmp_path / "nope")


def test_rule_scorers_and_registry():
    assert length_scorer(-1.0).score(["q", "q"], ["a b c", ""]).tolist() == [-3.0, 0.0]
    assert keyword_scorer(["ha", "joke"]).score(["q"], ["Haha, a JOKE."]).tolist() == [3.0]
    register_scorer("exclaim", lambda bonus=1.0: RuleScorer(lambda p, r: bonus * r.count("!")))
    assert build_reward_model({"type": "exclaim", "bonus": 2.0}).score(["q"], ["!!"]).tolist() == [4.0]
    with pytest.raises(ValueError, match="unknown reward type 'nope'.*exclaim"):
        build_reward_model({"type": "nope"})
    with pytest.raises(ValueError, match="bad arguments for reward type 'length'"):
        build_reward_model({"type": "length", "colour": 1})
    with pytest.raises(ValueError, match="one length"):
        length_scorer().score(["a"], [])


def test_preference_reward_is_mean_of_bt_normalised_dimension_scores():
    scorers = {"P2A": length_scorer(-1.0), "P3A": keyword_scorer(["ha"]), "P1A": length_scorer(0.5)}
    prefs = [Preference.parse("P2A,P3A"), Preference.parse("P1A")]
    responses = ["ha ha", "one two three"]
    references = ["x", "a b"]
    rewards, per_dim = preference_rewards(scorers, ["p0", "p1"], prefs, responses, references)
    sig = lambda x: 1 / (1 + torch.exp(-torch.tensor(x)))
    expected0 = (sig(-2.0 + 1.0) + sig(2.0 - 0.0)) / 2
    expected1 = sig(0.5 * 3 - 0.5 * 2)
    torch.testing.assert_close(rewards, torch.stack([expected0, expected1]))
    torch.testing.assert_close(per_dim["P1A"], expected1.view(1))
    assert bt_normalize(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.5
    with pytest.raises(ValueError, match="no reward model for dimension P2B"):
        preference_rewards(scorers, ["p"], [Preference.parse("P2B")], ["r"], ["r"])


def test_reference_sources():
    calls = []

    def generate(prompts, prefs):
        calls.append(list(prompts))
        return [f"{p}|{q.code}" for p, q in zip(prompts, prefs, strict=True)]

    refs = CachedReferences(generate)
    a, b = Preference.parse("P1A"), Preference.parse("P1B")
    assert refs.get(["x", "y", "x"], [a, a, b]) == ["x|P1A", "y|P1A", "x|P1B"]
    assert refs.get(["y", "x"], [a, b]) == ["y|P1A", "x|P1B"]
    assert calls == [["x", "y", "x"]]  # generated once
    field = FieldReferences([{"prompt": "x", "ref": "R"}], "ref")
    assert field.get(["x"], [a]) == ["R"]
    with pytest.raises(ValueError, match="reference field 'gold' missing"):
        FieldReferences([{"prompt": "x"}], "gold")
    with pytest.raises(ValueError, match=r"'gold' is not a string in prompt records \[1\]"):
        FieldReferences([{"prompt": "x", "gold": "R"}, {"prompt": "y", "gold": 3}], "gold")
    with pytest.raises(ValueError, match="prompt record 1 repeats an earlier prompt with another 'ref'"):
        FieldReferences([{"prompt": "x", "ref": "R"}, {"prompt": "x", "ref": "S"}], "ref")
    assert FieldReferences([{"prompt": "x", "ref": "R"}] * 2, "ref").get(["x"], [a]) == ["R"]


class Scorer:
    def __init__(self, score):
        self.score = score


@pytest.mark.parametrize("score, error, message", [
    (lambda p, r: [1.0] * len(r), ValueError, r"the reward model of P1A \(Scorer\) must return a \(4,\)"),
    (lambda p, r: torch.zeros(len(r) - 1), ValueError, r"one score per response, got \(3,\)"),
    (lambda p, r: torch.zeros(len(r), 1), ValueError, r"got \(4, 1\) torch.float32"),
    (lambda p, r: 1 / 0, ZeroDivisionError, "division by zero"),
])
def test_a_reward_models_bad_output_or_error_names_its_dimension(score, error, message):
    prefs = [Preference.parse("P1A")] * 2
    with pytest.raises(error, match=message) as info:
        preference_rewards({"P1A": Scorer(score)}, ["p", "q"], prefs, ["r", "s"], ["t", "u"])
    if error is ZeroDivisionError:  # raised as it is, with a note naming the reward model
        assert info.value.__notes__ == ["raised by the reward model of P1A (Scorer)"]
