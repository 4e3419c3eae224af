"""d3po_loss on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlplat.algos.d3po import d3po_loss


def test_equal_to_reference_gives_log_2():
    logp = torch.tensor([-3.0, 0.5, 10.0])
    loss = d3po_loss(logp, logp.clone(), logp - 1.0, logp - 1.0)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))


def test_inside_the_band_matches_hand_computation():
    # rho_w = exp(0.05), rho_l = exp(-0.02): both inside [0.9, 1.1].
    logp_w = torch.tensor([0.05], requires_grad=True)
    logp_l = torch.tensor([-0.02], requires_grad=True)
    loss = d3po_loss(logp_w, torch.zeros(1), logp_l, torch.zeros(1), beta=0.1, clip_eps=0.1)
    z = 0.1 * (0.05 - (-0.02))
    expected = -math.log(1 / (1 + math.exp(-z)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    # d/dlogp_w = -beta * sigmoid(-z); d/dlogp_l = +beta * sigmoid(-z).
    s = 1 / (1 + math.exp(z))
    assert logp_w.grad.item() == pytest.approx(-0.1 * s, rel=1e-5)
    assert logp_l.grad.item() == pytest.approx(0.1 * s, rel=1e-5)


def test_outside_the_band_is_clipped_and_has_zero_gradient():
    # rho_w = exp(0.5) > 1.1 -> 1.1; rho_l = exp(-0.5) < 0.9 -> 0.9.
    logp_w = torch.tensor([0.5], requires_grad=True)
    logp_l = torch.tensor([-0.5], requires_grad=True)
    loss = d3po_loss(logp_w, torch.zeros(1), logp_l, torch.zeros(1), beta=0.1, clip_eps=0.1)
    z = 0.1 * (math.log(1.1) - math.log(0.9))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-6)
    loss.sum().backward()
    assert logp_w.grad.item() == 0.0 and logp_l.grad.item() == 0.0


def test_one_side_clipped_keeps_the_other_gradient_and_reference_gets_none():
    logp_w = torch.tensor([0.5], requires_grad=True)  # clipped
    logp_l = torch.tensor([0.01], requires_grad=True)  # inside
    ref = torch.zeros(1, requires_grad=True)
    d3po_loss(logp_w, ref, logp_l, ref, beta=1.0).sum().backward()
    assert logp_w.grad.item() == 0.0 and logp_l.grad.item() > 0
    assert ref.grad is None


def test_clip_eps_must_be_a_fraction():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="clip_eps"):
        d3po_loss(x, x, x, x, clip_eps=1.5)
