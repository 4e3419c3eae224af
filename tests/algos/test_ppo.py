from dataclasses import asdict

import pytest
import torch

from rlplat.algos.base import BatchArithmeticError
from rlplat.algos.ppo import PPO, bootstrap_next_values
from rlplat.batch import Batch
from rlplat.config import PPOConfig


def make_ppo(**overrides) -> PPO:
    cfg = asdict(PPOConfig())
    cfg.pop("_target_")
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
