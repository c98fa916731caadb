"""mix_sample: every backend against the torch reference, exact distributions, invariances, bad inputs.

The Triton backend runs in the interpreter here (~0.1 s per program at V = 16, ~0.6 s per row at
V = 3000), so it gets few rows and V < 3000; its draw is checked by exact inverse CDFs at known uniforms
instead of 20,000 draws.
"""

import importlib.util
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.kernels import MixSample, cpp_build, mix_logprobs, mix_sample
from mope.kernels.mix_reference import mix_sample_reference
from mope.kernels.philox import philox_uniform
from mope.kernels.validate import validate_mix_sample_args

from tests.helpers import run_python

mix_sample_module = importlib.import_module("mope.kernels.mix_sample")
BACKENDS = ["torch", "cpu", "triton"]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
# logprobs are computed in fp32 from the same (upcast) logits by every backend: the tolerance covers
# exp/log rounding over V terms, not the input dtype.
TOLERANCE = dict.fromkeys((torch.float32, torch.bfloat16, torch.float16), dict(atol=2e-4, rtol=1e-4))


def random_case(num_experts: int, batch: int, vocab: int, dtype: torch.dtype, seed: int) -> dict:
    """Fresh random logits (some tokens masked to -inf), per-row weights with random inactive experts,
    and per-row mixes of temperature (incl. greedy), top_p (incl. 1) and top_k (incl. off, 1, > V)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_experts, batch, vocab, generator=g) * 3
    logits[:, ::3, ::7] = float("-inf")
    active = torch.rand(batch, num_experts, generator=g) > 0.4
    active[:, 0] |= ~active.any(dim=1)
    weights = torch.rand(batch, num_experts, generator=g) * active
    rows = torch.arange(batch)
    return dict(
        logits=logits.to(dtype),
        weights=weights / weights.sum(dim=1, keepdim=True),
        temperature=torch.tensor([1.0, 0.0, 0.7, 1.5])[rows % 4],
        top_p=torch.tensor([1.0, 0.9, 0.5])[rows % 3],
        top_k=torch.tensor([0, 0, 7, vocab + 5, 1])[rows % 5],
        seed=torch.randint(-(2**62), 2**62, (batch,), generator=g),
        offset=torch.randint(0, 2**40, (batch,), generator=g),
    )


def run(case: dict, backend: str, mode: str) -> MixSample:
    return mix_sample(case["logits"], case["weights"], temperature=case["temperature"],
                      top_p=case["top_p"], top_k=case["top_k"], seed=case["seed"], offset=case["offset"],
                      mode=mode, backend=backend)


def reference(case: dict, mode: str) -> tuple:
    args = validate_mix_sample_args(case["logits"], case["weights"], temperature=case["temperature"],
                                    top_p=case["top_p"], top_k=case["top_k"], seed=case["seed"],
                                    offset=case["offset"], mode=mode)
    return mix_sample_reference(*args)


def assert_matches_reference(out: MixSample, expected: tuple, dtype: torch.dtype) -> None:
    tokens, logprobs, expert_logprobs = expected
    # Exact: all backends draw u from the same Philox stream and apply the same inverse CDF; a float
    # rounding flip needs u * mass within ~1e-7 of a CDF boundary (about 1e-6 per row), so none is allowed.
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logprobs, logprobs, **TOLERANCE[dtype])
    torch.testing.assert_close(out.expert_logprobs, expert_logprobs, **TOLERANCE[dtype])


CPU_GRID = [(mode, dtype, k) for mode in ("prob", "logit") for dtype in (torch.float32, torch.bfloat16)
            for k in (1, 2, 3, 6)]
# Every mode, dtype and K at least once, in five interpreter launches.
TRITON_GRID = [("prob", torch.float32, 3), ("logit", torch.bfloat16, 6), ("prob", torch.bfloat16, 1),
               ("logit", torch.float32, 2), ("prob", torch.float16, 2)]


@pytest.mark.parametrize(("backend", "mode", "dtype", "num_experts"),
                         [("cpu", *c) for c in CPU_GRID] + [("triton", *c) for c in TRITON_GRID])
def test_backend_matches_reference(backend, mode, dtype, num_experts):
    batch, vocab = (6, 1500) if backend == "triton" else (24, 2999)  # V not a multiple of any block
    case = random_case(num_experts, batch, vocab, dtype, seed=num_experts * 10 + len(mode))
    out = run(case, backend, mode)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert out.expert_logprobs.shape == (batch, num_experts)
    assert_matches_reference(out, reference(case, mode), dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_experts=st.integers(1, 4), batch=st.integers(1, 5), vocab=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       mode=st.sampled_from(["prob", "logit"]), seed=st.integers(0, 2**31))
def test_cpu_matches_reference_on_random_shapes(num_experts, batch, vocab, dtype, mode, seed):
    case = random_case(num_experts, batch, vocab, dtype, seed)
    case["logits"][..., 0] = 0.0  # keep a finite logit in every row (every 7th token is -inf)
    assert_matches_reference(run(case, "cpu", mode), reference(case, mode), torch.float32)


def exact_truncated_mixture(logits: torch.Tensor, weights: torch.Tensor, temperature: float, top_p: float,
                            top_k: int, mode: str) -> tuple[torch.Tensor, float]:
    """The kept distribution of one row in float64, written from the definition (independent of the
    kernels), and the smallest distance of a top-p decision from its boundary."""
    z = logits.double()
    if mode == "prob":
        pi = sum(w * torch.softmax(z[k] / temperature, -1) for k, w in enumerate(weights.double()))
    else:
        pi = torch.softmax(sum(w * torch.log_softmax(z[k], -1) for k, w in enumerate(weights.double()))
                           / temperature, -1)
    greater_count = (pi[None, :] > pi[:, None]).sum(dim=1)
    kept = torch.where(greater_count < top_k, pi, 0.0) if top_k > 0 else pi
    mass_above = (kept[None, :] * (kept[None, :] > kept[:, None])).sum(dim=1)
    keep = (mass_above < top_p * kept.sum()) & (kept > 0)
    margin = (mass_above[kept > 0] - top_p * kept.sum()).abs().min().item()
    kept = torch.where(keep, kept, 0.0)
    return kept / kept.sum(), margin


STAT_CONFIGS = [(0.8, 0.9, 7), (1.3, 1.0, 0)]  # (temperature, top_p, top_k): both truncations bind; none


def threshold_search_case() -> dict:
    """Rows whose truncation takes each path of the C++ threshold search: a guess that closes the bracket
    (its pass collects the candidates), guesses that miss (bisection, then a collecting pass), a row whose
    whole vocabulary is left in the last bracket, large and tiny top_k, both truncations. That row's logits
    take 8 levels 1e-3 apart: its many near-equal probabilities are exact ties (equal logits), not
    orderings that one ulp of rounding could flip against the reference."""
    g = torch.Generator().manual_seed(11)
    scales = torch.tensor([2.0, 8.0, 0.0, 1.0, 2.0, 8.0])
    rows = len(scales)
    logits = torch.randn(3, rows, 4001, generator=g) * scales[None, :, None]
    logits[:, 2] = torch.randint(0, 8, (3, 4001), generator=g) * 1e-3
    return dict(logits=logits, weights=torch.softmax(torch.randn(rows, 3, generator=g), dim=-1),
                temperature=torch.ones(rows), top_p=torch.tensor([0.9, 0.3, 0.5, 1.0, 0.95, 1.0]),
                top_k=torch.tensor([0, 0, 0, 1000, 500, 3]), seed=torch.arange(rows),
                offset=torch.zeros(rows, dtype=torch.long))


def test_cpu_threshold_search_paths_match_reference():
    case = threshold_search_case()
    for mode in ("prob", "logit"):
        assert_matches_reference(run(case, "cpu", mode), reference(case, mode), torch.float32)


def test_cpu_portable_exp_path_matches_reference():
    """The C++ kernel's exps and threshold probes run in AVX-512 where the CPU has it; MOPE_DISABLE_AVX512=1
    takes the portable (compiler-vectorised) paths, which must give the same answers. A fresh process: the
    choice is made at load time."""
    script = (
        "from tests.test_mix_sample import *\n"
        "for mode in ('prob', 'logit'):\n"
        "    for seed, dtype in ((1, torch.float32), (2, torch.bfloat16)):\n"
        "        case = random_case(3, 9, 1003, dtype, seed)\n"
        "        assert_matches_reference(run(case, 'cpu', mode), reference(case, mode), dtype)\n"
        "test_cpu_threshold_search_paths_match_reference()\n"
    )
    run_python(["-c", script], env={"MOPE_DISABLE_AVX512": "1"})


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(("temperature", "top_p", "top_k"), STAT_CONFIGS)
def test_draws_follow_the_exact_truncated_mixture(backend, mode, temperature, top_p, top_k):
    draws, vocab = 20_000, 16
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1, vocab, generator=g) * 1.5
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    expected, margin = exact_truncated_mixture(logits[:, 0], weights[0], temperature, top_p, top_k, mode)
    assert margin > 1e-3  # the test's own truncation is far from float rounding
    out = mix_sample(logits.expand(3, draws, vocab), weights.expand(draws, 3), temperature=temperature,
                     top_p=top_p, top_k=top_k, seed=12345, offset=torch.arange(draws), mode=mode,
                     backend=backend)
    counts = torch.bincount(out.tokens, minlength=vocab).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a truncated token was drawn"
    chi2 = (((counts - draws * expected)[kept]) ** 2 / (draws * expected[kept])).sum()
    dof = int(kept.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-4, f"chi2 {chi2.item():.1f} with {dof} dof"  # a correct sampler fails 1 in 10^4


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_triton_draw_is_the_exact_inverse_cdf(mode):
    # 20,000 interpreted draws would take an hour: instead check the map u -> token exactly, at uniforms
    # (tl.rand, bit-exact with philox_uniform) spread over [0, 1). With u uniform this is the distribution.
    vocab, rows, temperature, top_p, top_k = 16, 12, 0.8, 0.9, 7
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1, vocab, generator=g) * 1.5
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    expected, _ = exact_truncated_mixture(logits[:, 0], weights[0], temperature, top_p, top_k, mode)
    offset = torch.arange(rows) * 7919
    u = philox_uniform(torch.full((rows,), 3), offset).double()
    cdf = expected.cumsum(0)
    boundary_distance = (u[:, None] - cdf[None, :]).abs().min().item()
    assert boundary_distance > 1e-5
    out = mix_sample(logits.expand(3, rows, vocab), weights.expand(rows, 3), temperature=temperature,
                     top_p=top_p, top_k=top_k, seed=3, offset=offset, mode=mode, backend="triton")
    assert torch.equal(out.tokens, torch.searchsorted(cdf, u, right=True))


# ---- Property-based fuzzing (hypothesis) of the Triton kernel (interpreter) against the torch reference ----
@st.composite
def fuzz_mix_case(draw) -> dict:
    """K = 1..4 with inactive experts (w = 0, logits NaN), V below, at and past the kernel's tiles (search
    256, logit passes 1024), Gaussian / few-level (ties) / flat / one-peak logits with -inf masks (one token
    stays finite in every expert, so logit mode is defined), fp32/bf16/fp16; per row greedy and extreme
    temperatures, top_p near 0 and 1, top_k 1, 2, V - 1, V, > V, seed and offset over int64. Temperatures
    stay >= 0.05: below, the kernel's z · (1 / T) and the reference's z / T differ by ulp(max |z| / T)."""
    num_experts, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([1, 2, 17, 255, 257, 1025]) | st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["randn", "ties", "flat", "peak"]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    shape = (num_experts, batch, vocab)
    if kind == "ties":
        logits = torch.randint(0, 4, shape, generator=g).float() * scale
    else:
        logits = torch.randn(shape, generator=g) * (0.0 if kind == "flat" else scale)
    if kind == "peak":
        logits[..., draw(st.integers(0, vocab - 1))] += 30.0
    masked = torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9]))
    masked[..., draw(st.integers(0, vocab - 1))] = False
    logits[masked] = float("-inf")
    active = torch.rand(batch, num_experts, generator=g) < draw(st.sampled_from([1.0, 0.6]))
    active[:, draw(st.integers(0, num_experts - 1))] = True
    weights = (torch.rand(batch, num_experts, generator=g) + 0.01) * active
    logits = logits.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    logits[~active.T] = float("nan")  # never read

    def per_row(values):
        return torch.tensor([draw(values) for _ in range(batch)])

    return dict(
        logits=logits, weights=weights / weights.sum(dim=1, keepdim=True),
        temperature=per_row(st.sampled_from([0.0, 0.05, 0.7, 1.0, 50.0, 1e4])),
        top_p=per_row(st.sampled_from([1.0, 0.99999994, 0.9, 0.3, 1e-6])),
        top_k=per_row(st.sampled_from([0, 1, 2, 5, max(vocab - 1, 1), vocab, vocab + 1])),
        seed=per_row(st.integers(-(2**63), 2**63 - 1)), offset=per_row(st.integers(0, 2**63 - 1)),
    )


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_mix_case(), mode=st.sampled_from(["prob", "logit"]))
def test_fuzz_triton_matches_reference(case, mode):
    assert_matches_reference(run(case, "triton", mode), reference(case, mode), torch.float32)


def test_triton_log_probabilities_of_tied_maxima_at_a_low_temperature():
    """Found by the fuzzing: the kernel folded each max and log-sum-exp into one fp32 lse = m + log Σ, whose
    ulp at m = 0.3 / 1e-6 is 0.03: the six tied tokens' log π came out 1e-2 off -log 6. Now (x - m) - log Σ.
    """
    logits = torch.zeros(2, 1, 16)
    logits[:, 0, [1, 4, 6, 9, 11, 14]] = 0.3
    zero = torch.zeros(1, dtype=torch.long)
    case = dict(logits=logits, weights=torch.tensor([[0.5, 0.5]]), temperature=torch.tensor([1e-6]),
                top_p=torch.ones(1), top_k=zero, seed=zero, offset=zero)
    for mode in ("prob", "logit"):
        out = run(case, "triton", mode)
        assert_matches_reference(out, reference(case, mode), torch.float32)
        torch.testing.assert_close(out.logprobs, torch.tensor([-math.log(6)]), atol=1e-6, rtol=0)


def test_triton_reads_experts_past_an_int32_offset():
    """The offset of expert k's logits, k · stride_k, was int32 (tl.arange times a stride that fits int32):
    with K = 3 it wrapped once B·V >= 2^30, e.g. mix_logprobs over 8k rows of a 152k vocabulary. Here
    stride_k = 2^31 - 2^20 (fp16) in 8.6 GB of reserved address space, of which a few pages are touched."""
    vocab, stride_k, pad = 100, 2**31 - 2**20, 2**22  # a wrapped read (2 · stride_k - 2^32) lands in the pad
    try:
        buffer = torch.empty(pad + 2 * stride_k + 2 * vocab, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 8.6 GB of address space")
    logits = buffer.as_strided((3, 2, vocab), (stride_k, vocab, 1), pad)
    compact = (torch.randn(3, 2, vocab, generator=torch.Generator().manual_seed(0)) * 3).half()
    logits.copy_(compact)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    kwargs = dict(temperature=1.0, top_p=0.9, top_k=0, seed=1, offset=0, mode="logit", backend="triton")
    strided, expected = mix_sample(logits, weights, **kwargs), mix_sample(compact, weights, **kwargs)
    assert torch.equal(strided.tokens, expected.tokens) and torch.equal(strided.logprobs, expected.logprobs)
    assert torch.equal(strided.expert_logprobs, expected.expert_logprobs)
    for mode in ("prob", "logit"):
        got, want = (mix_logprobs(x, weights, expected.tokens, mode=mode, backend="triton")
                     for x in (logits, compact))
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_and_determinism(backend):
    batch, vocab = (3, 700) if backend == "triton" else (12, 1000)
    case = random_case(3, batch, vocab, torch.float32, seed=5)
    together = run(case, backend, "prob")
    again = run(case, backend, "prob")
    assert torch.equal(together.tokens, again.tokens) and torch.equal(together.logprobs, again.logprobs)
    for b in range(batch):
        alone = {key: value[:, b:b + 1] if key == "logits" else value[b:b + 1] for key, value in case.items()}
        out = run(alone, backend, "prob")
        assert torch.equal(out.tokens, together.tokens[b:b + 1])
        assert torch.equal(out.logprobs, together.logprobs[b:b + 1])
        assert torch.equal(out.expert_logprobs, together.expert_logprobs[b:b + 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_and_seed_select_the_stream(backend):
    batch, vocab = (4, 64) if backend == "triton" else (64, 64)
    logits = torch.zeros(1, batch, vocab)  # uniform: the token is floor(u * V)
    weights = torch.ones(batch, 1)
    kwargs = dict(temperature=1.0, top_p=1.0, top_k=0, backend=backend)
    offset = torch.arange(batch)
    tokens = mix_sample(logits, weights, seed=1, offset=offset, **kwargs).tokens
    u = philox_uniform(torch.ones(batch, dtype=torch.int64), offset).double()
    assert torch.equal(tokens, (u * vocab).long())
    assert not torch.equal(tokens, mix_sample(logits, weights, seed=2, offset=offset, **kwargs).tokens)


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_expert_with_nan_logits_changes_nothing(backend, mode):
    batch, vocab = (3, 500) if backend == "triton" else (16, 1000)
    case = random_case(3, batch, vocab, torch.float32, seed=9)
    weights = case["weights"]
    weights[:, 2] = 0.0  # expert 2 is off everywhere, expert 1 in some rows
    weights[::2, 1] = 0.0
    weights[:, 0] += 1e-3
    case["weights"] = weights / weights.sum(dim=1, keepdim=True)
    clean = run(case, backend, mode)
    case["logits"][2] = float("nan")
    case["logits"][1, ::2] = float("nan")
    poisoned = run(case, backend, mode)
    assert torch.equal(poisoned.tokens, clean.tokens)
    assert torch.equal(poisoned.logprobs, clean.logprobs)
    assert torch.equal(poisoned.expert_logprobs, clean.expert_logprobs)
    assert bool(torch.isneginf(poisoned.expert_logprobs[:, 2]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_an_active_expert_raises(backend):
    case = random_case(2, 3, 100, torch.float32, seed=1)
    case["weights"] = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    case["logits"][1, 2, 17] = float("nan")
    with pytest.raises(ValueError, match="logits of active expert 1 in row 2"):
        run(case, backend, "prob")
    case["logits"][1, 2, 17] = float("inf")
    with pytest.raises(ValueError, match="logits"):
        run(case, backend, "logit")


def test_greedy_is_the_argmax_of_the_untempered_mixture_lowest_index_on_ties():
    logits = torch.full((2, 2, 6), -5.0)
    logits[:, :, 2] = logits[:, :, 4] = 3.0  # tie between tokens 2 and 4 in both experts
    logits[1, 1, 5] = 9.0  # row 1: expert 1 is sure of token 5
    weights = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    for backend in BACKENDS:
        out = mix_sample(logits, weights, temperature=0.0, top_p=0.1, top_k=3, seed=0, offset=0,
                         backend=backend)
        assert out.tokens.tolist() == [2, 5], backend
        pi = 0.2 * torch.softmax(logits[0, 1].double(), -1) + 0.8 * torch.softmax(logits[1, 1].double(), -1)
        assert math.isclose(out.logprobs[1].item(), math.log(pi[5].item()), rel_tol=1e-5)


def test_top_k_keeps_ties_and_top_p_keeps_the_smallest_reaching_set():
    # pi = (.1, .4, .1, .3, .1), 400 draws: top_k = 2 keeps {1, 3}; top_k = 3 keeps all (the .1s tie at the
    # boundary); top_p = .45 keeps {1, 3} (mass above 3 is .4 < .45, above a .1 it is .7).
    pi = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    rows = 400
    logits = pi.log().expand(1, rows, 5).contiguous()
    weights = torch.ones(rows, 1)
    for backend in ("torch", "cpu"):
        top_k2 = mix_sample(logits, weights, temperature=1.0, top_p=1.0, top_k=2, seed=4,
                            offset=torch.arange(rows), backend=backend).tokens
        assert set(top_k2.tolist()) == {1, 3}
        top_k3 = mix_sample(logits, weights, temperature=1.0, top_p=1.0, top_k=3, seed=4,
                            offset=torch.arange(rows), backend=backend).tokens
        assert set(top_k3.tolist()) == {0, 1, 2, 3, 4}
        top_p = mix_sample(logits, weights, temperature=1.0, top_p=0.45, top_k=0, seed=4,
                           offset=torch.arange(rows), backend=backend).tokens
        assert set(top_p.tolist()) == {1, 3}


BAD_INPUTS = [
    (dict(logits=torch.zeros(2, 3)), "logits"),
    (dict(logits=torch.zeros(2, 3, 4, dtype=torch.float64)), "logits"),
    (dict(logits=torch.zeros(2, 4, 3).transpose(1, 2)), "logits"),
    (dict(weights=torch.full((3, 3), 1 / 3)), "weights"),
    (dict(weights=torch.full((3, 2), 0.5, dtype=torch.float64)), "weights"),
    (dict(weights=torch.tensor([[1.2, -0.2]] * 3)), "weights"),
    (dict(weights=torch.tensor([[0.5, 0.4]] * 3)), "weights"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=torch.tensor([1.0, float("nan"), 1.0])), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=torch.ones(4)), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(offset=2**64), "offset"),
    (dict(mode="mean"), "mode"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize(("override", "name"), BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_argument(override, name):
    kwargs = dict(logits=torch.zeros(2, 3, 4), weights=torch.full((3, 2), 0.5), temperature=1.0, top_p=1.0,
                  top_k=0, seed=0, offset=0, mode="prob", backend="cpu")
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        mix_sample(kwargs.pop("logits"), kwargs.pop("weights"), **kwargs)


def test_auto_falls_back_to_torch_when_cpp_cannot_be_built(monkeypatch):
    monkeypatch.setattr(mix_sample_module, "cpu_module", lambda: None)
    assert mix_sample_module.resolve_backend("auto", torch.device("cpu")) == "torch"
    case = random_case(2, 4, 50, torch.float32, seed=2)
    assert_matches_reference(run(case, "auto", "prob"), reference(case, "prob"), torch.float32)


def test_load_cpp_warns_once_and_returns_none_on_a_compile_error(monkeypatch, tmp_path):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    files = cpp_build.importlib.resources.files  # only our package's files move: torch reads its own
    monkeypatch.setattr(cpp_build.importlib.resources, "files",
                        lambda package: tmp_path if package == "mope.csrc" else files(package))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    cpp_build.load_cpp.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="'broken' could not be built"):
            assert cpp_build.load_cpp("broken") is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpp_build.load_cpp("broken") is None  # cached: no second build, no second warning
        with pytest.raises(FileNotFoundError, match="missing"):
            cpp_build.load_cpp("missing")
    finally:
        cpp_build.load_cpp.cache_clear()
