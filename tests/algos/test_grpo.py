from dataclasses import asdict

import numpy as np
import pytest
import torch

from rlplat.algos.base import BatchArithmeticError
from rlplat.algos.grpo import GRPO, GRPOConfig, first_episode_mask
from rlplat.batch import Batch
from rlplat.policies.base import EvalOutput


def make_grpo(**overrides) -> GRPO:
    cfg = asdict(GRPOConfig())
    cfg.update(overrides)
    return GRPO(**cfg)


def test_first_episode_mask():
    dones = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.bool)
    assert first_episode_mask(dones).tolist() == [[True, True], [True, False], [False, False]]


def test_reset_seeds_share_one_seed_per_group():
    seeds = make_grpo(group_size=4).reset_seeds(12, np.random.default_rng(0))
    assert len(seeds) == 12
    groups = [seeds[i : i + 4] for i in range(0, 12, 4)]
    assert all(len(set(g)) == 1 for g in groups)
    assert len({g[0] for g in groups}) == 3


def _rollout() -> Batch:
    # T=2 steps, N=4 envs (time-major rows), groups {0,1} and {2,3}.
    # env 0 succeeds at t=0 (its t=1 row belongs to a new episode); the others truncate at t=1.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 2.0, 2.0]])
    terminated = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    success = terminated.clone()
    return Batch({
        "rewards": rewards.reshape(-1), "terminated": terminated.reshape(-1),
        "truncated": truncated.reshape(-1), "success": success.reshape(-1),
    })


def test_compute_advantages_groups_first_episodes_and_filters_uniform_groups():
    grpo = make_grpo(group_size=2, std_normalize=False, filter_uniform_groups=True)
    out = grpo.compute_advantages(_rollout(), num_steps=2, num_envs=4)
    # Outcomes (first-episode returns): env0 = 1 (the 5 after its reset is not counted), env1 = 0,
    # env2 = env3 = 2. Group 0 centred: +0.5, -0.5; group 1 all equal -> 0 and filtered.
    adv = out["advantages"].view(2, 4)
    assert adv[:, 0].tolist() == [0.5, 0.5] and adv[:, 1].tolist() == [-0.5, -0.5]
    assert adv[:, 2:].abs().sum() == 0
    assert out["mask"].view(2, 4).tolist() == [[True, True, False, False], [False, True, False, False]]
    assert out.meta["valid_rows"] == 3 and out.meta["kept_groups"] == 1


def test_episode_weighting_gives_every_scored_episode_the_same_weight():
    out = make_grpo(group_size=2, std_normalize=False, loss_weighting="episode").compute_advantages(
        _rollout(), num_steps=2, num_envs=4)
    # env 0's first episode is 1 step long, env 1's 2 steps; group 1 is filtered out.
    assert out["loss_weights"].view(2, 4).tolist() == [[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]]
    # The surrogate at ratio 1 is -mean over episodes of their advantage: -(0.5 - 0.5) / 2 = 0,
    # where step weighting counts env 1's two steps twice: -(0.5 - 0.5 - 0.5) / 3.
    grpo = make_grpo(loss_weighting="episode")
    out["logprobs"] = torch.zeros(8)
    model = EvalOutput(logprobs=torch.zeros(8), entropy=torch.zeros(8))
    assert float(grpo.loss(out, model)[0]) == pytest.approx(0.0)
    out.pop("loss_weights")
    assert float(grpo.loss(out, model)[0]) == pytest.approx(0.5 / 3)
    step = make_grpo(group_size=2, loss_weighting="step").compute_advantages(_rollout(), num_steps=2, num_envs=4)
    assert "loss_weights" not in step
    with pytest.raises(ValueError, match="loss_weighting"):
        make_grpo(loss_weighting="token")


def test_success_outcome():
    grpo = make_grpo(group_size=2, outcome="success", std_normalize=False, filter_uniform_groups=False)
    out = grpo.compute_advantages(_rollout(), num_steps=2, num_envs=4)
    # Success outcomes 1, 0, 0, 0.
    assert out["advantages"].view(2, 4)[0].tolist() == [0.5, -0.5, 0.0, 0.0]
    assert out.meta["valid_rows"] == 7


def test_loss_masks_rows_and_adds_kl_to_reference():
    grpo = make_grpo(kl_coef=0.5, kl_kind="k1")
    mb = Batch({
        "logprobs": torch.zeros(3), "advantages": torch.tensor([1.0, -1.0, 100.0]),
        "mask": torch.tensor([True, True, False]), "ref_logprobs": torch.tensor([-1.0, -1.0, -1.0]),
    })
    out = EvalOutput(logprobs=torch.zeros(3), entropy=torch.ones(3))
    loss, metrics = grpo.loss(mb, out)
    # ratio 1: pg = -mean(1, -1) = 0 (row 2 masked); k1 KL = mean(0 - (-1)) = 1; loss = 0.5.
    assert float(loss) == pytest.approx(0.5)
    assert float(metrics["kl_ref"]) == pytest.approx(1.0)


def test_group_arithmetic_errors():
    with pytest.raises(BatchArithmeticError, match="num_envs=30 must be a multiple of algo.group_size=8"):
        make_grpo(group_size=8).check(30, 50, 1, 1)
    # The env's own episode limit (env.max_episode_steps=null) is checked once the env reports it.
    make_grpo(group_size=2, num_minibatches=3).check(4, None, 1, 1)
    with pytest.raises(BatchArithmeticError, match=r"rollout_steps=50 = 200 rows.*num_minibatches=3"):
        make_grpo(group_size=2, num_minibatches=3).check(4, 50, 1, 1)
    # Env workers hold contiguous shards: 8 envs over 4 workers are shards of 2, which split groups of 4.
    with pytest.raises(BatchArithmeticError, match=r"env.num_envs=8 over 4 env workers .* shards of 2 envs, not a "
                       r"multiple of algo.group_size=4.*use env.num_envs=16"):
        make_grpo(group_size=4).check(8, 8, 4, 1)
    make_grpo(group_size=4).check(16, 8, 4, 1)
    with pytest.raises(ValueError, match="algo.outcome"):
        make_grpo(outcome="reward")
    with pytest.raises(ValueError, match="algo.kl_kind"):
        make_grpo(kl_kind="k4")
