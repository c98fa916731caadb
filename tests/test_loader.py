"""Loading checkpoints: configs of every supported architecture, sharded files, and clear errors."""

import json

import pytest
import torch
from helpers import make_tiny_checkpoint
from mope.engine.config import ModelConfig
from mope.engine.context import AttentionContext
from mope.engine.loader import load_model, load_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=3)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor([0, len(ids)], dtype=torch.int32))
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), ctx, None))


def copy_checkpoint(src, dst, skip=()):
    dst.mkdir()
    for file in src.iterdir():
        if file.name not in skip:
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_reads_each_architecture(tmp_path, arch):
    path = make_tiny_checkpoint(
        tmp_path, arch, num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    config = ModelConfig.from_pretrained(path)
    hf = AutoConfig.from_pretrained(path)
    assert config.architecture == hf.architectures[0]
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 1, 2)
    assert config.head_dim == (16 if arch != "qwen3" else hf.head_dim)
    assert config.rope_theta == 5e5 and config.rope_scaling is None
    assert config.qkv_bias == (arch == "qwen2") and config.qk_norm == (arch == "qwen3")


def test_llama3_rope_frequencies_match_transformers(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    path = make_tiny_checkpoint(tmp_path, "llama", rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(path))
    ours = ModelConfig.from_pretrained(path).rope_inv_freq()
    torch.testing.assert_close(ours, expected)
    plain = 1.0 / 50000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert not torch.allclose(ours, plain)  # the scaling does bend some frequencies


def test_transformers_4_style_rope_keys_are_read(tmp_path, checkpoint):
    path = copy_checkpoint(checkpoint, tmp_path / "old")
    raw = json.loads((path / "config.json").read_text())
    del raw["rope_parameters"]
    raw.update(rope_theta=123456.0, rope_scaling={"type": "linear", "factor": 2.0})
    (path / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.from_pretrained(path)
    assert config.rope_theta == 123456.0
    plain = 1.0 / 123456.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(config.rope_inv_freq(), plain / 2)


def test_unknown_architecture_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_without_architectures_goes_by_model_type(tmp_path, arch):
    """transformers' Auto classes load a config.json without "architectures" by its model_type; so do we."""
    path = make_tiny_checkpoint(tmp_path, arch, seed=5)
    raw = json.loads((path / "config.json").read_text())
    del raw["architectures"]
    (path / "config.json").write_text(json.dumps(raw))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([5, 17, 42, 99, 7])
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    torch.testing.assert_close(logits_of(load_model(path), ids), expected, atol=2e-5, rtol=1e-5)


def test_config_without_architectures_of_another_model_type_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert "architectures" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(tmp_path)


def test_unsupported_rope_type_is_refused(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64}
    path = make_tiny_checkpoint(tmp_path, "llama", rope_parameters=rope)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_pretrained(path)


def test_missing_files(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    no_weights = copy_checkpoint(checkpoint, tmp_path / "no_weights", skip={"model.safetensors"})
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.safetensors.index.json"):
        load_model(no_weights)
    no_tokenizer = copy_checkpoint(
        checkpoint, tmp_path / "no_tokenizer", skip={"tokenizer.json", "tokenizer_config.json"}
    )
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(no_tokenizer)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, checkpoint, monkeypatch):
    path = copy_checkpoint(checkpoint, tmp_path / "pickled", skip={"model.safetensors"})
    torch.save(load_file(checkpoint / "model.safetensors"), path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("the loader must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_model(path)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, checkpoint):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    ids = torch.tensor([5, 17, 42, 99, 7])
    torch.testing.assert_close(
        logits_of(load_model(sharded), ids), logits_of(load_model(checkpoint), ids), atol=0, rtol=0
    )
    (sharded / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_model(sharded)


@pytest.mark.parametrize("index, message", [
    ("{", "not valid JSON"),
    ('{"metadata": {}}', 'expected a "weight_map"'),
    ("[]", 'expected a "weight_map"'),
    ('{"weight_map": {"model.norm.weight": 3}}', 'expected a "weight_map"'),
])
def test_bad_index_is_refused(tmp_path, checkpoint, index, message):
    path = copy_checkpoint(checkpoint, tmp_path / "indexed")
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: {message}"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_weights_file_is_refused(tmp_path, checkpoint, damage):
    path = copy_checkpoint(checkpoint, tmp_path / damage)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage")
    with pytest.raises(ValueError, match=f"{damage}/model.safetensors: not a readable safetensors file"):
        load_model(path)


def test_missing_unexpected_and_misshapen_weights_are_refused(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    cases = {
        "missing weights model.layers.1.self_attn.v_proj.weight": {
            k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.v_proj.weight"
        },
        "unexpected weights model.layers.0.extra.weight": {
            **tensors,
            "model.layers.0.extra.weight": torch.ones(2),
        },
        r"model.norm.weight has shape \(63,\)": {**tensors, "model.norm.weight": torch.ones(63)},
    }
    for i, (message, case) in enumerate(cases.items()):
        path = copy_checkpoint(checkpoint, tmp_path / str(i), skip={"model.safetensors"})
        save_file(case, path / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            load_model(path)


def test_tied_checkpoint_with_its_own_lm_head_is_refused(tmp_path):
    """tie_word_embeddings with an lm_head.weight stored too: a copy of the embedding loads (tied); another
    matrix is refused (transformers 5 leaves the two untied, transformers 4 ties them: ambiguous)."""
    path = make_tiny_checkpoint(tmp_path / "tied", "llama", seed=4, tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    embedding = tensors["model.embed_tokens.weight"]
    copy = copy_checkpoint(path, tmp_path / "copy", skip={"model.safetensors"})
    save_file({**tensors, "lm_head.weight": embedding.clone()}, copy / "model.safetensors")
    ids = torch.tensor([5, 17, 42, 99, 7])
    torch.testing.assert_close(logits_of(load_model(copy), ids), logits_of(load_model(path), ids))
    other = copy_checkpoint(path, tmp_path / "other", skip={"model.safetensors"})
    save_file({**tensors, "lm_head.weight": embedding.flip(0)}, other / "model.safetensors")
    with pytest.raises(ValueError, match="tie_word_embeddings is true but lm_head.weight differs"):
        load_model(other)


def test_dtype_and_tokenizer(checkpoint):
    model = load_model(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    ids = torch.tensor([5, 17, 42, 99, 7])
    torch.testing.assert_close(
        logits_of(model, ids), logits_of(load_model(checkpoint), ids), atol=0.1, rtol=0.05
    )
    tokenizer = load_tokenizer(checkpoint)
    text = "The quick brown fox."
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tiny_checkpoints_of_every_architecture_share_one_vocabulary(tmp_path):
    """tests/helpers.py promise: experts of different architectures can be mixed in one engine."""
    vocabularies = [
        load_tokenizer(make_tiny_checkpoint(tmp_path / arch, arch)).get_vocab()
        for arch in ("llama", "mistral", "qwen2", "qwen3")
    ]
    assert len(vocabularies[0]) == 301 and all(v == vocabularies[0] for v in vocabularies)


def test_a_model_loaded_in_inference_mode_keeps_the_prepacked_cpu_path(tmp_path):
    from mope.engine import linear

    path = make_tiny_checkpoint(tmp_path / "model", "llama")
    with torch.inference_mode():
        model = load_model(path)
        projections = [m for m in model.modules() if isinstance(m, linear.Linear)]
        assert projections and not any(p.weight.is_inference() for p in projections)
        weight = projections[0].weight
        linear.fast_linear(torch.randn(2, weight.shape[1]), weight)
        assert (id(weight) in linear._packed) == linear._HAS_MKL
