"""The shared update loop of embodied algorithms (rlplat/algos/base.py): early stop, skips, metrics."""

from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlplat.algos.ppo import PPO, PPOConfig
from rlplat.batch import Batch
from rlplat.policies.mlp import ActorCritic

OBS_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (3,), np.float32)})
ACTION_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)


def make_ppo(**overrides) -> PPO:
    cfg = asdict(PPOConfig())
    cfg.update(overrides)
    return PPO(**cfg)


def rollout_batch(policy: ActorCritic, rows: int, logprob_shift: float = 0.0, seed: int = 0) -> Batch:
    """Rows sampled from ``policy`` with advantages and returns; old log-probs shifted by ``logprob_shift``."""
    g = torch.Generator().manual_seed(seed)
    obs = Batch({"state": torch.rand(rows, 3, generator=g) * 2 - 1})
    with torch.no_grad():
        out = policy.act(obs)
    obs["actions"] = out.actions
    obs["logprobs"] = out.logprobs + logprob_shift
    obs["values"] = out.values
    obs["advantages"] = torch.randn(rows, generator=g)
    obs["returns"] = torch.randn(rows, generator=g)
    return obs


def params(policy: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.parameters()]


def test_kl_early_stop_is_checked_before_the_optimizer_step():
    torch.manual_seed(0)
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    # Old log-probs 1 nat above the current ones: the first minibatch's approx KL is
    # (e^-1 - 1) + 1 = 0.368, above target_kl before any step.
    batch = rollout_batch(policy, rows=32, logprob_shift=1.0)
    ppo = make_ppo(num_minibatches=2, update_epochs=2, target_kl=0.1)
    before = params(policy)
    metrics = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), batch, torch.Generator().manual_seed(0))
    assert metrics["train/kl_stop"] == 1.0
    assert metrics["train/kl_at_stop"] == pytest.approx(np.exp(-1.0), rel=1e-4)
    assert metrics["train/minibatches"] == 0.0 and metrics["train/update_fraction"] == 0.0
    # Nothing was stepped: the minibatch beyond the band never moved the weights.
    assert all(torch.equal(a, b) for a, b in zip(before, params(policy)))


def test_update_without_kl_stop_runs_every_minibatch_and_reports_diagnostics():
    torch.manual_seed(0)
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    batch = rollout_batch(policy, rows=32)
    ppo = make_ppo(num_minibatches=2, update_epochs=2, target_kl=None)
    before = params(policy)
    metrics = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), batch, torch.Generator().manual_seed(0))
    assert metrics["train/kl_stop"] == 0.0 and "train/kl_at_stop" not in metrics
    assert metrics["train/minibatches"] == 4.0 and metrics["train/update_fraction"] == 1.0
    assert metrics["train/grad_norm_max"] >= metrics["train/grad_norm"] > 0
    assert 0.0 <= metrics["train/clipfrac"] <= 1.0 and metrics["train/approx_kl"] >= 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, params(policy)))


def test_non_finite_minibatch_is_skipped_and_counted():
    torch.manual_seed(0)
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    batch = rollout_batch(policy, rows=32)
    batch["advantages"][5] = float("nan")
    ppo = make_ppo(num_minibatches=4, update_epochs=1)
    metrics = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), batch, torch.Generator().manual_seed(0))
    assert metrics["train/skipped_nonfinite"] == 1.0 and metrics["train/minibatches"] == 3.0
    assert all(torch.isfinite(p).all() for p in policy.parameters())


@pytest.mark.parametrize("recompute, expected", [(False, 1 - np.exp(-0.3)), (True, 0.0)])
def test_recompute_old_logprobs_makes_the_first_ratio_one(recompute, expected):
    torch.manual_seed(0)
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    # Stale behaviour log-probs (0.3 nats above what the training weights give).
    batch = rollout_batch(policy, rows=32, logprob_shift=0.3)
    ppo = make_ppo(num_minibatches=2, update_epochs=1, recompute_old_logprobs=recompute)
    metrics = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-3), batch, torch.Generator().manual_seed(0))
    assert metrics["train/ratio_dev_first"] == pytest.approx(expected, abs=1e-5)


def test_recompute_old_logprobs_defaults_on_for_low_precision_weights():
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    ppo = make_ppo(recompute_old_logprobs=None)
    assert not ppo.recomputes_old_logprobs(policy)
    assert ppo.recomputes_old_logprobs(policy.to(torch.bfloat16))
    assert not make_ppo(recompute_old_logprobs=False).recomputes_old_logprobs(policy)


class PerStepPolicy(ActorCritic):
    """An ActorCritic whose log-probs stay per action dimension [B, K], as a policy whose action is
    a chain of K stochastic steps reports them (the contract's per-step log-probs)."""

    def act(self, obs, deterministic=False):
        out = super().act(obs, deterministic)
        dist = self._dist(obs)
        out.logprobs = dist.log_prob(out.actions)
        return out

    def evaluate_actions(self, obs, actions, extras=None):
        out = super().evaluate_actions(obs, actions, extras)
        out.logprobs = self._dist(obs).log_prob(actions)
        return out


def test_ppo_update_takes_per_step_logprobs():
    torch.manual_seed(0)
    policy = PerStepPolicy(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    batch = rollout_batch(policy, rows=32)
    assert batch["logprobs"].shape == (32, 2)
    ppo = make_ppo(num_minibatches=2, update_epochs=2, target_kl=None)
    before = params(policy)
    metrics = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), batch, torch.Generator().manual_seed(0))
    assert metrics["train/minibatches"] == 4.0 and metrics["train/ratio_dev_first"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/approx_kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params(policy)))
