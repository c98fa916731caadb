"""The HF-loop baseline against transformers, and a smoke run of bench/rollout.py (tiny shape)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines.hf_loop import LoopPCM, hf_rollout, top_p_filter  # noqa: E402
from bench.shapes import SHAPES, make_random_checkpoint  # noqa: E402
from tests.helpers import run_bench_smoke  # noqa: E402

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 3]]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    paths = [make_random_checkpoint(root / f"e{i}", "tiny", seed=i) for i in range(2)]
    return [AutoModelForCausalLM.from_pretrained(path).eval() for path in paths]


def test_random_checkpoint_has_the_shape_and_a_full_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    path = make_random_checkpoint(tmp_path, "tiny", arch="qwen3", seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM" and len(tokenizer) == SHAPES["tiny"].vocab_size
    assert tokenizer.decode(tokenizer.encode("Hi there!"), skip_special_tokens=True) == "Hi there!"
    with pytest.raises(ValueError, match="shape"):
        make_random_checkpoint(tmp_path, "huge")
    with pytest.raises(ValueError, match="arch"):
        make_random_checkpoint(tmp_path, "tiny", arch="gpt2")


def test_top_p_filter_keeps_the_smallest_nucleus():
    """A token is kept iff the mass of the tokens more probable than it is < top_p (HF's TopPLogitsWarper)."""
    probs = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    above = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)
    for top_p in (0.05, 0.5, 0.9):
        kept = top_p_filter(probs, top_p) > 0
        assert torch.equal(kept, above < top_p)
        assert torch.allclose(top_p_filter(probs, top_p), probs * kept)
    assert torch.equal(top_p_filter(probs, 1.0), probs)


@torch.no_grad()
def test_greedy_single_expert_matches_generate(experts):
    out = hf_rollout(experts[:1], None, PROMPTS, torch.ones(3, 1), 10, temperature=0, ignore_eos=True)
    for prompt, tokens in zip(PROMPTS, out, strict=True):
        expected = experts[0].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


@torch.no_grad()
def test_greedy_mixture_with_pcm_is_the_argmax_of_the_weighted_mixture(experts):
    """Left-padded batched steps give, for each prompt alone, the argmax of Σ_k α_k softmax(z_k) with α
    from the PCM's last hidden state through its head."""
    torch.manual_seed(0)
    pcm = LoopPCM(experts[1], torch.nn.Linear(SHAPES["tiny"].hidden_size, 2))
    out = hf_rollout(experts, pcm, PROMPTS, None, 4, temperature=0, ignore_eos=True)
    for prompt, tokens in zip(PROMPTS, out, strict=True):
        ids = torch.tensor([prompt])
        for token in tokens:
            hidden = experts[1](ids, output_hidden_states=True).hidden_states[-1][0, -1]
            alpha = torch.softmax(pcm.head(hidden), -1)
            probs = [torch.softmax(m(ids).logits[0, -1], -1) for m in experts]
            mixture = alpha[0] * probs[0] + alpha[1] * probs[1]
            assert token == int(mixture.argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_eos_stops_a_row_and_bad_inputs_are_refused(experts):
    greedy = hf_rollout(experts[:1], None, PROMPTS[:1], torch.ones(1, 1), 3, temperature=0, ignore_eos=True)
    eos = greedy[0][1]
    out = hf_rollout(experts[:1], None, PROMPTS[:1], torch.ones(1, 1), 3, temperature=0, eos_token_id=eos)
    assert out == [greedy[0][:2]]
    out = hf_rollout(experts[:1], None, PROMPTS[:1], torch.ones(1, 1), 3, temperature=0,
                     eos_token_id=[greedy[0][2], eos])  # a list of EOS ids, as Llama 3 configs have
    assert out == [greedy[0][:2]]
    for kwargs, message in ((dict(weights=torch.ones(3, 2)), "weights"), (dict(top_p=0.0), "top_p"),
                            (dict(temperature=-1.0), "temperature"),
                            (dict(max_new_tokens=0), "max_new_tokens")):
        args = {"weights": torch.ones(3, 1), "max_new_tokens": 2, **kwargs}
        with pytest.raises(ValueError, match=message):
            hf_rollout(experts[:1], None, PROMPTS, **args)
    with pytest.raises(ValueError, match="prompts_ids"):
        hf_rollout(experts[:1], None, [[]], torch.ones(1, 1), 2)


def test_rollout_benchmark_smoke(tmp_path):
    """bench/rollout.py --smoke runs both tables end to end (tiny shape) and prints a row for each."""
    lines = run_bench_smoke("rollout.py", "--cache-dir", str(tmp_path))
    rows = [line for line in lines if line.startswith("| 2 |")]
    assert len(rows) == 2, lines
    assert all("nan" not in row and "inf" not in row for row in rows)
