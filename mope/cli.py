"""The ``mope`` command: generate, train, eval (and demo, from mope/demo/cli.py when present)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

DTYPES = ("float32", "bfloat16", "float16")
# eval options a train config also sets: the command line's value, else the config's, else the default
EVAL_CONFIG_KEYS = ("device", "dtype", "mix_mode", "max_tokens", "preferences", "preferences_file",
                    "reference")


def add_engine_args(p: argparse.ArgumentParser, experts_required: bool = True) -> None:
    p.add_argument("--experts", nargs="+", required=experts_required, metavar="DIR",
                   help="expert checkpoint directories (Hugging Face format, one shared tokenizer)")
    p.add_argument("--pcm", metavar="DIR", help="a saved PCM directory (from `mope train`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")
    p.add_argument("--mix-mode", default="prob", choices=("prob", "logit"),
                   help="prob: weighted mixture of distributions (the paper); logit: geometric mixture")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per response (default: 128)")
    p.add_argument("--preferences-file", metavar="FILE",
                   help="a preferences.json of your own dimensions (default: the packaged six)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mope", description="Serve and train a Mixture of Preference "
                                     "Experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate responses with a preference or fixed weights",
                         description="Generate responses from a mixture of experts. Prompts are "
                         "instructions, put in the preference prompt format unless --raw.")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="*", help="instructions (or use --prompts-file)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="JSON list of strings or {'prompt': ...}, JSON Lines of them (.jsonl), or a text "
                     "file with one prompt per line")
    mix = gen.add_mutually_exclusive_group(required=True)
    mix.add_argument("--preference", help="e.g. P1A,P2B,P3A or elementary,informative,friendly "
                     "(weights from --pcm, or uniform over the active experts without one)")
    mix.add_argument("--weights", help="fixed mixture weights, comma-separated, one per expert (sum 1)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--raw", action="store_true", help="send the prompts to the experts as given")
    gen.add_argument("--json", action="store_true", help="print one JSON object per response")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train a PCM with REBEL",
                           description="Train the Preference Control Model with REBEL. Under torchrun "
                           "(torchrun --nproc-per-node N -m mope train ...) each rank rolls out its shard.")
    train.add_argument("--config", required=True, metavar="FILE", help="YAML or JSON train config")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in the config's output_dir")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="compare the PCM with uniform weights, single experts and prompting",
                        description="Mean BT-normalised reward per preference combination of: the PCM, "
                        "MPD (Uniform), each single expert, and preference prompting of one expert. "
                        "With --config, options not given take the run's values.")
    add_engine_args(ev, experts_required=False)
    ev.add_argument("--config", metavar="FILE", help="a train config: experts, rewards, the PCM of its "
                    "latest checkpoint, and its device, dtype, mix_mode, max_tokens, preferences, "
                    "preferences_file and reference, unless given here")
    ev.add_argument("--rewards", metavar="FILE", help="YAML/JSON map dimension code -> reward spec")
    ev.add_argument("--prompts-file", metavar="FILE",
                    help="JSON or JSON Lines prompt file (default: the packaged Koala 50)")
    ev.add_argument("--preferences", nargs="+", metavar="PREF",
                    help="preferences to evaluate (default: all 8 combinations)")
    ev.add_argument("--reference", default="uniform",
                    help="'uniform' (the uniform-weights response) or 'field:NAME' of the prompt file")
    ev.add_argument("--prompting-expert", type=int, default=0, help="expert used for preference prompting")
    ev.add_argument("--limit", type=int, help="evaluate the first N prompts only")
    ev.add_argument("--output", default="eval.json", metavar="FILE", help="JSON report (default: eval.json)")
    # None = not given: the config's value, else the argument's default (resolved by cmd_eval)
    ev.set_defaults(func=cmd_eval, option_defaults={key: ev.get_default(key) for key in EVAL_CONFIG_KEYS},
                    **dict.fromkeys(EVAL_CONFIG_KEYS))

    try:
        importlib.import_module("mope.demo.cli").add_parser(sub)
    except ModuleNotFoundError as e:
        if e.name != "mope.demo.cli":
            raise
    return parser


def read_prompts(args) -> list[str]:
    from mope.trainer import load_prompt_records

    prompts = list(args.prompts or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.suffix.lower() in (".json", ".jsonl"):
            prompts += [r["prompt"] for r in load_prompt_records(path)]
        elif path.is_file():
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
        else:
            raise FileNotFoundError(f"prompts file not found: {path}")
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts-file")
    return prompts


def registry_of(args):
    """The dimensions of --preferences-file, or None (the PCM's own, else the packaged ones)."""
    from mope.preferences import load_registry

    return load_registry(args.preferences_file) if args.preferences_file else None


def make_engine(args, experts: list[str], pcm=None, registry=None):
    import torch

    from mope.api import Engine

    for path in experts:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"expert directory not found: {path}")
    if pcm is not None and not Path(pcm).is_dir():
        raise FileNotFoundError(f"PCM directory not found: {pcm}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return Engine(experts, pcm=pcm, device=args.device, dtype=getattr(torch, args.dtype),
                  mix_mode=args.mix_mode, registry=registry)


def cmd_generate(args) -> None:
    from mope.engine.sampling_params import SamplingParams

    prompts = read_prompts(args)
    engine = make_engine(args, args.experts, args.pcm, registry_of(args))
    texts = prompts if args.raw else engine.format_prompts(prompts)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise ValueError(f"--weights must be comma-separated numbers, got {args.weights!r}") from e
        outs = engine.generate(texts, weights=[weights] * len(texts), sampling=sampling)
    else:
        outs = engine.generate(texts, preferences=[args.preference] * len(texts), sampling=sampling)
    for prompt, out in zip(prompts, outs, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "response": out.text, "finish_reason": out.finish_reason,
                              "logprob": float(out.logprobs.sum()),
                              "mean_weights": out.weights.mean(0).tolist() if len(out.token_ids) else []}))
        else:
            print(f"### {prompt}\n{out.text}\n")


def cmd_train(args) -> None:
    import torch.distributed as dist

    from mope.config import TrainConfig
    from mope.distributed import init_distributed
    from mope.trainer import Trainer

    config = TrainConfig.load(args.config)
    info = init_distributed(config.device)
    try:
        history = Trainer(config, dist_info=info, resume=args.resume).train()
        if info.is_main and history:
            last = history[-1]
            print(f"step {last['step']}: reward {last['reward']:.4f}, loss {last['loss']:.4f}; "
                  f"outputs in {config.output_dir}")
        elif info.is_main:
            print(f"nothing to do: the run in {config.output_dir} already reached step {config.steps} "
                  "(raise steps in the config to continue it)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def read_mapping(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a mapping")
    return data


def cmd_eval(args) -> None:
    from mope.checkpoint import latest_checkpoint
    from mope.evaluate import evaluate, format_table, koala_prompts
    from mope.rewards import build_reward_model
    from mope.trainer import load_prompt_records

    experts, pcm, reward_specs, config = args.experts, args.pcm, None, None
    if args.config:
        from mope.config import TrainConfig

        config = TrainConfig.load(args.config)
        experts, reward_specs = experts or config.experts, config.rewards
        checkpoint = latest_checkpoint(config.output_dir)
        pcm = pcm or (str(checkpoint / "pcm") if checkpoint else None)
    for key in EVAL_CONFIG_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(config, key) if config is not None else args.option_defaults[key])
    if args.rewards:
        reward_specs = read_mapping(args.rewards)
    if not experts or not reward_specs:
        raise ValueError("eval needs --experts and --rewards (or a --config that has them)")
    records = load_prompt_records(args.prompts_file) if args.prompts_file else [
        {"prompt": p} for p in koala_prompts()]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        records = records[: args.limit]
    output = Path(args.output)  # checked now, not after the whole evaluation
    if not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: directory {output.parent} not found")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory")
    reference, references = args.reference, None
    if reference.startswith("field:"):
        field = reference.removeprefix("field:")
        references = {r["prompt"]: r[field] for r in records if field in r}
        reference = "field"
    elif reference != "uniform":
        raise ValueError(f"--reference must be 'uniform' or 'field:NAME', got {args.reference!r}")
    engine = make_engine(args, experts, pcm, registry_of(args))
    prefs = [engine.registry.parse(p) for p in args.preferences] if args.preferences else \
        engine.registry.combinations()
    scorers = {code: build_reward_model(spec) for code, spec in reward_specs.items()}
    report = evaluate(engine, scorers, [r["prompt"] for r in records], prefs, reference, references,
                      args.prompting_expert, args.max_tokens, progress=True)
    report["pcm"] = pcm
    output.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"\nreport written to {args.output}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # bad input or an unusable path: one line, not a traceback
        print(f"mope {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
