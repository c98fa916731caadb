"""Experts of one architecture: K separate projection calls against one stacked batched matmul.

    python bench/stacked_experts.py            # llama-160m projections, K = 3, B in 1 8 32
    python bench/stacked_experts.py --smoke    # tiny shapes, one repeat (tests/test_bench_smoke_stacked.py)

One decoder layer's seven projections for K experts with B rows each, at decode: `separate` is what the
engine does (per expert, `engine/linear.py: fast_linear`, a packed GEMM on CPU fp32), `separate-sgemm`
plain `F.linear`, `stacked-bmm` one `torch.bmm` per projection over the K experts' stacked weights (weights
stored pre-transposed, as a stacked engine would keep them). Timed interleaved, medians, with the floor:
the layer's K weight sets read once at this machine's read bandwidth.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mope.engine.linear import fast_linear  # noqa: E402

from bench.kernels import int_at_least, read_bandwidth_gbs, time_interleaved  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402


def projection_shapes(shape) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o, gate, up, down."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def providers(weights: list[list[torch.Tensor]], stacked_t: list[torch.Tensor]) -> dict:
    """name -> fn(xs) where xs[p] is the (K, B, in) input of projection p."""
    def separate(linear):
        return lambda xs: [[linear(x[k], w) for k, w in enumerate(ws)]
                           for x, ws in zip(xs, weights, strict=True)]

    return {"separate": separate(fast_linear), "separate-sgemm": separate(F.linear),
            "stacked-bmm": lambda xs: [torch.bmm(x, w) for x, w in zip(xs, stacked_t, strict=True)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int_at_least(1), default=3)
    parser.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int_at_least(1), default=21)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, B=2, one repeat (overrides --batch, --repeats)")
    args = parser.parse_args(argv)
    shape = SHAPES["tiny" if args.smoke else "llama-160m"]
    batches, repeats = ([2], 1) if args.smoke else (args.batch, args.repeats)
    generator = torch.Generator().manual_seed(0)
    shapes = projection_shapes(shape)
    weights = [[torch.randn(out, inp, generator=generator) / inp**0.5 for _ in range(args.experts)]
               for out, inp in shapes]
    stacked_t = [torch.stack([w.t() for w in ws]).contiguous() for ws in weights]
    fns = providers(weights, stacked_t)
    bandwidth = read_bandwidth_gbs("cpu", 16 if args.smoke else 512, 3 if args.smoke else 11)
    weight_bytes = sum(w.numel() * 4 for ws in weights for w in ws)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    print(f"one layer's projections, K={args.experts}, {'tiny' if args.smoke else 'llama-160m'}, fp32, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s; floor {floor_ms:.3f} ms")
    print(f"{'B':>4} | " + " | ".join(f"{name:>14}" for name in fns) + " | separate/stacked")
    with torch.inference_mode():
        for batch in batches:
            xs = [torch.randn(args.experts, batch, inp, generator=generator) for _, inp in shapes]
            ms = time_interleaved(fns, (xs,), "cpu", 1 if args.smoke else 3, repeats)
            print(f"{batch:>4} | " + " | ".join(f"{ms[name]:>11.3f} ms" for name in fns)
                  + f" | {ms['separate'] / ms['stacked-bmm']:>15.2f}x")


if __name__ == "__main__":
    main()
