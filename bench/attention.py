"""Paged decode attention on CPU: the torch reference and the C++ kernel, side by side, against the floor.

    python bench/attention.py              # llama-160m heads (12 x 64), 128 cached tokens, B 4 12 32
    python bench/attention.py --smoke      # tiny, one repeat (tests/test_bench_smoke_attention.py)

One call attends B sequences' single query token to their cached K/V through shuffled block tables, as in
a decode step. Every call uses another layer's caches (enough layers to pass 400 MB), so the K/V come from
memory as they do in a model step, where the layer's GEMMs stream the weights in between. `torch`:
`paged_decode_attention(..., backend="torch")` (gather, then attention per sequence); `cpu`: the C++
kernel (csrc/paged_attention.cpp). The floor: the K/V bytes over this machine's read bandwidth.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mope.kernels.paged_attention import paged_decode_attention  # noqa: E402

from bench.kernels import int_at_least, read_bandwidth_gbs  # noqa: E402
from bench.rollout import median_ms  # noqa: E402


def layer_caches(batch: int, context: int, heads: int, head_dim: int, block_size: int,
                 megabytes: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Random K/V caches for enough layers to fill `megabytes`, and one shuffled block table."""
    per_seq = -(-context // block_size)
    shape = (batch * per_seq, block_size, heads, head_dim)
    layer_bytes = 2 * torch.Size(shape).numel() * 4
    layers = max(1, megabytes * 2**20 // layer_bytes)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(layers)]
    return caches, torch.randperm(batch * per_seq).int().view(batch, per_seq)


def attend_every_layer(q: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], tables: torch.Tensor,
                       lens: torch.Tensor, backend: str) -> None:
    for k_cache, v_cache in caches:
        paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=q.shape[-1] ** -0.5, backend=backend)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int_at_least(1), nargs="+", default=[4, 12, 32])
    parser.add_argument("--context", type=int_at_least(1), default=128, help="cached tokens per sequence")
    parser.add_argument("--heads", type=int_at_least(1), default=12)
    parser.add_argument("--head-dim", type=int_at_least(1), default=64)
    parser.add_argument("--repeats", type=int_at_least(1), default=9)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny, B = 2, one repeat (overrides every option above)")
    args = parser.parse_args(argv)
    megabytes = 8 if args.smoke else 400
    if args.smoke:
        args.batch, args.context, args.heads, args.head_dim, args.repeats = [2], 20, 2, 16, 1
    bandwidth = read_bandwidth_gbs("cpu", 16 if args.smoke else 512, 3 if args.smoke else 11)
    print(f"paged decode attention, {args.heads} heads x {args.head_dim}, {args.context} cached tokens, "
          f"fp32, {torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s; "
          f"medians of {args.repeats}")
    print("| B | torch ms | cpu ms | torch / cpu | floor ms | cpu / floor |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    torch.manual_seed(0)
    for batch in args.batch:
        caches, tables = layer_caches(batch, args.context, args.heads, args.head_dim, 16, megabytes)
        lens = torch.full((batch,), args.context, dtype=torch.int32)
        q = torch.randn(batch, args.heads, args.head_dim)

        ms = median_ms({name: partial(attend_every_layer, q, caches, tables, lens, name)
                        for name in ("torch", "cpu")}, args.repeats)
        ms = {name: t / len(caches) for name, t in ms.items()}
        floor_ms = 2 * batch * args.context * args.heads * args.head_dim * 4 / (bandwidth * 1e9) * 1e3
        print(f"| {batch} | {ms['torch']:.3f} | {ms['cpu']:.3f} | {ms['torch'] / ms['cpu']:.1f}x "
              f"| {floor_ms:.3f} | {ms['cpu'] / floor_ms:.2f}x |")


if __name__ == "__main__":
    main()
