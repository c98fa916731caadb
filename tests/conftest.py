"""Test-wide settings: never reach a network; run Triton kernels in the interpreter on a CPU machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:  # noqa: SIM105 - the interpreter must be chosen before triton is imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
