"""Argument checks shared by every mix_sample / mix_logprobs backend (ValueError naming the argument).

Everything here is O(B * K) except `check_active_logits`, which reads each active (row, expert) logit row
once (one max-reduction pass, no temporary of size V). Backends that find bad logits themselves (the C++
one does, for free, in its max pass) skip it and call `raise_bad_logits`.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("prob", "logit")
WEIGHT_SUM_TOLERANCE = 1e-4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class MixArgs(NamedTuple):
    """Validated arguments: per-row parameters broadcast to (B,) tensors on the logits' device."""

    logits: Tensor  # (K, B, V) fp32/bf16/fp16, last dim contiguous
    weights: Tensor  # (B, K) fp32 contiguous, rows on the simplex
    temperature: Tensor  # (B,) fp32 >= 0
    top_p: Tensor  # (B,) fp32 in (0, 1]
    top_k: Tensor  # (B,) int64 >= 0
    seed: Tensor  # (B,) int64
    offset: Tensor  # (B,) int64
    mode: str


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_logits_and_weights(logits: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes (K, B, V) and (B, K), dtypes, devices, weights on the simplex; returns contiguous weights."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a (K, B, V) tensor, got {describe(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    num_experts, batch, vocab = logits.shape
    if num_experts == 0 or vocab == 0:
        raise ValueError(f"logits must have K >= 1 experts and V >= 1 tokens, got {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in its last dim, got strides {logits.stride()}")
    if not isinstance(weights, Tensor) or weights.shape != (batch, num_experts):
        raise ValueError(f"weights must have shape (B, K) = {(batch, num_experts)}, got {describe(weights)}")
    if weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32, got {weights.dtype}")
    if weights.device != logits.device:
        raise ValueError(f"weights must be on the logits' device {logits.device}, got {weights.device}")
    if batch:
        w = weights.detach()
        error = (w.sum(dim=1) - 1).abs()
        # one read back: the min is NaN if any weight is, the error inf if any weight is inf
        low, worst = torch.stack([w.amin(), error.amax()]).tolist()
        if not (low >= 0 and math.isfinite(worst)):
            raise ValueError("weights must be finite and >= 0")
        if worst > WEIGHT_SUM_TOLERANCE:
            row = int(error.argmax())
            raise ValueError(f"weights rows must sum to 1 ± {WEIGHT_SUM_TOLERANCE}, row {row} sums to "
                             f"{float(w[row].sum())}")
    return logits, weights.contiguous()


def per_row(value, batch: int, device: torch.device, name: str, *, integer: bool,
            valid: tuple[Callable, Callable, str] | None = None) -> Tensor:
    """Broadcast a Python number or a (B,) tensor to a (B,) int64 (integer) or fp32 tensor on `device`.

    valid: (check of a number, elementwise check of a tensor, the requirement's words): a value that fails
    raises ValueError naming `name`. A number is checked in Python, a tensor with one reduction."""
    if isinstance(value, Tensor):
        if value.shape not in ((batch,), ()):
            raise ValueError(f"{name} must be a number or a ({batch},) tensor, got {describe(value)}")
        if integer and not is_integer(value.dtype):
            raise ValueError(f"{name} must have an integer dtype, got {value.dtype}")
        if not integer and value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got {value.dtype}")
        out = value.detach().to(device=device, dtype=torch.int64 if integer else torch.float32)
        out = out.expand(batch).contiguous()
        if valid is not None and batch:
            bad = ~valid[1](out)
            if bool(bad.any()):
                raise ValueError(f"{name} must be {valid[2]}, got {_first_bad(out, bad)}")
        return out
    allowed = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, allowed):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} or a ({batch},) tensor, got {value!r}")
    if integer and not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    if valid is not None and not valid[0](value):
        raise ValueError(f"{name} must be {valid[2]}, got {value}")
    return torch.full((batch,), value, dtype=torch.int64 if integer else torch.float32, device=device)


# (check of a number, check of a tensor, requirement) for per_row
VALID_TEMPERATURE = (lambda t: math.isfinite(t) and t >= 0, lambda t: torch.isfinite(t) & (t >= 0),
                     "finite and >= 0")
VALID_TOP_P = (lambda p: 0 < p <= 1, lambda p: (p > 0) & (p <= 1), "in (0, 1]")
VALID_TOP_K = (lambda k: k >= 0, lambda k: k >= 0, ">= 0 (0 = off)")


def check_temperature(temperature, batch: int, device: torch.device) -> Tensor:
    return per_row(temperature, batch, device, "temperature", integer=False, valid=VALID_TEMPERATURE)


def validate_mix_sample_args(logits: Tensor, weights: Tensor, *, temperature, top_p, top_k, seed, offset,
                             mode: str, check_logits: bool = True) -> MixArgs:
    """Check and normalise mix_sample's arguments (see DESIGN.md); `check_logits=False` when the backend
    detects NaN/inf in active experts itself."""
    check_mode(mode)
    logits, weights = check_logits_and_weights(logits, weights)
    batch, device = logits.shape[1], logits.device
    temperature = check_temperature(temperature, batch, device)
    top_p = per_row(top_p, batch, device, "top_p", integer=False, valid=VALID_TOP_P)
    top_k = per_row(top_k, batch, device, "top_k", integer=True, valid=VALID_TOP_K)
    seed = per_row(seed, batch, device, "seed", integer=True)
    offset = per_row(offset, batch, device, "offset", integer=True)
    if check_logits:
        check_active_logits(logits, weights)
    return MixArgs(logits, weights, temperature, top_p, top_k, seed, offset, mode)


def check_tokens(tokens: Tensor, batch: int, vocab: int, device: torch.device) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.shape != (batch,):
        raise ValueError(f"tokens must be a ({batch},) tensor, got {describe(tokens)}")
    if not is_integer(tokens.dtype):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.device != device:
        raise ValueError(f"tokens must be on the logits' device {device}, got {tokens.device}")
    low, high = (int(tokens.min()), int(tokens.max())) if batch else (0, 0)
    if low < 0 or high >= vocab:
        raise ValueError(f"tokens must be in [0, {vocab}), got values from {low} to {high}")
    return tokens.to(torch.int64).contiguous()


def check_active_logits(logits: Tensor, weights: Tensor) -> None:
    """ValueError if an active (w > 0) expert row has a NaN or +inf logit or is all -inf.

    Reads only active rows: one max pass over them (NaN propagates through max); experts with no active
    row are skipped, partly active ones gather their active rows first."""
    active = weights.detach() > 0
    for k in range(logits.shape[0]):
        rows = active[:, k]
        if bool(rows.all()):
            row_max, row_ids = logits[k].amax(dim=-1), None
        elif bool(rows.any()):
            row_ids = rows.nonzero().squeeze(1)
            row_max = logits[k].index_select(0, row_ids).amax(dim=-1)
        else:
            continue
        bad = ~torch.isfinite(row_max)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise_bad_logits(first if row_ids is None else int(row_ids[first]), k)


def raise_bad_logits(row: int, expert: int) -> None:
    raise ValueError(f"logits of active expert {expert} in row {row} contain NaN or +inf, or are all -inf")


def _first_bad(values: Tensor, bad: Tensor) -> str:
    row = int(bad.nonzero()[0, 0])
    return f"{values[row].item()} in row {row}"


def is_integer(dtype: torch.dtype) -> bool:
    """Whether `dtype` holds integers (bool does not count)."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def describe(x) -> str:
    """What an argument is, for error messages: shape, dtype and device of a tensor, else its type."""
    return f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
