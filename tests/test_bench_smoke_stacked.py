"""bench/stacked_experts.py --smoke runs end to end, and its providers compute the same projections."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.stacked_experts import providers  # noqa: E402
from tests.helpers import run_bench_smoke  # noqa: E402


def test_providers_agree_with_a_plain_matmul():
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(out, inp, generator=g) for _ in range(3)] for out, inp in ((6, 5), (4, 6))]
    stacked_t = [torch.stack([w.t() for w in ws]).contiguous() for ws in weights]
    xs = [torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 6, generator=g)]
    expected = [[x[k] @ ws[k].t() for k in range(3)] for x, ws in zip(xs, weights, strict=True)]
    with torch.inference_mode():
        for name, fn in providers(weights, stacked_t).items():
            got = fn(xs)
            for p, per_expert in enumerate(expected):
                for k, want in enumerate(per_expert):
                    torch.testing.assert_close(got[p][k], want, msg=f"{name} projection {p} expert {k}")


def test_smoke_run_prints_every_provider():
    lines = run_bench_smoke("stacked_experts.py")
    assert "floor" in lines[0] and "stacked-bmm" in lines[1]
    assert lines[2].split()[0] == "2" and lines[2].endswith("x")
