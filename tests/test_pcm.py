import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine.context import AttentionContext
from transformers import AutoModelForCausalLM

from mope.pcm import PCM
from mope.preferences import Preference, default_registry
from tests.helpers import make_tiny_checkpoint, save_adapter

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("expert"))


@pytest.fixture(scope="module")
def pcm(ckpt):
    return PCM.fresh(ckpt, n_experts=6, seed=0, **TINY)


def last_hidden(pcm, ids):
    t = torch.tensor(ids)
    n = len(ids)
    ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                           context_lens=torch.tensor([n], dtype=torch.int32))
    return pcm.model(t, torch.arange(n), ctx, None)[-1:]


def test_weights_softmax_over_active_only(pcm):
    hidden = torch.randn(3, 32)
    active = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    w = pcm.weights(hidden, active)
    assert (w[~active] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    logits = pcm.head(hidden)
    torch.testing.assert_close(w[0, [0, 3, 4]], logits[0, [0, 3, 4]].softmax(-1))
    assert w[1, 1] == 1.0
    with pytest.raises(ValueError, match="at least one active expert"):
        pcm.weights(hidden[:1], torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="active"):
        pcm.weights(hidden, active[:, :3])


def test_prepare_reads_instruction_with_preference_prompts(pcm):
    reg = default_registry()
    pref = Preference.parse("P1B,P2A,P3B")
    ids, mask = pcm.prepare(reg.format_prompt("Name a colour."), "P1B,P2A,P3B")
    assert ids == pcm.tokenizer(reg.format_prompt("Name a colour.", pref)).input_ids
    assert mask == [False, True, True, False, False, True]
    assert pcm.prepare("Name a colour.", pref)[0] == ids  # a plain instruction works the same
    with pytest.raises(ValueError, match="unknown preference dimension"):
        pcm.prepare("x", "P7A")


def test_teacher_forced_batch_equals_step_by_step(pcm):
    prompts = [pcm.prepare("Hi", "P1A,P2B")[0], pcm.prepare("What is the capital?", "P3A")[0]]
    responses = [[5, 17, 40], [], [99, 3]]
    prompts.append(prompts[0][:4])
    active = torch.tensor([pcm.prepare("x", p)[1] for p in ("P1A,P2B", "P3A", "P1B")])
    log_w = pcm(prompts, responses, active)
    assert log_w.shape == (5, 6)
    expected = []
    for p, r, a in zip(prompts, responses, active, strict=True):
        for t in range(len(r)):
            expected.append(pcm.log_weights(last_hidden(pcm, p + r[:t]), a[None]))
    torch.testing.assert_close(log_w, torch.cat(expected), atol=1e-5, rtol=1e-5)
    single = pcm.forward_weights(prompts[0], responses[0], active[0])
    torch.testing.assert_close(single, log_w[:3].exp())


def test_gradients_reach_backbone_and_head(ckpt):
    pcm = PCM.fresh(ckpt, n_experts=3, seed=1, **TINY)
    ids, _ = pcm.prepare("Hi", "P1A")
    log_w = pcm([ids], [[4, 5, 6]], torch.tensor([[True, True, False]]))
    (log_w[:, 0] * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert pcm.head.weight.grad.abs().sum() > 0
    assert pcm.model.model.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in pcm.parameters() if p.grad is not None)


def test_save_load_roundtrip_and_transformers_reads_the_backbone(pcm, tmp_path):
    out = pcm.save(tmp_path / "pcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pcm"]  # no temp dir left behind
    settings = json.loads((out / "pcm.json").read_text())
    assert settings["n_experts"] == 6 and len(settings["dimensions"]) == 6
    loaded = PCM.load(out)
    for (name, a), (_, b) in zip(pcm.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    ids, mask = loaded.prepare("Hi", "P2A")
    assert (ids, mask) == pcm.prepare("Hi", "P2A")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1:]
    torch.testing.assert_close(last_hidden(loaded, ids), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a saved PCM"):
        PCM.load(tmp_path)


def test_from_backbone_adapter_is_the_merged_model(ckpt, tmp_path):
    from peft import PeftModel

    adapter = save_adapter(ckpt, tmp_path / "adapter", seed=0, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    pcm = PCM.from_backbone(adapter, n_experts=2)
    ids = pcm.tokenizer("Hello there, adapter").input_ids
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), adapter).merge_and_unload()
    with torch.no_grad():
        ref = merged(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1:]
        base = AutoModelForCausalLM.from_pretrained(ckpt)(torch.tensor([ids]), output_hidden_states=True)
    assert not torch.allclose(base.hidden_states[-1][0, -1:], ref, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(last_hidden(pcm, ids), ref, atol=1e-5, rtol=1e-5)


def test_from_backbone_checkpoint(ckpt):
    pcm = PCM.from_backbone(ckpt, n_experts=2, expert_names=["a", "b"])
    assert pcm.n_experts == 2 and pcm.model.config.hidden_size == 64
    with pytest.raises(ValueError, match="only 2 experts"):
        pcm.prepare("x", "P3A")


def test_save_never_deletes_other_files_and_overwrites_a_saved_pcm(pcm, ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    not_saved = f"{tmp_path}: a non-empty directory that is not a previous save (no pcm.json)"
    with pytest.raises(ValueError, match=re.escape(not_saved)):
        pcm.save(tmp_path)
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'file'}: it is a file")):
        pcm.save(tmp_path / "file")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "data"
    pcm.save(tmp_path / "pcm")
    other = PCM.fresh(ckpt, n_experts=6, seed=1, **TINY)
    other.save(tmp_path / "pcm")  # a saved PCM is replaced, atomically
    torch.testing.assert_close(PCM.load(tmp_path / "pcm").head.weight, other.head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes.txt", "pcm"]


def test_a_failed_save_keeps_the_previous_pcm_and_leaves_no_temp_dir(pcm, tmp_path, monkeypatch):
    pcm.save(tmp_path / "pcm")
    before = {p.name: p.read_bytes() for p in (tmp_path / "pcm").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mope.pcm.save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        pcm.save(tmp_path / "pcm")
    assert {p.name: p.read_bytes() for p in (tmp_path / "pcm").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pcm"]


@settings(max_examples=15, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.lists(st.integers(0, 300), min_size=1, max_size=20),
                               st.lists(st.integers(0, 300), max_size=4),
                               st.lists(st.booleans(), min_size=6, max_size=6).filter(any)),
                     min_size=1, max_size=3),
       scale=st.sampled_from([1.0, 100.0]))
def test_property_teacher_forced_alpha_is_a_masked_softmax_step_by_step(pcm, rows, scale):
    """Any prompts, responses (1 token, or none: left out) and active subsets: alpha_t is the softmax of the
    head over the row's active experts (exactly 0 elsewhere) at the state after prompt + response[:t]."""
    prompts, responses, masks = zip(*rows, strict=True)
    active = torch.tensor(masks)
    with torch.no_grad():
        log_w = pcm(prompts, responses, active)
        assert log_w.shape == (sum(map(len, responses)), 6)
        expected, hidden, row_active = [], [], []
        for p, r, a in zip(prompts, responses, active, strict=True):
            for t in range(len(r)):
                hidden.append(last_hidden(pcm, [*p, *r[:t]]))
                expected.append(pcm.log_weights(hidden[-1], a[None]))
                row_active.append(a)
        if not expected:
            return
        torch.testing.assert_close(log_w, torch.cat(expected), atol=1e-5, rtol=1e-5)
        row_active = torch.stack(row_active)
        alpha = pcm.weights(scale * torch.cat(hidden), row_active)
    assert (alpha[~row_active] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(len(alpha)), atol=1e-6, rtol=0)
    logits = pcm.head(scale * torch.cat(hidden)).detach()
    for a, w, z in zip(row_active, alpha, logits, strict=True):
        torch.testing.assert_close(w[a], z[a].softmax(-1))
