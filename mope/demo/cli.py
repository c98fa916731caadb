"""The `mope demo` subcommand (mope/cli.py adds it with `add_parser`)."""

import argparse

from mope.demo.kit import DEFAULT_CACHE


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on the `mope` command's subparsers."""
    demo = subparsers.add_parser(
        "demo",
        help="build the demo kit and show MoPE learning preferences (CPU, nothing downloaded)",
        description="Build (or reuse) the demo kit: a synthetic corpus, a tokenizer, a small base LM, six "
        "LoRA expert adapters over it and a PCM backbone, cached. Then REBEL-train the PCM on the 8 "
        "preference combinations and compare it with uniform weights and the best single expert on "
        "held-out instructions.",
    )
    demo.add_argument("--steps", type=int, default=40, help="REBEL steps (default: 40)")
    demo.add_argument("--out", default="demo_out", metavar="DIR",
                      help="where metrics.jsonl, metrics.png, checkpoints and demo_results.json go; "
                      "a previous demo run there is replaced (default: demo_out)")
    demo.add_argument("--kit-dir", default=str(DEFAULT_CACHE), metavar="DIR",
                      help=f"cache directory of the kit (default: $MOPE_DEMO_CACHE or {DEFAULT_CACHE})")
    demo.add_argument("--eval-samples", type=int, default=2,
                      help="sampled responses per held-out instruction in the comparison (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the REBEL run and the comparison")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args) -> None:
    from mope.demo.run import run_demo

    run_demo(steps=args.steps, out_dir=args.out, kit_dir=args.kit_dir, eval_samples=args.eval_samples,
             seed=args.seed, progress=not args.no_progress)
