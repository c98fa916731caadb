"""bench/linear.py --smoke runs end to end, and its providers compute x @ wᵀ (and leave the packed kernel's
instruction set as they found it)."""

import sys
from pathlib import Path

import torch
from mope.kernels import packed_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.linear import providers  # noqa: E402
from tests.helpers import run_bench_smoke  # noqa: E402


def test_providers_agree_with_a_plain_matmul():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=g) / inp**0.5 for out, inp in ((70, 24), (33, 40))]
    xs = {24: torch.randn(3, 24, generator=g), 40: torch.randn(3, 40, generator=g)}
    form = packed_linear.instruction_set() if packed_linear.available() else None
    with torch.inference_mode():
        for name, fn in providers(weights).items():
            for got, w in zip(fn(xs), weights, strict=True):
                torch.testing.assert_close(got, xs[w.shape[1]] @ w.t(), msg=name)
    if form is not None:  # a provider of another form left it set: later tests ran in that form
        assert packed_linear.instruction_set() == form


def test_smoke_run_prints_every_provider():
    lines = run_bench_smoke("linear.py")
    assert "read bandwidth" in lines[0] and "sgemm" in lines[1] and "floor" in lines[1]
    assert lines[2].split()[0] == "2" and lines[2].endswith("x")
