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


def adaptive_optimizer(policy: torch.nn.Module, lr: float, value_scale: float = 1.0) -> torch.optim.Optimizer:
    """The workers' optimizer (build_optimizer) with a second group at ``value_scale`` x lr, lr set by the controller."""
    from rlplat.algos.optim import build_optimizer, set_lr

    params = list(policy.parameters())
    groups = [{"params": params[:-2], "lr": lr}, {"params": params[-2:], "lr": lr * value_scale}]
    optimizer = build_optimizer(groups, {"lr": lr, "desired_kl": 0.01})
    set_lr(optimizer, lr)
    return optimizer


def test_adaptive_lr_moves_by_1_5_per_minibatch_on_the_kl_it_checks_and_keeps_group_ratios():
    from rlplat.algos.optim import KL_LR_MAX, KL_LR_MIN, adapt_lr_to_kl, set_lr

    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    optimizer = adaptive_optimizer(policy, lr=1e-3, value_scale=10.0)
    # Inside the band [desired / 2, 2 desired]: unchanged.
    assert adapt_lr_to_kl(optimizer, 0.01, 0.01) == pytest.approx(1e-3)
    # Above twice the target: / 1.5; below half: x 1.5; the value group keeps its 10x.
    assert adapt_lr_to_kl(optimizer, 0.03, 0.01) == pytest.approx(1e-3 / 1.5)
    assert adapt_lr_to_kl(optimizer, 0.001, 0.01) == pytest.approx(1e-3)
    assert adapt_lr_to_kl(optimizer, 0.001, 0.01) == pytest.approx(1.5e-3)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1.5e-2)
    # The factor survives the controller's next set_lr (the next iteration) and a save / load.
    set_lr(optimizer, 1e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-3)
    restored = adaptive_optimizer(policy, lr=1e-3, value_scale=10.0)
    restored.load_state_dict(optimizer.state_dict())
    set_lr(restored, 1e-3)
    assert [g["lr"] for g in restored.param_groups] == pytest.approx([1.5e-3, 1.5e-2])
    # Bounded like rsl_rl's schedule.
    for _ in range(40):
        adapt_lr_to_kl(optimizer, 0.0, 0.01)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(KL_LR_MAX)
    for _ in range(60):
        adapt_lr_to_kl(optimizer, 1.0, 0.01)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(KL_LR_MIN)


def test_update_with_desired_kl_adapts_before_each_step_and_reports_the_lr():
    torch.manual_seed(0)
    policy = ActorCritic(OBS_SPACE, ACTION_SPACE, hidden_sizes=(16,))
    ppo = make_ppo(num_minibatches=2, update_epochs=1, target_kl=None,
                   optim={"lr": 1e-3, "eps": 1e-5, "anneal_lr": False, "max_grad_norm": 0.5, "weight_decay": 0.0,
                          "desired_kl": 0.01})
    # Old log-probs 1 nat above: approx KL 0.37 on both minibatches, far above 2 x 0.01: two divisions.
    optimizer = adaptive_optimizer(policy, lr=1e-3)
    metrics = ppo.update(policy, optimizer, rollout_batch(policy, rows=32, logprob_shift=1.0),
                         torch.Generator().manual_seed(0))
    assert metrics["train/lr"] == pytest.approx(1e-3 / 1.5**2)
    # Rows from the policy itself: the first minibatch's KL is 0 (< 0.005), so the lr rises first.
    optimizer = adaptive_optimizer(policy, lr=1e-3)
    before = optimizer.param_groups[0]["lr"]
    ppo.update(policy, optimizer, rollout_batch(policy, rows=32), torch.Generator().manual_seed(0))
    assert optimizer.param_groups[0]["lr"] > before


@pytest.mark.parametrize(("algo", "optim", "match"), [
    ("ppo", {"anneal_lr": True, "desired_kl": 0.01}, "anneal_lr=true and algo.optim.desired_kl=0.01 both set"),
    ("sft", {"desired_kl": 0.01}, "learns from demonstrations"),
    ("d3po", {"desired_kl": 0.01}, "for the embodied algorithms"),
])
def test_desired_kl_is_refused_where_it_cannot_work(algo: str, optim: dict, match: str, tmp_path) -> None:
    from rlplat.config import compose
    from rlplat.validate import ConfigError, validate

    preset = {"ppo": ["experiment=toy_mlp"], "sft": ["experiment=vla_toy_sft"], "d3po": ["experiment=d3po_tiny"]}[algo]
    cfg = compose([*preset, *(f"algo.optim.{k}={v}" for k, v in optim.items())])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, tmp_path)
