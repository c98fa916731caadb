import math

import pytest
import torch

from mope.rebel import mixture_token_logprobs, rebel_loss, sequence_logprobs


def test_rebel_loss_matches_definition_by_hand():
    new = torch.tensor([-1.0, -2.0, -3.5, -0.5])
    old = torch.tensor([-1.5, -1.0, -3.0, -1.0])
    r = torch.tensor([0.9, 0.2, 0.4, 0.6])
    eta = 2.0
    pair0 = ((-1.0 + 1.5) - (-2.0 + 1.0) - eta * (0.9 - 0.2)) ** 2
    pair1 = ((-3.5 + 3.0) - (-0.5 + 1.0) - eta * (0.4 - 0.6)) ** 2
    assert rebel_loss(new, old, r, eta).item() == pytest.approx((pair0 + pair1) / 2, rel=1e-6)
    by_pairs = rebel_loss(new.view(2, 2), old.view(2, 2), r.view(2, 2), eta)
    assert by_pairs.item() == pytest.approx((pair0 + pair1) / 2)


def test_rebel_loss_gradient_flows_only_through_new_logp():
    new = torch.randn(6, requires_grad=True)
    old = torch.randn(6, requires_grad=True)
    r = torch.rand(6, requires_grad=True)
    rebel_loss(new, old, r, 1.0).backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert old.grad is None and r.grad is None
    # analytic gradient: d/dnew_y = 2 (delta) / P, d/dnew_y' = -2 (delta) / P
    with torch.no_grad():
        d = (new - old).view(-1, 2)
        rr = r.view(-1, 2)
        delta = d[:, 0] - d[:, 1] - (rr[:, 0] - rr[:, 1])
        expected = torch.stack([2 * delta / 3, -2 * delta / 3], 1).view(-1)
    torch.testing.assert_close(new.grad, expected)


@pytest.mark.parametrize("n, eta, match", [(3, 1.0, "pairs"), (4, 0.0, "eta"), (0, 1.0, "pairs")])
def test_rebel_loss_bad_inputs(n, eta, match):
    x = torch.zeros(n)
    with pytest.raises(ValueError, match=match):
        rebel_loss(x, x, x, eta)
    with pytest.raises(ValueError, match="one shape"):
        rebel_loss(torch.zeros(4), torch.zeros(2), torch.zeros(4), 1.0)


def test_mixture_logprob_equals_log_of_weighted_probabilities_and_masks_cleanly():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    active = torch.tensor([True, False, True])
    log_w = logits.masked_fill(~active, float("-inf")).log_softmax(-1).requires_grad_(True)
    expert_lp = torch.randn(5, 3).log_softmax(-1)
    expert_lp[:, 1] = float("-inf")
    got = mixture_token_logprobs(log_w, expert_lp)
    expected = torch.log((log_w.exp() * expert_lp.exp()).sum(-1))
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert torch.isfinite(log_w.grad).all()
    # an active expert that gives the token probability 1 while being weighted 1 gives log pi = 0
    one = mixture_token_logprobs(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, -math.inf]]))
    assert one.item() == 0.0


def test_sequence_logprobs_sums_segments():
    x = torch.arange(6, dtype=torch.float32)
    torch.testing.assert_close(sequence_logprobs(x, [1, 0, 3, 2]), torch.tensor([0.0, 0.0, 6.0, 9.0]))
    with pytest.raises(ValueError, match="lengths sum"):
        sequence_logprobs(x, [1, 2])
