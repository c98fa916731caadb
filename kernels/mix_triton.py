"""Triton kernels for mix_sample and the mix_logprobs forward: one program per row, sorting-free.

mix_sample, per row b (K experts, V tokens, e bytes per logit, K_a active experts):
  pass 1  read the active experts' logits: per-expert online max / sum-exp of z_k / T
          (logit mode also those of g = Σ_k w_k z_k / T)                    K_a·V·e bytes
  pass 2  read them again, write π (fp32) to a (B, V) scratch row, track argmax   K_a·V·e + 4V
  top-k   if 0 < top_k < V: k-ary search of the threshold                  ≈ 8 passes · 4V
  top-p   if top_p < 1: k-ary search of the threshold within the top-k set  ≈ 8 passes · 4V
  draw    inverse CDF in vocabulary order over the kept π, stops at the token  ≤ 4V
Greedy rows (T = 0) stop after pass 2. Experts with w_k = 0 are masked out of every load: a
predicated-off load moves no bytes, and NaN there is never read.

Why a scratch row for π rather than recomputing it from the logits in every later pass: a later pass
reads 4V bytes from scratch against K_a·V·e from the logits (12V at K_a = 3 fp32, 6V in bf16) plus
K_a exps per token; the scratch costs one 4V write. At K_a = 3, fp32, V = 32000, a truncated row
moves 2·12V + 4V + 16·4V + 4V ≈ 96V = 3.1 MB with scratch, 2·12V + 17·12V ≈ 228V = 7.3 MB without;
a plain (untruncated) row 32V against 36V. The scratch row of a running batch (B·V·4 = 8 MB at
B = 64) stays in an H100's 50 MB L2, so the search passes mostly hit L2.

The thresholds are searched on the bit patterns of π: for floats ≥ 0 the int32 bits order like the
values, so a search over [0, bits(max π) + 1] ends on the exact k-th largest value in ≤ 31 halvings;
each pass tests NUM_PIVOTS evenly spaced pivots at once (a (NUM_PIVOTS + 1)-ary search), so 30 bits
take 8 passes at NUM_PIVOTS = 16. The kept set is {v : π(v) ≥ threshold}: ties at the threshold are kept,
which is exactly "fewer than top_k tokens are strictly more probable" and "the mass strictly above
is < top_p · kept mass".

Not measured on a GPU yet (none here). One program per row leaves SMs idle when B < #SMs (132 on an
H100); splitting V across programs with a second reduction kernel is the next step there.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 1024  # tokens per tile of the logit passes
BLOCK_SEARCH = 256  # tokens per tile of the search passes (tile: BLOCK_SEARCH x NUM_PIVOTS)
NUM_PIVOTS = 16  # pivots per search pass
NUM_WARPS = 4


@triton.jit
def _online_max_sumexp(m, s, x, axis: tl.constexpr):
    """Fold tile x into a running (max, sum of exp(. - max)) along `axis`; -inf everywhere stays (−inf, 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if axis == 1:
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    else:
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    return m_new, s


@triton.jit
def _mixture_stats(row_logits, stride_k, offs_k, active, w, expert_scale, mix_scale, V,
                   LOGIT_MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: max m and log Σ exp(. - m) of each z_k · expert_scale (BLOCK_K,) and, in logit mode, of
    g = Σ_k w_k z_k · mix_scale (the geometric mixture's logits up to a constant).

    log softmax(x) is then (x - m) - log_sum: not x - lse with lse = m + log_sum rounded to one fp32, whose
    ulp is ulp(m): at a low temperature (|m| ~ 10^3 to 10^5) that rounding is 10^-4 to 10^-2 in every
    log probability, and the same relative error in π (the torch reference subtracts the max first too)."""
    m_k = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s_k = tl.zeros((BLOCK_K,), tl.float32)
    m_g = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    s_g = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _load_active(row_logits, stride_k, offs_k, active, offs, V)
        m_k, s_k = _online_max_sumexp(m_k, s_k, z * expert_scale, 1)
        if LOGIT_MODE:
            g = _geometric_logits(z, w, active, mix_scale, offs, V)
            m_g, s_g = _online_max_sumexp(m_g, s_g, g, 0)
    # inactive experts get 0 rather than -inf, so that later z - m never computes -inf - -inf
    m_k = tl.where(active, m_k, 0.0)
    log_sum_k = tl.where(active, tl.log(tl.where(active, s_k, 1.0)), 0.0)
    return m_k, log_sum_k, m_g, (tl.log(s_g) if LOGIT_MODE else s_g)


@triton.jit
def _load_active(row_logits, stride_k, offs_k, active, offs, V):
    """Logits (BLOCK_K, BLOCK) fp32 of the active experts; -inf for inactive ones (never read) and v ≥ V."""
    return tl.load(row_logits + offs_k[:, None] * stride_k + offs[None, :],
                   mask=active[:, None] & (offs < V)[None, :], other=float("-inf")).to(tl.float32)


@triton.jit
def _geometric_logits(z, w, active, mix_scale, offs, V):
    g = tl.sum(w[:, None] * tl.where(active[:, None], z, 0.0), axis=0) * mix_scale
    return tl.where(offs < V, g, float("-inf"))


@triton.jit
def _mixture_block(z, w, active, expert_scale, mix_scale, m_k, log_sum_k, m_g, log_sum_g, offs, V,
                   LOGIT_MODE: tl.constexpr):
    """π on one tile of tokens from its logits z (BLOCK_K, BLOCK); 0 outside [0, V)."""
    if LOGIT_MODE:
        p = tl.exp((_geometric_logits(z, w, active, mix_scale, offs, V) - m_g) - log_sum_g)
    else:
        log_q = (z * expert_scale - m_k[:, None]) - log_sum_k[:, None]
        p = tl.sum(tl.where(active[:, None], w[:, None] * tl.exp(log_q), 0.0), axis=0)
    return tl.where(offs < V, p, 0.0)


@triton.jit
def _token_logprob(z, w, active, expert_logp, inv_t, m_g, log_sum_g, LOGIT_MODE: tl.constexpr):
    """log π(token) from the token's logits z (BLOCK_K,); prob mode: from log softmax(z_k / T)(token)."""
    if LOGIT_MODE:
        return (tl.sum(w * tl.where(active, z, 0.0), axis=0) * inv_t - m_g) - log_sum_g
    terms = tl.where(active, expert_logp + tl.log(tl.where(active, w, 1.0)), float("-inf"))
    top = tl.max(terms, axis=0)
    return top + tl.log(tl.sum(tl.exp(terms - top), axis=0))


@triton.jit
def _threshold_search(row_scratch, V, lo, lo_mass, hi, target, BY_COUNT: tl.constexpr,
                      BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    """Largest bit pattern c in [lo, hi) with stat(c) >= target, and mass(c) = Σ_{π ≥ c} π.

    stat is count(π ≥ c) (BY_COUNT) or mass(c); it does not increase with c. Needs stat(lo) >= target,
    mass(lo) == lo_mass and stat(hi) < target."""
    j = tl.arange(0, PIVOTS).to(tl.int64) + 1
    while hi - lo > 1:
        pivots = lo + ((hi - lo).to(tl.int64) * j // (PIVOTS + 1)).to(tl.int32)
        pivot_values = pivots.to(tl.float32, bitcast=True)
        count = tl.zeros((PIVOTS,), tl.float32)
        mass = tl.zeros((PIVOTS,), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            p = tl.load(row_scratch + offs, mask=offs < V, other=-1.0)
            above = p[:, None] >= pivot_values[None, :]
            count += tl.sum(above.to(tl.float32), axis=0)
            mass += tl.sum(tl.where(above, p[:, None], 0.0), axis=0)
        reached = (count if BY_COUNT else mass) >= target
        lo_mass = tl.minimum(lo_mass, tl.min(tl.where(reached, mass, float("inf")), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(reached, hi, pivots), axis=0))
        lo = tl.maximum(lo, tl.max(tl.where(reached, pivots, lo), axis=0))
    return lo, lo_mass


@triton.jit
def _draw(row_scratch, V, threshold, target, BLOCK: tl.constexpr):
    """First token in vocabulary order whose running kept mass exceeds target (else the last kept one)."""
    token = tl.program_id(0).to(tl.int64) * 0 - 1
    last_kept = token
    running = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    start = 0
    while (start < V) & (token < 0):
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(row_scratch + offs, mask=offs < V, other=-1.0)
        kept = p >= threshold
        x = tl.where(kept, p, 0.0)
        crossed = kept & (tl.cumsum(x, axis=0) + running > target)
        first = tl.min(tl.where(crossed, offs, V), axis=0)
        token = tl.where(first < V, first.to(tl.int64), token)
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept & (p > 0), offs, -1), axis=0).to(tl.int64))
        running += tl.sum(x, axis=0)
        start += BLOCK
    return tl.where(token < 0, last_kept, token)


@triton.jit
def mix_sample_kernel(
    logits_ptr, stride_k, stride_b, weights_ptr, temperature_ptr, top_p_ptr, top_k_ptr, seed_ptr,
    offset_ptr, scratch_ptr, tokens_ptr, logprobs_ptr, expert_logprobs_ptr, V,
    K: tl.constexpr, LOGIT_MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_SEARCH: tl.constexpr, PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_b
    row_scratch = scratch_ptr + row * V
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # (K - 1) · stride_k passes 2^31 at K = 3, B·V ≥ 2^30
    w = tl.load(weights_ptr + row * K + offs_k, mask=offs_k < K, other=0.0)
    active = w > 0
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)

    m_k, log_sum_k, m_g, log_sum_g = _mixture_stats(row_logits, stride_k, offs_k, active, w, inv_t, inv_t, V,
                                                    LOGIT_MODE, BLOCK_K, BLOCK)

    best = tl.max(tl.full((BLOCK,), -1.0, tl.float32), axis=0)
    best_token = row * 0
    total = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _load_active(row_logits, stride_k, offs_k, active, offs, V)
        p = _mixture_block(z, w, active, inv_t, inv_t, m_k, log_sum_k, m_g, log_sum_g, offs, V, LOGIT_MODE)
        tl.store(row_scratch + offs, p, mask=offs < tl.where(temperature > 0, V, 0))
        block_best = tl.max(p, axis=0)
        block_token = tl.argmax(p, axis=0).to(tl.int64) + start  # lowest index among ties
        best_token = tl.where(block_best > best, block_token, best_token)
        best = tl.maximum(best, block_best)
        total += tl.sum(p, axis=0)

    token = best_token
    if temperature > 0:
        # other threads of this program wrote the scratch row: make their stores visible (bar.sync)
        tl.debug_barrier()
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        threshold = best.to(tl.int32, bitcast=True) * 0  # bits of 0.0: every token kept
        kept_mass = total
        above_max = best.to(tl.int32, bitcast=True) + 1
        if (top_k > 0) & (top_k < V):
            threshold, kept_mass = _threshold_search(row_scratch, V, threshold, kept_mass, above_max,
                                                     top_k.to(tl.float32), True, BLOCK_SEARCH, PIVOTS)
        if top_p < 1:
            threshold, kept_mass = _threshold_search(row_scratch, V, threshold, kept_mass, above_max,
                                                     top_p * kept_mass, False, BLOCK_SEARCH, PIVOTS)
        u = tl.rand(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
        token = _draw(row_scratch, V, threshold.to(tl.float32, bitcast=True), u * kept_mass, BLOCK)

    z = tl.load(row_logits + offs_k * stride_k + token, mask=active, other=float("-inf")).to(tl.float32)
    expert_logp = tl.where(active, (z * inv_t - m_k) - log_sum_k, float("-inf"))
    logp = _token_logprob(z, w, active, expert_logp, inv_t, m_g, log_sum_g, LOGIT_MODE)
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, logp)
    tl.store(expert_logprobs_ptr + row * K + offs_k, expert_logp, mask=offs_k < K)


def mix_sample_triton(logits: Tensor, weights: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                      seed: Tensor, offset: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """mix_sample on validated inputs (kernels/validate.py).

    Returns (tokens int64 (B,), logprobs fp32 (B,), expert_logprobs fp32 (B, K))."""
    num_experts, batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    expert_logprobs = torch.empty(batch, num_experts, dtype=torch.float32, device=device)
    if batch == 0:
        return tokens, logprobs, expert_logprobs
    scratch = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    mix_sample_kernel[(batch,)](
        logits, logits.stride(0), logits.stride(1), weights, temperature, top_p, top_k, seed, offset,
        scratch, tokens, logprobs, expert_logprobs, vocab,
        K=num_experts, LOGIT_MODE=mode == "logit", BLOCK_K=triton.next_power_of_2(num_experts),
        BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), BLOCK_SEARCH=BLOCK_SEARCH, PIVOTS=NUM_PIVOTS,
        num_warps=NUM_WARPS,
    )
    return tokens, logprobs, expert_logprobs


@triton.jit
def mix_logprobs_kernel(
    logits_ptr, stride_k, stride_b, weights_ptr, tokens_ptr, temperature_ptr, logp_ptr, token_logp_ptr,
    mean_logp_ptr, V, K: tl.constexpr, LOGIT_MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_b
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # (K - 1) · stride_k passes 2^31 at K = 3, B·V ≥ 2^30
    w = tl.load(weights_ptr + row * K + offs_k, mask=offs_k < K, other=0.0)
    active = w > 0
    temperature = tl.load(temperature_ptr + row)
    inv_t = 1.0 / tl.where(temperature > 0, temperature, 1.0)
    # the distributions that are mixed: softmax(z_k / T) in prob mode, softmax(z_k) in logit mode
    expert_scale = 1.0 if LOGIT_MODE else inv_t
    m_k, log_sum_k, m_g, log_sum_g = _mixture_stats(row_logits, stride_k, offs_k, active, w, expert_scale,
                                                    inv_t, V, LOGIT_MODE, BLOCK_K, BLOCK)
    token = tl.load(tokens_ptr + row)
    z = tl.load(row_logits + offs_k * stride_k + token, mask=active, other=float("-inf")).to(tl.float32)
    token_logp = tl.where(active, (z * expert_scale - m_k) - log_sum_k, float("-inf"))
    logp = _token_logprob(z, w, active, token_logp, inv_t, m_g, log_sum_g, LOGIT_MODE)
    mean_logp = tl.zeros((BLOCK_K,), tl.float32)
    if LOGIT_MODE:
        # E_π[log_softmax(z_k)] (expert_scale is 1)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tile = _load_active(row_logits, stride_k, offs_k, active, offs, V)
            p = _mixture_block(tile, w, active, expert_scale, inv_t, m_k, log_sum_k, m_g, log_sum_g, offs, V,
                               LOGIT_MODE)
            log_q = (tile - m_k[:, None]) - log_sum_k[:, None]
            mean_logp += tl.sum(p[None, :] * tl.where((p > 0)[None, :] & active[:, None], log_q, 0.0), axis=1)
        mean_logp = tl.where(active, mean_logp, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(token_logp_ptr + row * K + offs_k, token_logp, mask=offs_k < K)
    tl.store(mean_logp_ptr + row * K + offs_k, mean_logp, mask=offs_k < K)


def mix_logprobs_triton(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor,
                        mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of mix_logprobs on validated inputs, with what its backward needs.

    Returns (logp (N,), token_logp (N, K), mean_logp (N, K)), fp32, with T = 1 where temperature is 0:
      logp        log π(token) of the untruncated tempered mixture
      token_logp  log q_k(token) of each mixed distribution q_k: softmax(z_k / T) in prob mode,
                  softmax(z_k) in logit mode; -inf where w_k = 0
      mean_logp   logit mode: E_π[log softmax(z_k)]; 0 in prob mode and where w_k = 0
    so that d logp / d w_k = exp(token_logp_k - logp) (prob) or (token_logp_k - mean_logp_k) / T (logit).
    """
    num_experts, batch, vocab = logits.shape
    device = logits.device
    logp = torch.empty(batch, dtype=torch.float32, device=device)
    token_logp = torch.empty(batch, num_experts, dtype=torch.float32, device=device)
    mean_logp = torch.empty(batch, num_experts, dtype=torch.float32, device=device)
    if batch == 0:
        return logp, token_logp, mean_logp
    mix_logprobs_kernel[(batch,)](
        logits, logits.stride(0), logits.stride(1), weights, tokens, temperature, logp, token_logp, mean_logp,
        vocab, K=num_experts, LOGIT_MODE=mode == "logit", BLOCK_K=triton.next_power_of_2(num_experts),
        BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=NUM_WARPS,
    )
    return logp, token_logp, mean_logp
