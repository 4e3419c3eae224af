"""PPO (Schulman et al. 2017) with GAE, as in cleanrl's continuous-action PPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlplat.algos.advantages import gae, normalize
from rlplat.algos.base import Algorithm
from rlplat.algos.losses import entropy_bonus, ppo_policy_loss, value_loss
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.policies.base import EvalOutput
from rlplat.registry import checked, register

#: What V(s_{t+1}) is at a step where an episode ended (``algo.bootstrap_at_done``).
BOOTSTRAP_MODES = ("always", "truncated")


def bootstrap_next_values(
    values: torch.Tensor,
    last_values: torch.Tensor,
    final_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    bootstrap_at_done: str = "truncated",
) -> torch.Tensor:
    """V(s_{t+1}) as seen by each step of a rollout with same-step auto-reset.

    Args:
        values: V(s_t) [T, N] recorded during the rollout.
        last_values: V(s_T) [N] of the observation after the last step.
        final_values: V(final obs) [T, N] where an episode ended at step t (else ignored).
        terminated: [T, N] episode reached a terminal state at step t.
        truncated: [T, N] episode hit its time limit at step t.
        bootstrap_at_done: ``"truncated"``: only a time-limit end bootstraps from the final
            observation and a terminal state is worth 0 (the textbook MDP); ``"always"``: every
            end bootstraps from the final observation (ManiSkill's PPO), so an episode that ends
            in success keeps the value of the state it reached instead of losing every reward
            that would have followed. With dense rewards that pay near the goal, ``"truncated"``
            makes hovering next to the goal worth more than succeeding.

    Returns:
        next_values [T, N]: the next row of ``values`` (or ``last_values``) while the episode
        goes on, V(final obs) where the episode ended and is bootstrapped, 0 after a terminal
        state that is not.
    """
    following = torch.cat([values[1:], last_values.unsqueeze(0)], dim=0)
    terminated, truncated = terminated.bool(), truncated.bool()
    if bootstrap_at_done == "always":
        return torch.where(terminated | truncated, final_values, following)
    if bootstrap_at_done != "truncated":
        raise ValueError(f"algo.bootstrap_at_done={bootstrap_at_done!r}: must be one of {BOOTSTRAP_MODES}")
    next_values = torch.where(truncated, final_values, following)
    return torch.where(terminated, torch.zeros_like(next_values), next_values)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)``: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for one worse than that (NaN when the returns do not vary)."""
    var = returns.var()
    return float(1.0 - (returns - values).var() / var) if float(var) > 0 else float("nan")


@dataclass
class PPOConfig:
    """Proximal Policy Optimization with GAE (rlplat/algos/ppo.py)."""

    # Env steps per env per iteration (rollout length T).
    rollout_steps: int = checked(50, ge=1)
    # Discount factor.
    gamma: float = checked(0.99, ge=0, le=1)
    # GAE lambda.
    gae_lambda: float = checked(0.95, ge=0, le=1)
    # Which episode ends bootstrap V(final observation): always (every end, as ManiSkill's PPO:
    # an episode that ends in success keeps the value of where it got) or truncated (only
    # time-limit ends; a terminal state is worth 0, the textbook MDP).
    bootstrap_at_done: str = checked("truncated", choices=BOOTSTRAP_MODES)
    # Minibatches per epoch; num_envs * rollout_steps must divide evenly.
    num_minibatches: int = checked(4, ge=1)
    # Passes over each rollout.
    update_epochs: int = checked(4, ge=1)
    # Clip range of the probability ratio.
    clip_coef: float = checked(0.2, gt=0)
    # Clip range of the value update (null: no value clipping).
    vf_clip_coef: float | None = checked(None, gt=0)
    # Weight of the entropy bonus.
    ent_coef: float = checked(0.0, ge=0)
    # Weight of the value loss.
    vf_coef: float = checked(0.5, ge=0)
    # Stop the update before a minibatch whose approx KL exceeds this (null: never).
    target_kl: float | None = checked(0.1, gt=0)
    # Normalise advantages per minibatch.
    norm_adv: bool = True
    # Iterations at the start that train only the value loss (a fresh critic on a warm policy).
    critic_warmup_steps: int = checked(0, ge=0)
    # Re-score the rollout's log-probs with the training weights before the update, so the
    # first ratio is 1 up to float rounding (null: on when the weights are bf16 or fp16).
    recompute_old_logprobs: bool | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=OptimConfig)


@register("algo", "ppo", PPOConfig)
class PPO(Algorithm):
    """Clipped-surrogate PPO on continuing rollouts of ``rollout_steps`` per env."""

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        mode = cfg.get("bootstrap_at_done", "truncated")
        if mode not in BOOTSTRAP_MODES:
            raise ValueError(f"algo.bootstrap_at_done={mode!r}: must be one of {BOOTSTRAP_MODES} "
                             "(always: every episode end bootstraps from its final observation; truncated: "
                             "only time-limit ends do)")

    def rollout_steps(self, max_episode_steps: int) -> int:
        return int(self.cfg["rollout_steps"])

    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        shape = (num_steps, num_envs)
        values = batch["values"].view(shape)
        terminated, truncated = batch["terminated"].view(shape), batch["truncated"].view(shape)
        next_values = bootstrap_next_values(
            values, batch.meta["last_values"], batch["final_values"].view(shape), terminated, truncated,
            self.cfg.get("bootstrap_at_done", "truncated"),
        )
        advantages, returns = gae(
            batch["rewards"].view(shape), values, next_values, terminated | truncated,
            self.cfg["gamma"], self.cfg["gae_lambda"],
        )
        batch["advantages"] = advantages.reshape(-1)
        batch["returns"] = returns.reshape(-1)
        # What the critic and the advantages look like before the update (train/* metrics).
        batch.meta["diagnostics"] = {
            "explained_variance": explained_variance(values, returns),
            "value_mean": float(values.mean()),
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "advantage_std": float(advantages.std()),
        }
        return batch

    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        advantages = mb["advantages"]
        if self.cfg["norm_adv"]:
            advantages = normalize(advantages)
        pg_loss, metrics = ppo_policy_loss(out.logprobs, mb["logprobs"], advantages, self.cfg["clip_coef"])
        v_loss = value_loss(out.values, mb["values"], mb["returns"], self.cfg["vf_clip_coef"])
        entropy = entropy_bonus(out.entropy)
        if self.iteration <= self.cfg.get("critic_warmup_steps", 0):
            # Critic warm-up: the policy terms are left out, so only the value loss trains.
            loss = self.cfg["vf_coef"] * v_loss
        else:
            loss = pg_loss - self.cfg["ent_coef"] * entropy + self.cfg["vf_coef"] * v_loss
        return loss, {
            **metrics,
            "pg_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": entropy.detach(),
        }
