import math

import pytest
import torch

from rlplat.algos.losses import entropy_bonus, kl_penalty, masked_mean, ppo_policy_loss, value_loss


# ---------------------------------------------------------------------------- masked_mean
def test_masked_mean_bool_float_and_none():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert masked_mean(x).item() == pytest.approx(2.5)
    assert masked_mean(x, torch.tensor([True, False, True, False])).item() == pytest.approx(2.0)  # (1+3)/2
    # float weights: (0.5*1 + 1*4) / 1.5 = 3
    assert masked_mean(x, torch.tensor([0.5, 0.0, 0.0, 1.0])).item() == pytest.approx(3.0)


def test_masked_mean_empty_mask_is_zero_and_masked_inf_does_not_leak():
    x = torch.tensor([1.0, float("inf"), float("nan")], requires_grad=True)
    out = masked_mean(x, torch.zeros(3, dtype=torch.bool))
    assert out.item() == 0.0
    assert masked_mean(x, torch.tensor([True, False, False])).item() == 1.0


def test_masked_mean_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.zeros(4), torch.ones(2, dtype=torch.bool))


def test_masked_mean_row_mask_weighs_every_step_of_a_row():
    x = torch.tensor([[1.0, 3.0], [10.0, 20.0], [float("nan"), 5.0]])
    # Rows 0 and 1 count; each of their two steps weighs the same.
    assert masked_mean(x, torch.tensor([True, True, False])).item() == pytest.approx((1 + 3 + 10 + 20) / 4)
    with pytest.raises(ValueError, match="leading dims"):
        masked_mean(x, torch.ones(2, dtype=torch.bool))


# ---------------------------------------------------------------------------- ppo
def test_ppo_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    A = torch.tensor([1.0, -2.0, 0.5])
    loss, metrics = ppo_policy_loss(logp, logp.detach().clone(), A, clip_coef=0.2)
    # -mean(1, -2, 0.5) = 0.5 / 3
    assert loss.item() == pytest.approx(0.5 / 3)
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_ppo_clipping_hand_numbers_and_zero_gradient_outside_band():
    old_logp = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = ppo_policy_loss(logp, old_logp, A, clip_coef=0.2)
    # per row max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped: no gradient)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: d/dlogp = -A*r = -0.5)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8 (clipped: no gradient)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5 (unclipped: d/dlogp = -A*r = 1.5)
    # loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 0.0, 1.5]) / 4)
    assert metrics["clipfrac"].item() == pytest.approx(1.0)
    # k3 = (r - 1) - log r: r=1.5 -> 0.5 - log 1.5; r=0.5 -> -0.5 - log 0.5
    k3_up, k3_down = 0.5 - math.log(1.5), -0.5 - math.log(0.5)
    assert metrics["approx_kl"].item() == pytest.approx((2 * k3_up + 2 * k3_down) / 4)
    assert metrics["approx_kl"].item() > 0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_ppo_per_step_logprobs_are_ratios_sharing_their_rows_advantage():
    # Two rows, three denoising steps each (DPPO): logp [B, K], advantages [B].
    old_logp = torch.zeros(2, 3)
    ratios = torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.5, 1.0]])
    logp = ratios.log().requires_grad_()
    A = torch.tensor([1.0, -1.0])
    loss, metrics = ppo_policy_loss(logp, old_logp, A, clip_coef=0.2)
    # Row 0 (A=+1): max(-r, -clip r) = -1.2, -1.0, -0.5; row 1 (A=-1): max(r, clip r) = 1.1, 0.8, 1.0.
    assert loss.item() == pytest.approx((-1.2 - 1.0 - 0.5 + 1.1 + 0.8 + 1.0) / 6)
    # The same as stacking every step as its own row with the advantage repeated.
    flat, _ = ppo_policy_loss(ratios.log().reshape(-1), old_logp.reshape(-1), A.repeat_interleave(3), 0.2)
    assert loss.item() == pytest.approx(flat.item())
    masked, _ = ppo_policy_loss(logp, old_logp, A, 0.2, mask=torch.tensor([True, False]))
    assert masked.item() == pytest.approx((-1.2 - 1.0 - 0.5) / 3)
    assert metrics["clipfrac"].item() == pytest.approx(3 / 6)  # 1.5, 0.5, 0.5 are outside the band


def test_ppo_mask_excludes_rows():
    old_logp = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), 0.0, math.log(0.5), 123.0], requires_grad=True)
    A = torch.tensor([1.0, 1.0, -1.0, 1e6])
    mask = torch.tensor([True, True, True, False])
    loss, metrics = ppo_policy_loss(logp, old_logp, A, clip_coef=0.2, mask=mask)
    # rows: -1.2 (clipped), -1.0 (r=1), 0.8 (clipped) -> mean -1.4 / 3
    assert loss.item() == pytest.approx(-1.4 / 3)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.5) / 3)


# ---------------------------------------------------------------------------- value
def test_value_loss_unclipped_and_clipped_hand_numbers():
    V = torch.tensor([1.0, 2.0], requires_grad=True)
    V_old = torch.tensor([0.5, 2.0])
    R = torch.tensor([2.0, 1.0])
    # unclipped: 0.5 * mean((1-2)^2, (2-1)^2) = 0.5
    assert value_loss(V, V_old, R, clip_coef=None).item() == pytest.approx(0.5)
    # clipped, c=0.2: V_clipped = [0.5 + 0.2, 2.0] = [0.7, 2.0]
    #   row 0: max(1, (0.7-2)^2 = 1.69) = 1.69; row 1: max(1, 1) = 1 -> 0.5 * (1.69 + 1) / 2 = 0.6725
    loss = value_loss(V, V_old, R, clip_coef=0.2)
    assert loss.item() == pytest.approx(0.6725)
    loss.backward()
    # row 0 follows the clipped (constant) branch: no gradient; row 1: 0.5 * 2 * (2-1) / 2 = 0.5
    torch.testing.assert_close(V.grad, torch.tensor([0.0, 0.5]))


def test_value_loss_clip_never_lowers_loss_and_respects_mask():
    torch.manual_seed(0)
    V, V_old, R = torch.randn(32), torch.randn(32), torch.randn(32)
    assert value_loss(V, V_old, R, 0.1) >= value_loss(V, V_old, R, None)
    mask = torch.tensor([True, False])
    # only row 0: 0.5 * (3 - 1)^2 = 2
    v = value_loss(torch.tensor([3.0, 50.0]), torch.zeros(2), torch.tensor([1.0, 0.0]), None, mask)
    assert v.item() == pytest.approx(2.0)


def test_entropy_bonus_masked_mean():
    H = torch.tensor([1.0, 2.0, 9.0])
    assert entropy_bonus(H).item() == pytest.approx(4.0)
    assert entropy_bonus(H, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(1.5)


# ---------------------------------------------------------------------------- kl
def test_kl_penalty_hand_numbers():
    logp = torch.tensor([-1.0, -2.0, -0.7])
    ref_logp = torch.tensor([-2.0, -1.0, -0.7])
    # log_ratio = logp - ref_logp = [1, -1, 0]
    torch.testing.assert_close(kl_penalty(logp, ref_logp, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref_logp, "k2"), torch.tensor([0.5, 0.5, 0.0]))
    # k3 = exp(ref - logp) - (ref - logp) - 1: ref - logp = [-1, 1, 0]
    #   -> [e^-1 + 1 - 1, e^1 - 1 - 1, 1 - 0 - 1]
    expected_k3 = torch.tensor([math.exp(-1.0), math.e - 2.0, 0.0])
    torch.testing.assert_close(kl_penalty(logp, ref_logp, "k3"), expected_k3)
    torch.testing.assert_close(kl_penalty(logp, ref_logp), expected_k3)  # default k3


def test_kl_k3_is_non_negative_and_unbiased():
    torch.manual_seed(0)
    assert (kl_penalty(torch.randn(1000), torch.randn(1000), "k3") >= 0).all()
    # Samples from pi = N(0, 1), ref = N(0.5, 1): KL(pi || ref) = 0.5^2 / 2 = 0.125.
    a = torch.randn(200_000)
    logp = -0.5 * a**2
    ref_logp = -0.5 * (a - 0.5) ** 2
    assert kl_penalty(logp, ref_logp, "k3").mean().item() == pytest.approx(0.125, abs=5e-3)
    assert kl_penalty(logp, ref_logp, "k1").mean().item() == pytest.approx(0.125, abs=5e-3)


def test_kl_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"'k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
