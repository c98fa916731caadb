"""bench/decoder_ops.py --smoke runs end to end, and its two providers compute the same forward."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decoder_ops import with_backend  # noqa: E402
from bench.rollout import DecodeStep  # noqa: E402
from bench.shapes import SHAPES, make_random_checkpoint  # noqa: E402
from tests.helpers import run_bench_smoke  # noqa: E402


def test_providers_compute_the_same_forward(tmp_path):
    from mope.engine.loader import load_model

    model = load_model(make_random_checkpoint(tmp_path / "m", "tiny", seed=0), "cpu", torch.float32)
    step = DecodeStep(SHAPES["tiny"], 3, 20, torch.float32, "cpu")
    with torch.inference_mode():
        caches = [tuple(t.clone() for t in pair) for pair in step.kv_cache]
        fused = with_backend("cpu")(lambda: step.run(model))()
        fused_caches, step.kv_cache = step.kv_cache, caches
        reference = with_backend("torch")(lambda: step.run(model))()
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    for got, expected in zip(fused_caches, step.kv_cache, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_smoke_run_prints_both_providers(tmp_path):
    lines = run_bench_smoke("decoder_ops.py", "--cache-dir", str(tmp_path))
    assert "torch ms" in lines[1] and "cpu ms" in lines[1]
    assert lines[3].startswith("| 2 |") and "x |" in lines[3]
