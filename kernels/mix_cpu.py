"""C++ backend of mix_sample / mix_logprobs (csrc/mix_sample.cpp, JIT-built by kernels/cpp_build.py).

Takes the validated arguments (kernels/validate.py). The kernel reports active experts with NaN/+inf
logits per row from its own max pass, so this backend skips the separate logits check.
"""

from types import ModuleType

from torch import Tensor

from .cpp_build import load_cpp
from .validate import raise_bad_logits


def cpu_module() -> ModuleType | None:
    """The built extension, or None (load_cpp has warned) when no compiler is available."""
    return load_cpp("mix_sample")


def mix_sample_cpu(logits: Tensor, weights: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                   seed: Tensor, offset: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens int64 (B,), logprobs fp32 (B,), expert_logprobs fp32 (B, K))."""
    tokens, logprobs, expert_logprobs, bad = cpu_module().mix_sample(
        logits, weights, temperature, top_p, top_k, seed, offset, mode == "logit")
    _raise_on_bad_rows(bad)
    return tokens, logprobs, expert_logprobs


def mix_logprobs_cpu(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor,
                     mode: str) -> tuple[Tensor, Tensor]:
    """(log pi(token) fp32 (N,), d log pi(token) / d weights fp32 (N, K), 0 where w_k = 0)."""
    logprobs, jacobian, bad = cpu_module().mix_logprobs(logits, weights, tokens, temperature, mode == "logit")
    _raise_on_bad_rows(bad)
    return logprobs, jacobian


def _raise_on_bad_rows(bad: Tensor) -> None:
    rows = (bad >= 0).nonzero()
    if len(rows):
        row = int(rows[0, 0])
        raise_bad_logits(row, int(bad[row]))
