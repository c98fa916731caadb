"""A decode forward with the decoder's small ops as torch ops or as the fused C++ ops, side by side.

    python bench/decoder_ops.py            # llama-160m, one model's decode forward with logits, B 1 4 8 32
    python bench/decoder_ops.py --smoke    # tiny shape, one repeat (tests/test_bench_smoke_decoder_ops.py)

`torch`: RMSNorm (+ residual add), rotary, SiLU-gated product and the K/V store as torch ops (the
"torch" backends of mope.kernels.decoder_ops and paged_attention.store_kv); `cpu`: the same through
csrc/decoder_ops.cpp and csrc/paged_attention.cpp (what the engine runs on CPU). Everything else (the
GEMMs, the paged attention) is the same code. Timed interleaved, medians; "saved per layer" is the
difference over the decoder layers.
"""

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mope.engine.attention as attention_module  # noqa: E402
import mope.engine.model as model_module  # noqa: E402
from mope.kernels import decoder_ops, paged_attention  # noqa: E402

from bench.kernels import int_at_least  # noqa: E402
from bench.rollout import DecodeStep, median_ms  # noqa: E402
from bench.shapes import SHAPES, make_random_checkpoint  # noqa: E402


def with_backend(backend: str) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """fn -> fn run with the model's decoder ops and K/V store set to `backend`."""
    patches = {(model_module, "rms_norm"): decoder_ops.rms_norm, (model_module, "rotary"): decoder_ops.rotary,
               (model_module, "silu_mul"): decoder_ops.silu_mul,
               (attention_module, "store_kv"): paged_attention.store_kv}

    def wrap(fn):
        def run():
            for (module, name), op in patches.items():
                setattr(module, name, partial(op, backend=backend))
            try:
                return fn()
            finally:
                for (module, name), op in patches.items():
                    setattr(module, name, op)
        return run
    return wrap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-160m", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--context", type=int_at_least(1), default=96, help="cached tokens per sequence")
    parser.add_argument("--repeats", type=int_at_least(1), default=21)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mope-bench"), help="random checkpoints")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, B = 2, one repeat (overrides --shape, --batch, --repeats)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.repeats = "tiny", [2], 1
    from mope.engine.loader import load_model

    shape = SHAPES[args.shape]
    model = load_model(make_random_checkpoint(args.cache_dir / args.shape / "expert0", args.shape, seed=0),
                       "cpu", torch.float32)
    layers = shape.num_hidden_layers
    print(f"{args.shape} decode forward with logits, {args.context} cached tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| B | torch ms | cpu ms | torch / cpu | saved per layer µs |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for batch in args.batch:
            step = DecodeStep(shape, batch, args.context, torch.float32, "cpu")
            run = partial(step.run, model)
            ms = median_ms({name: with_backend(name)(run) for name in ("torch", "cpu")}, args.repeats)
            saved_us = 1e3 * (ms["torch"] - ms["cpu"]) / layers
            print(f"| {batch} | {ms['torch']:.2f} | {ms['cpu']:.2f} | {ms['torch'] / ms['cpu']:.2f}x "
                  f"| {saved_us:.1f} |")


if __name__ == "__main__":
    main()
