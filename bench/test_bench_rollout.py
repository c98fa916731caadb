"""pytest-benchmark suite of the rollout providers (the same setups as bench/rollout.py).

    .venv/bin/python -m pytest bench/test_bench_rollout.py --benchmark-enable
    MOPE_BENCH_SHAPE=llama-160m .venv/bin/python -m pytest bench/test_bench_rollout.py --benchmark-enable

Rollout providers `ours` and `hf-loop` time a whole generate of NEW_TOKENS tokens, `bare` the bare model
forwards of one decode step; LoRA providers time one decode step.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rollout import LORA_CONTEXT, LoRAProviders, RolloutProviders  # noqa: E402

SHAPE = os.environ.get("MOPE_BENCH_SHAPE", "tiny")
CACHE = Path(os.environ.get("MOPE_BENCH_CACHE", "/tmp/mope-bench"))
NUM_EXPERTS, RANK, NEW_TOKENS = 3, 16, 32


@pytest.fixture(scope="module")
def rollout():
    return RolloutProviders(SHAPE, NUM_EXPERTS, "cpu", torch.float32, CACHE, 32, NEW_TOKENS)


@pytest.fixture(scope="module")
def lora():
    return LoRAProviders(SHAPE, NUM_EXPERTS, RANK, "cpu", torch.float32, CACHE)


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("provider", ["ours", "hf-loop", "bare"])
def test_rollout(benchmark, rollout, provider, batch):
    benchmark.group = f"rollout {SHAPE} B={batch}"
    with torch.inference_mode():
        benchmark.pedantic(rollout.providers(batch, NEW_TOKENS)[provider], rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("batch", [1, 4, 32])
@pytest.mark.parametrize("provider", ["lora-experts", "full-experts", "merged-single"])
def test_lora_decode_step(benchmark, lora, provider, batch):
    benchmark.group = f"lora {SHAPE} B={batch}"
    with torch.inference_mode():
        benchmark.pedantic(lora.providers(batch, LORA_CONTEXT)[provider], rounds=5, warmup_rounds=1)
