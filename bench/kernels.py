"""mix_sample providers side by side: what a user writes today vs our fused kernels.

    python bench/kernels.py                 # CPU: torch-naive, torch-compile, cpu
    python bench/kernels.py --device cuda   # GPU: torch-naive, torch-compile, triton
    python bench/kernels.py --smoke         # tiny shapes, one repeat, no torch.compile (the test suite)

Providers are timed interleaved (A B C A B C ...) after a warm-up, and the median is reported, with the
ratio to torch-naive and the bandwidth floor: the bytes that must be read (the K experts' logits) over
this machine's read bandwidth, measured here by timing a large tensor's sum().
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from mope.kernels import mix_sample

NUM_EXPERTS, TOP_P = 3, 0.9
BATCHES, VOCABS = (1, 8, 64), (32000, 128256)


def naive_mix_sample(logits: torch.Tensor, weights: torch.Tensor, temperature: float,
                     top_p: float) -> torch.Tensor:
    """What a user writes today: softmax per expert, weighted sum, then HF's TopPLogitsWarper (full sort,
    cumsum, mask) and torch.multinomial."""
    probs = sum(weights[:, k, None] * torch.softmax(logits[k].float() / temperature, dim=-1)
                for k in range(logits.shape[0]))
    scores = probs.log()
    sorted_scores, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= (1 - top_p)
    sorted_to_remove[..., -1:] = False
    to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
    scores = scores.masked_fill(to_remove, float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def providers(device: str, with_compile: bool) -> dict[str, Callable]:
    """name -> fn(logits, weights) returning the sampled tokens."""
    out = {"torch-naive": lambda logits, weights: naive_mix_sample(logits, weights, 1.0, TOP_P)}
    if with_compile:
        compiled = torch.compile(naive_mix_sample, dynamic=False)
        out["torch-compile"] = lambda logits, weights: compiled(logits, weights, 1.0, TOP_P)
    ours = "triton" if device == "cuda" else "cpu"
    out[ours] = lambda logits, weights: mix_sample(logits, weights, temperature=1.0, top_p=TOP_P, top_k=0,
                                                   seed=0, offset=0, backend=ours).tokens
    return out


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (a non-integer is an "invalid integer value")."""
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return integer


def usable_device(name: str) -> str:
    """An argparse type: a device name, refusing cuda where torch has no GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name} needs a GPU (torch.cuda.is_available() is False)")
    return name


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def read_bandwidth_gbs(device: str, megabytes: int, repeats: int) -> float:
    """Read bandwidth in GB/s: the median time of summing a tensor much larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def time_interleaved(fns: dict[str, Callable], args: tuple, device: str, warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median milliseconds per provider, timed A B C A B C ... after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(*args)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn(*args)
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=usable_device, choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one repeat, no torch.compile (overrides --repeats, --warmup)")
    parser.add_argument("--repeats", type=int_at_least(1), default=15)
    parser.add_argument("--warmup", type=int_at_least(0), default=3)
    args = parser.parse_args(argv)
    batches, vocabs = ((1, 4), (1000,)) if args.smoke else (BATCHES, VOCABS)
    repeats, warmup = (1, 1) if args.smoke else (args.repeats, args.warmup)
    bandwidth = read_bandwidth_gbs(args.device, 16 if args.smoke else 512, 3 if args.smoke else 11)
    fns = providers(args.device, with_compile=not args.smoke)
    ours = "triton" if args.device == "cuda" else "cpu"
    print(f"mix_sample K={NUM_EXPERTS} top_p={TOP_P} fp32 on {args.device} "
          f"({torch.get_num_threads()} threads); read bandwidth {bandwidth:.1f} GB/s; "
          f"medians of {repeats} interleaved repeats")
    print(f"{'B':>4} {'V':>7} | " + " | ".join(f"{name:>13}" for name in fns)
          + f" | {'naive/' + ours:>10} | {'floor ms':>8} | {ours + '/floor':>10}")
    generator = torch.Generator().manual_seed(0)
    for vocab in vocabs:
        for batch in batches:
            logits = (torch.randn(NUM_EXPERTS, batch, vocab, generator=generator) * 2).to(args.device)
            weights = torch.softmax(torch.randn(batch, NUM_EXPERTS, generator=generator), dim=-1)
            weights = weights.to(args.device)
            ms = time_interleaved(fns, (logits, weights), args.device, warmup, repeats)
            floor_ms = logits.numel() * logits.element_size() / (bandwidth * 1e9) * 1e3
            speedup, to_floor = ms["torch-naive"] / ms[ours], ms[ours] / floor_ms
            print(f"{batch:>4} {vocab:>7} | " + " | ".join(f"{ms[name]:>10.3f} ms" for name in fns)
                  + f" | {speedup:>9.1f}x | {floor_ms:>8.3f} | {to_floor:>9.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
