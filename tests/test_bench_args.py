"""The benchmark scripts refuse bad numbers (and --device cuda without a GPU) while parsing their arguments:
argparse's exit code 2 and a message naming the argument, before any work. Each case passes --smoke too,
so that a script which stops refusing fails fast instead of running its full benchmark."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")
CASES = [
    ("attention", ["--batch", "4", "0"], "argument --batch: must be an integer >= 1, got 0"),
    ("attention", ["--context", "0"], "argument --context: must be an integer >= 1, got 0"),
    ("decoder_ops", ["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    ("kernels", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    ("kernels", ["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
    ("linear", ["--rows", "0"], "argument --rows: must be an integer >= 1, got 0"),
    ("linear", ["--peak-gflops", "0"], "argument --peak-gflops: must be > 0, got 0.0"),
    ("rollout", ["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    ("rollout", ["--new-tokens", "many"], "argument --new-tokens: invalid integer value: 'many'"),
    ("stacked_experts", ["--experts", "0"], "argument --experts: must be an integer >= 1, got 0"),
    ("train", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    *(pytest.param(script, ["--device", "cuda"], "argument --device: cuda needs a GPU", marks=NO_GPU)
      for script in ("kernels", "rollout", "train")),
]


@pytest.mark.parametrize("script, args, message", CASES)
def test_bad_argument_exits_2_naming_it(script, args, message, capsys):
    main = importlib.import_module(f"bench.{script}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
