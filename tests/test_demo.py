"""The demo kit: corpus, scorers, tokenizer, a tiny cached kit whose experts (PEFT LoRA adapters, trained
without peft) learn their styles and load in peft and in the engine, and the REBEL run whose PCM beats
uniform weights."""

import json
import random
from pathlib import Path

import pytest
import torch
from mope.engine.engine import Engine
from mope.engine.sampling_params import SamplingParams
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mope.demo.check import expert_table
from mope.demo.corpus import (
    COMBINATIONS,
    build_corpus,
    expert_prompt,
    instructions,
    split_instructions,
    write_response,
)
from mope.demo.kit import KitRecipe, build_kit
from mope.demo.run import PCM, UNIFORM, clear_previous_demo, run_demo
from mope.demo.scorers import RULES, SCORERS, demo_scorer
from mope.demo.tokenizer import ASSISTANT, EOS, USER, train_tokenizer
from mope.demo.train_lm import add_lora, load_lm, save_adapter
from mope.rewards import build_reward_model

TINY = KitRecipe.tiny()


def flip(code: str) -> str:
    return code[:2] + ("B" if code[2] == "A" else "A")


def test_each_scorer_prefers_its_side_of_the_axis_on_every_corpus_response():
    # same rng seed: the two responses differ only in the flipped axis' wording
    for i, instruction in enumerate(instructions()[::7]):
        for combination in COMBINATIONS:
            codes = combination.split(",")
            for axis, own in enumerate(codes):
                flipped = ",".join(codes[:axis] + [flip(own)] + codes[axis + 1 :])
                mine = write_response(instruction, combination, random.Random(i))
                other = write_response(instruction, flipped, random.Random(i))
                assert RULES[own](mine) > RULES[own](other), (own, mine, other)


def test_scorers_follow_the_documented_rules():
    assert RULES["P1A"]("a big cat") == 4.0  # every word at most 5 letters
    assert RULES["P1B"]("thermonuclear fusion is") == 0.0  # one long, one short of three words
    assert RULES["P2A"](" ".join(["word"] * 24)) == -1.0  # 8 words beyond the 16-word target
    assert RULES["P2B"]("One. Two, because three.") == 1.5  # (2 sentences + 1 connective) / 2
    assert RULES["P3A"]("Hi friend! Ugh.") == pytest.approx(1 / 3)  # friend, ! minus ugh
    assert RULES["P3B"]("Whatever, stop bothering me.") == 1.0
    scores = build_reward_model({"type": "demo", "dimension": "P3A"}).score(["q", "q"], ["Haha!", "Ugh."])
    assert scores.tolist() == pytest.approx([2 / 3, -1 / 3])
    assert set(SCORERS) == {"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"}


def test_corpus_is_deterministic_and_held_out_instructions_are_unseen():
    train, held_out = split_instructions(12, seed=3)
    assert len(held_out) == 12 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(instructions())
    assert build_corpus(train[:3], 2, seed=1) == build_corpus(train[:3], 2, seed=1)
    corpus = build_corpus(train[:3], 2, seed=1)
    assert len(corpus) == 3 * 8 * 2 and {e.combination for e in corpus} == set(COMBINATIONS)


def test_tokenizer_has_single_special_tokens_and_round_trips(tmp_path):
    texts = [e.response for e in build_corpus(instructions()[:20], 1, seed=0)]
    tok = train_tokenizer(texts, 400, tmp_path)
    for special in (USER, ASSISTANT, EOS):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    text = f"{USER}\nWhat is the sun?\n{ASSISTANT}\nObviously. The sun is hot!"
    ids = tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids(USER)  # nothing is prepended
    assert tok.decode(ids) == text
    assert tok.eos_token == EOS and tok.pad_token_id is not None and tok.bos_token_id is not None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tmp: demo_scorer("P4A"), "dimension"),
        (lambda tmp: split_instructions(10_000, 0), "held_out"),
        (lambda tmp: build_corpus(instructions()[:1], 0, 0), "variants"),
        (lambda tmp: train_tokenizer(["abc"], 100, tmp), "vocab_size"),
        (lambda tmp: SCORERS["P1A"].score(["a"], ["b", "c"]), "length"),
        (lambda tmp: build_kit((tmp / "file").touch() or tmp / "file", TINY), "cache_dir"),
        (lambda tmp: run_demo(steps=0, kit_dir=tmp), "steps"),
        (lambda tmp: run_demo(out_dir=(tmp / "f").touch() or tmp / "f", kit_dir=tmp / "kit"), "out_dir"),
        (lambda tmp: run_demo(out_dir=fake_run(tmp / "run", "hf"), kit_dir=tmp / "kit"), "another training"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)
    assert not (tmp_path / "kit").exists()  # refused before building anything


def fake_run(out: Path, reward_type: str) -> Path:
    """A folder holding a training run's files, its rewards all of `reward_type`, and a file of the user's."""
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"rewards": {"P1A": {"type": reward_type}}}))
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    return out


def test_a_previous_demo_run_is_replaced_and_nothing_else_removed(tmp_path):
    out = fake_run(tmp_path / "demo", "demo")
    clear_previous_demo(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    clear_previous_demo(out)  # nothing to clear
    with pytest.raises(ValueError, match="another training run"):
        clear_previous_demo(fake_run(tmp_path / "other", "hf"))
    assert (tmp_path / "other" / "checkpoints").is_dir()


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory):
    return build_kit(tmp_path_factory.mktemp("kit"), TINY, progress=False)


def test_kit_is_cached_by_recipe(tiny_kit):
    stamp = tiny_kit.recipe.stat().st_mtime_ns
    assert build_kit(tiny_kit.root.parent, TINY, progress=False) == tiny_kit
    assert tiny_kit.recipe.stat().st_mtime_ns == stamp  # not rebuilt
    assert KitRecipe(seed=1).digest() != KitRecipe().digest()
    assert not list(tiny_kit.root.parent.glob(".building-*"))  # the temporary build dir is gone
    assert json.loads(tiny_kit.recipe.read_text())["hidden"] == TINY.hidden
    for path in [tiny_kit.base, tiny_kit.pcm_backbone]:
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file()
    for path in tiny_kit.experts:  # PEFT LoRA adapters naming the kit's base by its final path
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == TINY.lora_rank
        assert config["lora_alpha"] == TINY.lora_alpha and config["base_model_name_or_path"] == str(
            tiny_kit.base.resolve())
        assert (path / "adapter_model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        assert not (path / "model.safetensors").exists()


def test_each_expert_beats_the_others_on_its_own_dimension(tiny_kit):
    torch.manual_seed(0)
    table = expert_table(tiny_kit, samples=1, max_new_tokens=64, limit=8)
    for code in SCORERS:
        others = [row[code] for expert, row in table.items() if expert != code]
        assert table[code][code] > max(others), (code, table)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base, adapter):
    """The adapter over its base, by peft itself (the independent reference)."""
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_saved_adapter_loads_in_peft_with_the_training_time_logits(tiny_kit, tmp_path):
    """add_lora + save_adapter against peft itself: PeftModel.from_pretrained of the saved directory (and
    load_lm of it) computes what the wrapped model computed while training."""
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(tiny_kit.base)
    config = add_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    with torch.no_grad():  # B is 0 after init: make the adapter do something
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)
    tok = AutoTokenizer.from_pretrained(tiny_kit.base)
    save_adapter(model, config, tok, tiny_kit.base.resolve(), tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    expected = logits(model.eval(), ids)
    torch.testing.assert_close(logits(peft_model(tiny_kit.base, tmp_path / "adapter"), ids), expected)
    torch.testing.assert_close(logits(load_lm(tmp_path / "adapter"), ids), expected)
    assert (logits(LlamaForCausalLM.from_pretrained(tiny_kit.base), ids) - expected).abs().max() > 1e-2
    for expert in tiny_kit.experts[:2]:  # the kit's own adapters, as built
        reference = peft_model(tiny_kit.base, expert)
        torch.testing.assert_close(logits(load_lm(expert), ids), logits(reference, ids))


def test_engine_serves_the_kit_adapters_as_their_merged_models(tiny_kit):
    """The engine's greedy output for each adapter expert (all six over one base) is transformers' greedy
    generate on peft's merge_and_unload of that adapter."""
    engine = Engine([str(p) for p in tiny_kit.experts])
    instructions = [r["prompt"] for r in json.loads(tiny_kit.eval_prompts.read_text())][:2]
    prompts = [expert_prompt(x) for x in instructions]
    tok = AutoTokenizer.from_pretrained(tiny_kit.base)
    k = len(tiny_kit.experts)
    for j, expert in enumerate(tiny_kit.experts):
        outs = engine.generate(prompts, weights=[[float(i == j) for i in range(k)]] * len(prompts),
                               sampling=SamplingParams(temperature=0.0, max_tokens=24))
        merged = peft_model(tiny_kit.base, expert).merge_and_unload()
        for prompt, out in zip(prompts, outs, strict=True):
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            with torch.no_grad():
                expected = merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=24, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            assert out.token_ids == expected, (expert.name, prompt)


@pytest.mark.slow
def test_trained_pcm_beats_uniform_weights(tiny_kit, tmp_path):
    summary = run_demo(steps=6, out_dir=tmp_path, kit_dir=tiny_kit.root.parent, recipe=TINY, eval_samples=1,
                       eval_instructions=4, progress=False, batch_size=8, max_tokens=64)
    results = summary["results"]
    mean = {m: sum(r[m] for r in results.values()) / len(results) for m in (UNIFORM, PCM)}
    assert mean[PCM] > mean[UNIFORM], results
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.png").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
