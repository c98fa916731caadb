"""Rollout benchmark, providers side by side in one run (interleaved A B A B, medians after a warm-up).

Rollout (issue 3): `ours` (mope.engine.Engine) against `hf-loop` (bench/baselines/hf_loop.py), K experts
plus a PCM of the same shape, B prompts, `--new-tokens` with ignore_eos. Reports tokens/s (whole rollouts,
prefill included), the ratio, and our decode step (the median iteration of generate's loop: scheduling,
the forwards, mixing, sampling, bookkeeping) against the bare CausalLM forwards of the same batch: the
engine's own overhead. Each figure beside its floor.

LoRA experts (issue 5), at the model level: one decode step of K experts' B rows each, as
`lora-experts` (one base forward of all K*B rows + each adapter's delta), `full-experts` (K models),
`merged-single` (one model with the adapters averaged: B rows). Every expert's rows attend over their own
K/V cache, as in the engine.

    python bench/rollout.py                 # llama-160m, B in 1 8 32 (rollout) and 1 4 32 (LoRA)
    python bench/rollout.py --smoke         # tiny shape, a few tokens: a fast check that it all runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines.hf_loop import LoopPCM, hf_rollout  # noqa: E402
from bench.kernels import int_at_least, usable_device  # noqa: E402
from bench.shapes import SHAPES, Shape, make_random_adapter, make_random_checkpoint  # noqa: E402

# This machine on 2 threads, measured 2026-11-30 on a quiet machine: the best fp32 matmul rate (sgemm
# (512 x 768) . (768 x 3072): 236 GFLOP/s; 2048^3: 177) and the read bandwidth (sum() over 0.25-4 GB).
# DESIGN.md's 330 GFLOP/s and 28 GB/s are nominal figures this machine did not reach.
PEAK_FLOPS = 230e9
READ_BYTES_PER_S = 22.5e9
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about the sea and the wind.",
           "How do I sort a list in Python?", "Give three tips for a job interview.",
           "What is the capital of France, and why?", "Summarise the plot of Hamlet in two lines."]
MAX_PROMPT_TOKENS = 64
PCM_SEED = 100
LORA_CONTEXT = 96  # tokens in the cache of each sequence at the timed decode step


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Median wall time (ms) of each fn, run interleaved (A B A B ...), after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def matmul_params(shape: Shape, logits: bool = True) -> int:
    """Weights a token's forward multiplies by: all but the embedding table (and the head if not `logits`)."""
    embedding = shape.vocab_size * shape.hidden_size
    return shape.num_params() - embedding - (0 if logits else embedding)


def rate(tokens: int, ms: float) -> str:
    """tokens/s: whole numbers from 100 on, else three significant digits."""
    per_s = tokens / ms * 1e3
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def floor_ms(flops: float, bytes_read: float) -> float:
    """The larger of the arithmetic and the weight-reading time, in ms."""
    return 1e3 * max(flops / PEAK_FLOPS, bytes_read / READ_BYTES_PER_S)


class DecodeStep:
    """One decode step of `batch` sequences, each `context_len` tokens deep, over a random paged cache."""

    def __init__(self, shape: Shape, batch: int, context_len: int, dtype: torch.dtype, device: str,
                 block_size: int = 16):
        from mope.engine.context import AttentionContext

        head_dim = shape.hidden_size // shape.num_attention_heads
        per_seq = -(-context_len // block_size)
        cache_shape = (batch * per_seq, block_size, shape.num_key_value_heads, head_dim)
        self.kv_cache = [(torch.randn(cache_shape, dtype=dtype, device=device),
                          torch.randn(cache_shape, dtype=dtype, device=device))
                         for _ in range(shape.num_hidden_layers)]
        tables = torch.arange(batch * per_seq, device=device).view(batch, per_seq)
        last = context_len - 1
        lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)
        slots = tables[:, last // block_size] * block_size + last % block_size
        self.ctx = AttentionContext(is_prefill=False, context_lens=lens, block_tables=tables.int(),
                                    slot_mapping=slots)
        self.input_ids = torch.randint(3, shape.vocab_size, (batch,), device=device)
        self.positions = torch.full((batch,), last, device=device)

    def run(self, model, logits: bool = True, **kwargs):
        hidden = model(self.input_ids, self.positions, self.ctx, self.kv_cache, **kwargs)
        return model.compute_logits(hidden) if logits else hidden


class BenchPCM:
    """The engine's weight provider here: our CausalLM of the PCM checkpoint + the HF loop's own head, reading
    the prompt itself, every expert active (the same computation as `LoopPCM`)."""

    def __init__(self, model, head: torch.nn.Linear, tokenizer, num_experts: int):
        self.model, self.head, self.tokenizer, self.num_experts = model, head, tokenizer, num_experts

    def prepare(self, prompt: str, preference: str) -> tuple[list[int], list[bool]]:
        return self.tokenizer.encode(prompt), [True] * self.num_experts

    def weights(self, hidden: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float().masked_fill(~active, float("-inf"))
        return torch.softmax(logits, dim=-1)


def checkpoints(cache: Path, shape_name: str, num_experts: int) -> tuple[list[Path], Path]:
    experts = [make_random_checkpoint(cache / shape_name / f"expert{i}", shape_name, seed=i)
               for i in range(num_experts)]
    return experts, make_random_checkpoint(cache / shape_name / "pcm", shape_name, seed=PCM_SEED)


class DecodeTimer:
    """Wraps an engine's scheduler: the wall time of every decode iteration of generate's loop (from one
    `schedule` call to the next) is appended to `durations`; `reset()` before each generate."""

    def __init__(self, engine):
        self.durations: list[float] = []
        self.schedule, self.in_flight = engine.scheduler.schedule, None
        engine.scheduler.schedule = self

    def reset(self) -> None:
        self.in_flight = None

    def __call__(self):
        now = time.perf_counter()
        if self.in_flight is not None and not self.in_flight[1]:
            self.durations.append(now - self.in_flight[0])
        step, is_prefill = self.schedule()
        self.in_flight = (now, is_prefill)
        return step, is_prefill


class RolloutProviders:
    """`ours` (the Engine, with `BenchPCM`) and `hf-loop` over the same K random experts and PCM, plus the
    bare CausalLM forwards of one decode step (the engine's own models)."""

    def __init__(self, shape_name: str, num_experts: int, device: str, dtype: torch.dtype, cache: Path,
                 max_batch: int = 32, max_new_tokens: int = 128):
        from mope.engine.engine import Engine
        from mope.engine.loader import load_model, load_tokenizer
        from transformers import AutoModelForCausalLM

        self.shape, self.num_experts, self.device, self.dtype = SHAPES[shape_name], num_experts, device, dtype
        expert_dirs, pcm_dir = checkpoints(cache, shape_name, num_experts)
        torch.manual_seed(0)
        head = torch.nn.Linear(self.shape.hidden_size, num_experts).to(device, dtype)
        self.tokenizer = load_tokenizer(pcm_dir)
        provider = BenchPCM(load_model(pcm_dir, device, dtype), head, self.tokenizer, num_experts)
        # a pool just large enough for the largest run (every prompt is shorter than MAX_PROMPT_TOKENS)
        blocks = max_batch * (num_experts + 1) * -(-(MAX_PROMPT_TOKENS + max_new_tokens) // 16)
        self.engine = Engine(expert_dirs, pcm=provider, device=device, dtype=dtype, num_kv_blocks=blocks,
                             max_num_seqs=max_batch)
        self.decode_timer = DecodeTimer(self.engine)
        hf_load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.hf_models = [hf_load(d) for d in expert_dirs]
        self.loop_pcm = LoopPCM(hf_load(pcm_dir), head)

    def providers(self, batch: int, new_tokens: int) -> dict[str, Callable[[], None]]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids = [self.tokenizer.encode(p) for p in prompts]
        # the bare forwards of one decode step mid-rollout: K experts with logits, the PCM without, each
        # model over its own K/V (as in the engine: a model's keys and values are its own)
        models = self.engine.runner.models
        steps = [DecodeStep(self.shape, batch, max(map(len, ids)) + new_tokens // 2, self.dtype, self.device)
                 for _ in models]
        return {"ours": partial(engine_rollout, self.engine, self.decode_timer, prompts, new_tokens),
                "hf-loop": partial(loop_rollout, self.hf_models, self.loop_pcm, ids, new_tokens),
                "bare": partial(forward_models, steps, models, self.num_experts)}


def engine_rollout(engine, timer: DecodeTimer, prompts: list[str], new_tokens: int) -> None:
    from mope.engine.sampling_params import SamplingParams

    timer.reset()
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=new_tokens, ignore_eos=True)
    outs = engine.generate(prompts, preferences=["bench"] * len(prompts), sampling=sampling)
    assert all(len(o.token_ids) == new_tokens for o in outs)


def loop_rollout(models, pcm: LoopPCM, ids: list[list[int]], new_tokens: int) -> None:
    rows = hf_rollout(models, pcm, ids, None, new_tokens, top_p=0.9, temperature=1.0, ignore_eos=True)
    assert all(len(r) == new_tokens for r in rows)


def forward_models(steps: list[DecodeStep], models, num_with_logits: int) -> None:
    """One decode step of each model over its own K/V (steps[i]), as the engine's runner makes it (the models
    that take the one-call C++ path in one `decode_layers` call, side by side on the cores); the first
    `num_with_logits` (the experts) also compute logits."""
    from mope.kernels.decode_layers import decode_layers

    calls = [model.decode_call(step.input_ids, step.positions, step.ctx, step.kv_cache)
             for step, model in zip(steps, models, strict=True)]
    for i, (step, model, hidden) in enumerate(zip(steps, models, decode_layers(calls), strict=True)):
        out = hidden if hidden is not None else step.run(model, logits=False)
        if i < num_with_logits:
            model.compute_logits(out)


@torch.inference_mode()
def rollout_table(args) -> Iterator[str]:
    dtype = getattr(torch, args.dtype)
    setup = RolloutProviders(args.shape, args.experts, args.device, dtype, args.cache_dir, max(args.batch),
                             args.new_tokens)
    shape, new = setup.shape, args.new_tokens
    weights = args.experts * matmul_params(shape) + matmul_params(shape, logits=False)
    yield "| B | ours tok/s | hf-loop tok/s | ours / hf-loop | floor tok/s | our decode step ms " \
          "| bare forwards ms | overhead | floor step ms |"
    yield "|" + "---|" * 9
    for batch in args.batch:
        for warmup in setup.providers(batch, 4).values():  # a short rollout warms each provider up
            warmup()
        setup.decode_timer.durations.clear()
        ms = median_ms(setup.providers(batch, new), args.repeats, warmup=False)
        our_step = 1e3 * statistics.median(setup.decode_timer.durations)
        floor = floor_ms(2 * batch * weights, 4 * weights)
        yield (f"| {batch} | {rate(batch * new, ms['ours'])} | {rate(batch * new, ms['hf-loop'])} "
               f"| {ms['hf-loop'] / ms['ours']:.2f}x | {rate(batch, floor)} | {our_step:.1f} "
               f"| {ms['bare']:.1f} | {1 - ms['bare'] / our_step:.0%} | {floor:.1f} |")


class LoRAProviders:
    """One decode step of K experts' rows: `lora-experts` (a LoRAGroup over expert 0 as the base),
    `full-experts` (K full models), `merged-single` (the base with the adapters averaged in)."""

    def __init__(self, shape_name: str, num_experts: int, rank: int, device: str, dtype: torch.dtype,
                 cache: Path):
        from mope.engine.loader import load_model
        from mope.engine.lora import LoRAGroup

        self.shape, self.num_experts, self.device, self.dtype = SHAPES[shape_name], num_experts, device, dtype
        expert_dirs, _ = checkpoints(cache, shape_name, num_experts)
        base_dir = expert_dirs[0]
        adapters = [make_random_adapter(cache / shape_name / f"adapter{i}-r{rank}", base_dir, shape_name,
                                        rank, seed=i) for i in range(num_experts)]
        self.full = [load_model(d, device, dtype) for d in expert_dirs]
        self.group = LoRAGroup(load_model(base_dir, device, dtype), adapters, base_path=base_dir)
        self.merged = load_model(base_dir, device, dtype)
        self.group.merge_into(self.merged, [1 / num_experts] * num_experts)
        self.adapter_params = sum(a.numel() + b.numel() for a, b in self.group.adapters[0].weights.values())

    def providers(self, batch: int, context_len: int) -> dict[str, Callable[[], object]]:
        k = self.num_experts
        # every expert's rows over their own K/V, as in the engine: full experts one step each, the
        # adapter experts' k * batch rows in one
        ones = [DecodeStep(self.shape, batch, context_len, self.dtype, self.device) for _ in range(k)]
        rows = DecodeStep(self.shape, k * batch, context_len, self.dtype, self.device)
        adapter_index = torch.arange(k, device=self.device).repeat_interleave(batch)
        return {"lora-experts": partial(rows.run, self.group, adapter_index=adapter_index),
                "full-experts": partial(forward_models, ones, self.full, k),
                "merged-single": partial(ones[0].run, self.merged)}


@torch.inference_mode()
def lora_table(args) -> Iterator[str]:
    setup = LoRAProviders(args.shape, args.experts, args.rank, args.device, getattr(torch, args.dtype),
                          args.cache_dir)
    k, weights, lora = args.experts, matmul_params(setup.shape), setup.adapter_params
    yield "| B | lora-experts tok/s | full-experts tok/s | merged-single tok/s | lora / full " \
          "| lora / merged | floor tok/s lora / full / merged |"
    yield "|" + "---|" * 7
    for batch in args.lora_batch:
        ms = median_ms(setup.providers(batch, LORA_CONTEXT), args.repeats)
        floors = (floor_ms(2 * k * batch * (weights + lora), 4 * (weights + k * lora)),
                  floor_ms(2 * k * batch * weights, 4 * k * weights),
                  floor_ms(2 * batch * weights, 4 * weights))
        yield (f"| {batch} | {rate(batch, ms['lora-experts'])} | {rate(batch, ms['full-experts'])} "
               f"| {rate(batch, ms['merged-single'])} | {ms['full-experts'] / ms['lora-experts']:.2f}x "
               f"| {ms['merged-single'] / ms['lora-experts']:.2f}x "
               f"| {' / '.join(rate(batch, f) for f in floors)} |")
    setup.group.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-160m", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 8, 32],
                        help="rollout batch sizes")
    parser.add_argument("--lora-batch", type=int_at_least(1), nargs="+", default=[1, 4, 32],
                        help="LoRA batch sizes")
    parser.add_argument("--new-tokens", type=int_at_least(1), default=128)
    parser.add_argument("--experts", type=int_at_least(1), default=3)
    parser.add_argument("--rank", type=int_at_least(1), default=16, help="LoRA rank")
    parser.add_argument("--repeats", type=int_at_least(1), default=3)
    parser.add_argument("--only", choices=["rollout", "lora"], help="run one table")
    parser.add_argument("--device", type=usable_device, default="cpu")
    parser.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mope-bench"),
                        help="where random checkpoints are written (and reused)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, B=2, 8 tokens, 1 repeat (overrides --shape, --batch, --lora-batch, "
                        "--new-tokens, --repeats)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.lora_batch, args.new_tokens, args.repeats = "tiny", [2], [2], 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"shape {args.shape}, K={args.experts}, {args.dtype} on {args.device}, {torch.get_num_threads()} "
          f"threads, medians of {args.repeats} interleaved runs")
    if args.only != "lora":
        print(f"\nRollout: {args.new_tokens} new tokens, ignore_eos, PCM of the same shape\n")
        for line in rollout_table(args):
            print(line, flush=True)
    if args.only != "rollout":
        print(f"\nLoRA experts: one decode step, rank {args.rank}, context {LORA_CONTEXT}\n")
        for line in lora_table(args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
