"""Diffusion-DPO loss on hand-computed numbers."""

import math

import pytest
import torch

from rlplat.algos.dpo import diffusion_dpo_loss


def test_loss_and_implicit_accuracy_on_hand_numbers():
    # Pair 0: the model improves w by 0.02 and worsens l by 0.01 against the reference:
    # inside = -(10 / 2) * ((0.10 - 0.12) - (0.31 - 0.30)) = -5 * (-0.03) = 0.15.
    # Pair 1: the opposite: inside = -5 * ((0.14 - 0.12) - (0.29 - 0.30)) = -5 * 0.03 = -0.15.
    m_w, m_l = torch.tensor([0.10, 0.14]), torch.tensor([0.31, 0.29])
    r_w, r_l = torch.tensor([0.12, 0.12]), torch.tensor([0.30, 0.30])
    loss, acc = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=10.0)
    expected = [-math.log(1 / (1 + math.exp(-0.15))), -math.log(1 / (1 + math.exp(0.15)))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert acc.item() == 0.5


def test_model_equal_to_reference_gives_log_2_and_zero_accuracy():
    err = torch.rand(5)
    loss, acc = diffusion_dpo_loss(err, err + 0.1, err, err + 0.1, beta=5000.0)
    assert loss.tolist() == pytest.approx([math.log(2)] * 5) and acc.item() == 0.0


def test_gradient_lowers_the_preferred_error_and_raises_the_other():
    m_w, m_l = torch.tensor([0.2], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(m_w, m_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0)
    loss.sum().backward()
    assert m_w.grad.item() > 0 > m_l.grad.item()  # gradient descent lowers err_w, raises err_l


def test_shapes_must_match():
    with pytest.raises(ValueError, match="equal"):
        diffusion_dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)
