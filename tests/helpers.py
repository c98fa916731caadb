"""Shared test helpers: random tiny Hugging Face checkpoints with a locally trained tokenizer, and smoke runs
of the benchmark scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ROOT = Path(__file__).resolve().parents[1]
# What this machine offers the C++ kernels, found without them: where both hold, a kernel that does not
# build or run is a failure, not a skip
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None


def _packed_linear_isas() -> list[str]:
    """The packed GEMM's forms this CPU runs, best first (as csrc/packed_linear.cpp finds them)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = {"AVX512": {"avx512f", "avx2", "fma"}, "AVX2": {"avx2", "fma"}}.get(
            torch.backends.cpu.get_cpu_capability(), set())
    if os.environ.get("MOPE_DISABLE_AVX512"):
        flags.discard("avx512f")
    return [isa for isa, needs in (("avx512", {"avx512f"}), ("avx2", {"avx2", "fma"})) if needs <= flags]


PACKED_LINEAR_ISAS = _packed_linear_isas() if HAS_COMPILER else []
PACKED_LINEAR_RUNS = bool(PACKED_LINEAR_ISAS)


def on_threads(threads: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) with torch's thread count set to `threads` (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def assert_within_fp32_rounding(out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor):
    """|out - expected| <= 1e-5 of the sum of the |terms| (fp32 accumulation of up to ~300 products)."""
    assert out.shape == expected.shape and out.dtype == torch.float32
    error = (out.double() - expected).abs()
    bad = error > 1e-5 * magnitude + 1e-6
    assert not bad.any(), f"max error {error.max().item()} at {bad.nonzero()[:4].tolist()}"


CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
QWEN_UNK_TOKEN = "<|endoftext|>"
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain the answer in simple words, like to a child.",
    "Be concise, informative and friendly in every reply.",
    "A mixture of preference experts decodes one token at a time.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
]
TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) trained on a few sentences: `vocab_size` tokens, ids
    0..2 = pad, bos, eos, plus "<|endoftext|>" at id `vocab_size`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    # transformers' Qwen2 tokenizer class adds this token when it is missing; having it everywhere keeps
    # the vocabularies of checkpoints of different architectures identical
    tokenizer.add_special_tokens([QWEN_UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norm weights and biases included) a distinct random value, so that a
    weight loaded into the wrong place changes the logits, and greedy choices have clear margins."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5 * 1.5)


def make_tiny_checkpoint(
    path: str | Path, arch: str = "llama", vocab: int = 320, seed: int = 0, **config_overrides
) -> Path:
    """Save a random tiny `arch` model (safetensors, fp32) and a tokenizer into `path`; return the path.

    `arch` is one of "llama", "mistral", "qwen2", "qwen3"; `vocab` (≥ 301, the tokenizer's size) is the
    model's vocabulary; `config_overrides` go to the transformers config (e.g. tie_word_embeddings=True,
    num_key_value_heads=1, rope_parameters={...}).
    """
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"arch must be one of {sorted(CONFIG_CLASSES)}, got {arch!r}")
    tokenizer = make_tiny_tokenizer()
    if vocab < len(tokenizer):
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    settings = dict(TINY_DEFAULTS, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "qwen3":
        settings["head_dim"] = 16
    settings.update(config_overrides)
    config = CONFIG_CLASSES[arch](**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_adapter(base_dir, out_dir, seed: int, **lora_settings):
    """A peft adapter of `base_dir` whose lora_B is random (peft initialises it to zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora_settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(out_dir)
    return out_dir


def run_python(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> list[str]:
    """Run `python *args` in a fresh process from the repository root, with `env` added to the environment;
    asserts it exits 0; its stdout lines."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def run_bench_smoke(script: str, *args: str, timeout: int = 300) -> list[str]:
    """Run `bench/<script> --smoke *args` from the repository root; asserts it exits 0; its stdout lines."""
    return run_python([str(ROOT / "bench" / script), "--smoke", *args], timeout=timeout)
