from dataclasses import asdict

import pytest
import torch

from rlplat.algos.base import BatchArithmeticError
from rlplat.algos.ppo import PPO, PPOConfig, bootstrap_next_values
from rlplat.batch import Batch


def make_ppo(**overrides) -> PPO:
    cfg = asdict(PPOConfig())
    cfg.update(overrides)
    return PPO(**cfg)


def test_bootstrap_next_values_handles_truncation_and_termination():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    last = torch.tensor([7.0, 8.0])
    final = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    terminated = torch.tensor([[0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    nxt = bootstrap_next_values(values, last, final, terminated, truncated)
    # env 0 truncated at t=1 -> V(final obs)=10; env 1 terminated at t=1 -> 0; else the next row.
    assert nxt.tolist() == [[3.0, 4.0], [10.0, 0.0], [7.0, 8.0]]


def test_bootstrap_always_uses_the_final_observation_at_every_end():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    last = torch.tensor([7.0, 8.0])
    final = torch.tensor([[0.0, 0.0], [10.0, 20.0], [0.0, 0.0]])
    terminated = torch.tensor([[0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    nxt = bootstrap_next_values(values, last, final, terminated, truncated, "always")
    # env 1 terminated at t=1: V(final obs)=20 under always (0 under truncated, test above).
    assert nxt.tolist() == [[3.0, 4.0], [10.0, 20.0], [7.0, 8.0]]
    with pytest.raises(ValueError, match="bootstrap_at_done='sometimes'"):
        bootstrap_next_values(values, last, final, terminated, truncated, "sometimes")


def _success_episode_batch() -> Batch:
    # One env, 3 steps: the episode ends in success (terminated) at t=1, a new one starts at t=2.
    batch = Batch({
        "rewards": torch.tensor([0.5, 1.0, 0.2]),
        "values": torch.tensor([2.0, 3.0, 1.0]),
        "terminated": torch.tensor([False, True, False]),
        "truncated": torch.tensor([False, False, False]),
        "final_values": torch.tensor([0.0, 4.0, 0.0]),
    })
    batch.meta["last_values"] = torch.tensor([2.0])
    return batch


@pytest.mark.parametrize("mode, expected", [
    # gamma 0.5, lambda 0.5. t=2: delta = 0.2 + 0.5*2 - 1 = 0.2 (A=0.2, the new episode).
    # truncated: t=1 delta = 1 + 0 - 3 = -2; t=0 delta = 0.5 + 0.5*3 - 2 = 0, A0 = 0 + 0.25*(-2) = -0.5.
    ("truncated", [-0.5, -2.0, 0.2]),
    # always: t=1 delta = 1 + 0.5*4 - 3 = 0; A0 = 0 + 0.25*0 = 0.
    ("always", [0.0, 0.0, 0.2]),
])
def test_gae_at_a_success_end_bootstraps_only_under_always(mode, expected):
    ppo = make_ppo(gamma=0.5, gae_lambda=0.5, bootstrap_at_done=mode)
    out = ppo.compute_advantages(_success_episode_batch(), num_steps=3, num_envs=1)
    torch.testing.assert_close(out["advantages"], torch.tensor(expected))
    torch.testing.assert_close(out["returns"], torch.tensor(expected) + torch.tensor([2.0, 3.0, 1.0]))
    diagnostics = out.meta["diagnostics"]
    returns, values = out["returns"], out["values"]
    assert diagnostics["explained_variance"] == pytest.approx(float(1 - (returns - values).var() / returns.var()))
    assert diagnostics["return_mean"] == pytest.approx(float(returns.mean()))


def test_unknown_bootstrap_mode_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"algo.bootstrap_at_done='never'.*always.*truncated"):
        make_ppo(bootstrap_at_done="never")


def test_compute_advantages_hand_numbers():
    ppo = make_ppo(gamma=0.5, gae_lambda=1.0)
    batch = Batch({
        "rewards": torch.tensor([1.0, 2.0]),
        "values": torch.tensor([0.5, 1.0]),
        "terminated": torch.tensor([False, False]),
        "truncated": torch.tensor([False, False]),
        "final_values": torch.zeros(2),
    })
    batch.meta["last_values"] = torch.tensor([4.0])
    out = ppo.compute_advantages(batch, num_steps=2, num_envs=1)
    # delta1 = 2 + 0.5*4 - 1 = 3; delta0 = 1 + 0.5*1 - 0.5 = 1; A0 = 1 + 0.5*3 = 2.5.
    torch.testing.assert_close(out["advantages"], torch.tensor([2.5, 3.0]))
    torch.testing.assert_close(out["returns"], torch.tensor([3.0, 4.0]))


def test_loss_at_ratio_one_is_minus_mean_advantage_plus_value_terms():
    ppo = make_ppo(norm_adv=False, ent_coef=0.01, vf_coef=0.5)
    from rlplat.policies.base import EvalOutput

    mb = Batch({
        "logprobs": torch.tensor([-1.0, -2.0]),
        "advantages": torch.tensor([1.0, 3.0]),
        "values": torch.tensor([0.0, 0.0]),
        "returns": torch.tensor([1.0, 1.0]),
    })
    out = EvalOutput(logprobs=torch.tensor([-1.0, -2.0]), entropy=torch.tensor([2.0, 2.0]), values=torch.tensor([0.0, 2.0]))
    loss, metrics = ppo.loss(mb, out)
    # pg = -mean(A) = -2; value = 0.5 * mean((0-1)^2, (2-1)^2) = 0.5; entropy 2.
    assert float(loss) == pytest.approx(-2.0 - 0.01 * 2.0 + 0.5 * 0.5)
    assert float(metrics["clipfrac"]) == 0.0


def test_batch_arithmetic_error_names_the_numbers():
    ppo = make_ppo(rollout_steps=50, num_minibatches=16)
    with pytest.raises(BatchArithmeticError, match=r"num_envs=60 x rollout_steps=50 = 3000 rows.*num_minibatches=16"):
        ppo.check(num_envs=60, max_episode_steps=50, num_env_workers=1, num_actor_workers=1)
    ppo.check(num_envs=64, max_episode_steps=50, num_env_workers=2, num_actor_workers=2)
