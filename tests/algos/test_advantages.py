import pytest
import torch

from rlplat.algos.advantages import (
    gae,
    group_normalized_advantages,
    nonuniform_group_mask,
    normalize,
)


# ---------------------------------------------------------------------------- gae
def test_gae_hand_numbers_with_termination_and_truncation():
    # T=3, N=2, gamma=0.9, lam=0.8 -> gamma*lam = 0.72.
    # env 0 terminates at t=1 (next value 0); env 1 is truncated at t=1 (next value V(final)=2).
    rewards = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.5, 1.0]])
    next_values = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 1.0]])
    dones = torch.tensor([[False, False], [True, True], [False, False]])
    adv, ret = gae(rewards, values, next_values, dones, gamma=0.9, lam=0.8)
    # env 0: delta = [1 + 0.9*1 - 0.5, 2 + 0 - 1, 3 + 0.9*2 - 1.5] = [1.4, 1.0, 3.3]
    #   A2 = 3.3; A1 = 1.0 (done cuts); A0 = 1.4 + 0.72*1.0 = 2.12
    # env 1: delta = [0 + 0.9 - 1, 1 + 0.9*2 - 1, 0 + 0.9 - 1] = [-0.1, 1.8, -0.1]
    #   A2 = -0.1; A1 = 1.8 (done cuts); A0 = -0.1 + 0.72*1.8 = 1.196
    expected_adv = torch.tensor([[2.12, 1.196], [1.0, 1.8], [3.3, -0.1]])
    torch.testing.assert_close(adv, expected_adv)
    # returns = A + V
    torch.testing.assert_close(ret, torch.tensor([[2.62, 2.196], [2.0, 2.8], [4.8, 0.9]]))


def test_gae_no_dones_continues_across_whole_rollout():
    # N=1, gamma=0.9, lam=0.8: rewards [0, 1, 0], V = 1 everywhere.
    # delta = [-0.1, 0.9, -0.1]; A2 = -0.1; A1 = 0.9 - 0.072 = 0.828; A0 = -0.1 + 0.72*0.828 = 0.49616
    rewards = torch.tensor([[0.0], [1.0], [0.0]])
    ones = torch.ones(3, 1)
    adv, _ = gae(rewards, ones, ones, torch.zeros(3, 1), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.49616], [0.828], [-0.1]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    T, N = 5, 2
    rewards, values = torch.randn(T, N), torch.randn(T, N)
    # Episode continues to the end of the rollout and terminates there: V(s_T) = 0.
    next_values = torch.cat([values[1:], torch.zeros(1, N)])
    adv, ret = gae(rewards, values, next_values, torch.zeros(T, N), gamma=1.0, lam=1.0)
    reward_to_go = torch.stack([rewards[t:].sum(0) for t in range(T)])
    torch.testing.assert_close(adv, reward_to_go - values)
    torch.testing.assert_close(ret, reward_to_go)


def test_gae_lam_zero_is_one_step_td_error():
    torch.manual_seed(1)
    T, N = 4, 3
    rewards, values, next_values = torch.randn(T, N), torch.randn(T, N), torch.randn(T, N)
    dones = torch.rand(T, N) < 0.3
    adv, _ = gae(rewards, values, next_values, dones, gamma=0.99, lam=0.0)
    torch.testing.assert_close(adv, rewards + 0.99 * next_values - values)


def test_gae_matches_plain_python_loop_and_accepts_float_dones():
    torch.manual_seed(2)
    T, N, gamma, lam = 6, 3, 0.97, 0.9
    rewards, values, next_values = torch.randn(T, N), torch.randn(T, N), torch.randn(T, N)
    dones = torch.rand(T, N) < 0.3
    expected = [[0.0] * N for _ in range(T)]
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            delta = rewards[t, n].item() + gamma * next_values[t, n].item() - values[t, n].item()
            running = delta + gamma * lam * (0.0 if dones[t, n] else 1.0) * running
            expected[t][n] = running
    adv_bool, _ = gae(rewards, values, next_values, dones, gamma, lam)
    adv_float, _ = gae(rewards, values, next_values, dones.float(), gamma, lam)
    torch.testing.assert_close(adv_bool, torch.tensor(expected))
    torch.testing.assert_close(adv_float, adv_bool)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2), 0.9, 0.9)


# ---------------------------------------------------------------------------- normalize
def test_normalize_hand_numbers_uses_sample_std_and_zeroes_masked():
    # Selected [1, 2, 3]: mean 2, sample std sqrt(((1)^2 + 0 + (1)^2) / 2) = 1 -> [-1, 0, 1].
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(normalize(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(normalize(x[:3]), torch.tensor([-1.0, 0.0, 1.0]))


def test_normalize_invariants_on_masked_entries():
    torch.manual_seed(3)
    x = 5.0 + 3.0 * torch.randn(8, 16)
    mask = torch.rand(8, 16) < 0.6
    out = normalize(x, mask)
    assert out[~mask].abs().sum() == 0
    assert abs(out[mask].mean().item()) < 1e-5
    assert out[mask].std().item() == pytest.approx(1.0, abs=1e-5)
    # float 0/1 mask means the same as bool
    torch.testing.assert_close(normalize(x, mask.float()), out)


def test_normalize_degenerate_inputs_give_zeros_not_nan():
    assert normalize(torch.tensor([4.0, 4.0, 4.0])).tolist() == [0.0, 0.0, 0.0]
    assert normalize(torch.tensor([7.0, 1.0]), torch.tensor([True, False])).tolist() == [0.0, 0.0]
    assert normalize(torch.tensor([7.0, 1.0]), torch.tensor([False, False])).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------- groups
def test_group_normalized_advantages_hand_numbers():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 0: mean 2, deviations [-1, 0, 1], sample std sqrt((1 + 0 + 1) / 2) = 1
    # group 1: mean 2, deviations [-2, -2, 4], sample std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    s = 12**0.5
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.0 / s, -2.0 / s, 4.0 / s])
    torch.testing.assert_close(group_normalized_advantages(rewards, 3), expected, atol=1e-5, rtol=1e-5)
    # Dr. GRPO: centred only.
    centred = group_normalized_advantages(rewards, 3, std_normalize=False)
    assert centred.tolist() == [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]


def test_group_normalized_advantages_equal_group_gives_zeros():
    rewards = torch.tensor([5.0, 5.0, 5.0, 1.0, 0.0, 0.0])
    adv = group_normalized_advantages(rewards, 3)
    assert not torch.isnan(adv).any()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv.view(2, 3).sum(1).abs().max() < 1e-6  # every group sums to 0


def test_group_normalized_advantages_group_size_one_is_zero():
    assert group_normalized_advantages(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]


def test_nonuniform_group_mask():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 0.0, 1.0])
    mask = nonuniform_group_mask(rewards, 3)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True] * 3 + [False] * 3 + [True] * 3


@pytest.mark.parametrize("fn", [group_normalized_advantages, nonuniform_group_mask])
def test_bad_group_size_names_both_numbers(fn):
    with pytest.raises(ValueError, match=r"B=6.*group_size=4"):
        fn(torch.zeros(6), 4)

