"""mix_logprobs: values and weight gradients of every backend against autograd through the torch reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.kernels import mix_logprobs, mix_sample
from mope.kernels.mix_reference import mix_logprobs_forward_reference, mix_logprobs_reference

from tests.test_mix_sample import fuzz_mix_case, reference

BACKENDS = ["torch", "cpu", "triton"]
TOLERANCE = dict.fromkeys((torch.float32, torch.bfloat16, torch.float16), dict(atol=1e-4, rtol=1e-4))


def random_inputs(num_experts: int, batch: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_experts, batch, vocab, generator=g) * 2
    logits[:, :, 1::9] = float("-inf")  # masked tokens: never the target, 0 * -inf must not leak
    weights = torch.rand(batch, num_experts, generator=g)
    weights[0, -1] = 0.0  # an inactive expert (in row 0 only, when K > 1)
    weights[0, 0] += 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    tokens = torch.randint(0, vocab // 9, (batch,), generator=g) * 9  # never a masked token
    temperature = torch.tensor([1.0, 0.0, 0.6, 1.7])[torch.arange(batch) % 4]
    return logits.to(dtype), weights, tokens, temperature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_autograd_through_the_reference(backend, mode, dtype):
    batch, vocab = (4, 1000) if backend == "triton" else (12, 3001)
    logits, weights, tokens, temperature = random_inputs(3, batch, vocab, dtype, seed=len(mode))
    grad_out = torch.randn(batch, generator=torch.Generator().manual_seed(1))

    # Autograd through the reference meets 0 * (-inf) = NaN at masked tokens in logit mode; -1e4 gives the
    # same probabilities (exp underflows to exactly 0) with finite gradients.
    finite_logits = logits.masked_fill(logits == float("-inf"), -1e4)
    reference_weights = weights.clone().requires_grad_()
    expected = mix_logprobs_reference(finite_logits, reference_weights, tokens, temperature, mode)
    (expected * grad_out).sum().backward()

    ours_weights = weights.clone().requires_grad_()
    got = mix_logprobs(logits, ours_weights, tokens, temperature=temperature, mode=mode, backend=backend)
    (got * grad_out).sum().backward()

    torch.testing.assert_close(got, expected.detach(), **TOLERANCE[dtype])
    torch.testing.assert_close(ours_weights.grad, reference_weights.grad, **TOLERANCE[dtype])
    assert ours_weights.grad[0, -1] == 0.0  # the inactive expert is not in the mixture


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_whose_mixture_probability_underflows_fp32_keeps_a_finite_logprob(backend):
    # pi(token) ~ e^-125, under fp32's smallest normal (e^-87.3): log pi is still exact, as is its gradient
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 64, generator=g)
    logits[0, :, 5], logits[1, :, 5] = -120.0, -130.0
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    tokens, temperature = torch.full((3,), 5), torch.ones(3)
    log_p = torch.log_softmax(logits.double(), dim=-1)[:, torch.arange(3), tokens].T  # (B, K)
    expected = torch.logsumexp(weights.double().log() + log_p, dim=1)

    ours_weights = weights.clone().requires_grad_()
    got = mix_logprobs(logits, ours_weights, tokens, temperature=temperature, mode="prob", backend=backend)
    got.sum().backward()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-6)
    expected_grad = torch.where(weights > 0, (log_p - expected[:, None]).exp(), 0.0)  # p_k / pi, 0 if w_k = 0
    torch.testing.assert_close(ours_weights.grad.double(), expected_grad, atol=1e-6, rtol=1e-4)
    sample = mix_sample(logits, weights, temperature=0.0, top_p=1.0, top_k=0, seed=0, offset=0, mode="prob",
                        backend=backend)
    assert sample.logprobs.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_saves_no_vocabulary_sized_tensor(backend):
    batch, vocab = 3, 517
    logits, weights, tokens, temperature = random_inputs(2, batch, vocab, torch.float32, seed=3)
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    weights.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs = mix_logprobs(logits, weights, tokens, temperature=temperature, mode="logit",
                                backend=backend)
    logprobs.sum().backward()
    assert saved_shapes and all(vocab not in shape for shape in saved_shapes)


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_of_sampled_tokens_equal_mix_sample_logprobs(backend, mode):
    batch, vocab = (3, 400) if backend == "triton" else (16, 400)
    logits, weights, _, temperature = random_inputs(3, batch, vocab, torch.float32, seed=4)
    sample = mix_sample(logits, weights, temperature=temperature, top_p=0.9, top_k=0, seed=1, offset=0,
                        mode=mode, backend=backend)
    got = mix_logprobs(logits, weights, sample.tokens, temperature=temperature, mode=mode, backend=backend)
    torch.testing.assert_close(got, sample.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_of_an_inactive_expert_change_nothing(backend):
    logits, weights, tokens, temperature = random_inputs(3, 4, 300, torch.float32, seed=5)
    weights[:, 2] = 0.0
    weights = weights / weights.sum(dim=1, keepdim=True)
    clean = mix_logprobs(logits, weights, tokens, temperature=temperature, mode="logit", backend=backend)
    logits[2] = float("nan")
    poisoned = mix_logprobs(logits, weights, tokens, temperature=temperature, mode="logit", backend=backend)
    assert torch.equal(clean, poisoned)
    logits[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="logits of active expert 1 in row 2"):
        mix_logprobs(logits, weights, tokens, temperature=temperature, mode="logit", backend=backend)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_mix_case(), mode=st.sampled_from(["prob", "logit"]))
def test_fuzz_triton_matches_reference(case, mode):
    """mix_sample's fuzzed cases (tests/test_mix_sample.py) at the reference's sampled tokens. The logit-mode
    gradient (l_k(token) - E_π[l_k]) / T is compared times T: fp32 rounding of the l_k is not divided by T."""
    logits, temperature, tokens = case["logits"], case["temperature"], reference(case, mode)[0]
    expected, jacobian = mix_logprobs_forward_reference(logits, case["weights"], tokens, temperature, mode)
    weights = case["weights"].clone().requires_grad_()
    got = mix_logprobs(logits, weights, tokens, temperature=temperature, mode=mode, backend="triton")
    got.sum().backward()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    scale = torch.where(temperature > 0, temperature, 1.0)[:, None] if mode == "logit" else 1.0
    torch.testing.assert_close(weights.grad * scale, jacobian * scale, **TOLERANCE[torch.float32])


def test_triton_logit_mode_gradient_at_a_low_temperature():
    """Found by the fuzzing: π was exp(g / T - lse) with lse = m + log Σ rounded to one fp32 (ulp 6e-5 at
    m = 9 / 0.01), so π summed to 1 ± 1e-5 and E_π[l_k] / T, hence the gradient, was 1e-2 off."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (2, 2, 64), generator=g).float() * 3  # many tied maxima
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    tokens, temperature = logits[0].argmax(dim=-1), torch.full((2,), 0.01)
    expected, jacobian = mix_logprobs_forward_reference(logits, weights, tokens, temperature, "logit")
    weights.requires_grad_()
    got = mix_logprobs(logits, weights, tokens, temperature=temperature, mode="logit", backend="triton")
    got.sum().backward()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(weights.grad, jacobian, **TOLERANCE[torch.float32])


BAD_INPUTS = [
    (dict(tokens=torch.tensor([0, 1])), "tokens"),
    (dict(tokens=torch.tensor([0.0, 1.0, 2.0])), "tokens"),
    (dict(tokens=torch.tensor([0, 1, 9])), "tokens"),
    (dict(tokens=torch.tensor([0, -1, 2])), "tokens"),
    (dict(weights=torch.tensor([[0.7, 0.7]] * 3)), "weights"),
    (dict(temperature=-1.0), "temperature"),
    (dict(mode="geometric"), "mode"),
    (dict(backend="gpu"), "backend"),
]


@pytest.mark.parametrize(("override", "name"), BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_argument(override, name):
    kwargs = dict(logits=torch.zeros(2, 3, 9), weights=torch.full((3, 2), 0.5),
                  tokens=torch.tensor([0, 1, 2]), temperature=1.0, mode="prob", backend="cpu")
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        mix_logprobs(kwargs.pop("logits"), kwargs.pop("weights"), kwargs.pop("tokens"), **kwargs)
