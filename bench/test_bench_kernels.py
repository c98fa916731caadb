"""pytest-benchmark suite of the mix_sample providers of bench/kernels.py (K = 3, top_p = 0.9, fp32, CPU).

    .venv/bin/python -m pytest bench/test_bench_kernels.py --benchmark-enable
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import NUM_EXPERTS, providers  # noqa: E402

PROVIDERS = providers("cpu", with_compile=True)


@pytest.mark.parametrize("vocab", [32000])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_mix_sample_provider(benchmark, provider, batch, vocab):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(NUM_EXPERTS, batch, vocab, generator=generator) * 2
    weights = torch.softmax(torch.randn(batch, NUM_EXPERTS, generator=generator), dim=-1)
    benchmark.group = f"mix_sample B={batch} V={vocab}"
    tokens = benchmark(PROVIDERS[provider], logits, weights)
    assert tokens.shape == (batch,)
