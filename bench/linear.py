"""The decode-size fp32 linear on CPU: every projection of one model, M rows, three providers.

    python bench/linear.py             # llama-160m: the 84 decoder projections + LM head (551 MB), M 1..64
    python bench/linear.py --smoke     # tiny shape, one repeat (tests/test_bench_smoke_linear.py)

`packed` is `mope.kernels.packed_linear` in its best form (what engine/linear.py runs on CPUs with AVX-512
or AVX2; `packed-avx2`: its AVX2 form, where the CPU has AVX-512 too), `mkl-packed` MKL's
prepacked sgemm (`torch.ops.mkl._mkl_linear`, the engine's path on other CPUs), `sgemm` plain `F.linear`.
A model's weights are larger than the caches, so each call reads them from memory, as a decode step
does. Timed interleaved, medians; floors: the weights at the read bandwidth measured in the run, and
the FLOPs at `--peak-gflops`.
"""

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mope.kernels import packed_linear  # noqa: E402

from bench.kernels import int_at_least, read_bandwidth_gbs, time_interleaved  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402
from bench.stacked_experts import projection_shapes  # noqa: E402


def providers(weights: list[torch.Tensor]) -> dict[str, Callable[[dict[int, torch.Tensor]], list]]:
    """name -> fn(xs), xs[in_features] the (M, in) input, computing x @ wᵀ for every weight."""
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 32) for w in weights]
    fns = {"mkl-packed": lambda xs: [torch.ops.mkl._mkl_linear(x, p, w, None, len(x))
                                     for w, p in zip(weights, mkl, strict=True) for x in [xs[w.shape[1]]]],
           "sgemm": lambda xs: [F.linear(xs[w.shape[1]], w) for w in weights]}
    if packed_linear.available():
        packed = [packed_linear.pack_weight(w) for w in weights]

        def run_packed(xs: dict[int, torch.Tensor], isa: str) -> list:
            with packed_linear.using_instruction_set(isa):
                return [packed_linear.packed_linear(xs[w.shape[1]], p)
                        for w, p in zip(weights, packed, strict=True)]

        best, *others = packed_linear.instruction_sets()  # "packed" in the best form, then any others
        fns = {"packed": partial(run_packed, isa=best)} | {f"packed-{isa}": partial(run_packed, isa=isa)
                                                            for isa in others} | fns
    return fns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int_at_least(1), nargs="+", default=[1, 4, 8, 12, 16, 32, 64])
    parser.add_argument("--repeats", type=int_at_least(1), default=11)
    parser.add_argument("--peak-gflops", type=float, default=230.0,
                        help="fp32 matmul rate for the arithmetic floor (this machine's measured best)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, M=2, one repeat (overrides --rows, --repeats)")
    args = parser.parse_args(argv)
    if args.peak_gflops <= 0:
        parser.error(f"argument --peak-gflops: must be > 0, got {args.peak_gflops}")
    shape = SHAPES["tiny" if args.smoke else "llama-160m"]
    rows, repeats = ([2], 1) if args.smoke else (args.rows, args.repeats)
    generator = torch.Generator().manual_seed(0)
    shapes = projection_shapes(shape) * shape.num_hidden_layers + [(shape.vocab_size, shape.hidden_size)]
    weights = [torch.randn(out, inp, generator=generator) / inp**0.5 for out, inp in shapes]
    fns = providers(weights)
    bandwidth = read_bandwidth_gbs("cpu", 16 if args.smoke else 1024, 3 if args.smoke else 7)
    weight_bytes = sum(w.numel() * 4 for w in weights)
    name = "tiny" if args.smoke else "llama-160m"
    print(f"{len(weights)} weights, {weight_bytes / 1e6:.0f} MB fp32 ({name}), "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s")
    first, others = list(fns)[0], list(fns)[1:]
    print(f"{'M':>3} | " + " | ".join(f"{name:>10}" for name in fns) + " |   floor | "
          + " | ".join(f"{first} vs {other}" for other in others))
    with torch.inference_mode():
        for m in rows:
            xs = {inp: torch.randn(m, inp, generator=generator) for inp in {inp for _, inp in shapes}}
            ms = time_interleaved(fns, (xs,), "cpu", 1, repeats)
            floor = max(weight_bytes / bandwidth / 1e6, 2 * m * weight_bytes / 4 / args.peak_gflops / 1e6)
            print(f"{m:>3} | " + " | ".join(f"{ms[name]:>7.2f} ms" for name in fns)
                  + f" | {floor:>4.2f} ms | "
                  + " | ".join(f"{ms[other] / ms[first]:.2f}x" for other in others))


if __name__ == "__main__":
    main()
