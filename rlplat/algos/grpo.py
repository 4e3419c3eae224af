"""GRPO (Shao et al. 2024) for embodied episodes: group-relative outcome advantages, no critic.

Every iteration starts ``num_envs / group_size`` groups of envs; the envs of a group start from
their leader's state (``VectorEnv.reset_groups``: the same seed where that suffices, a copy of the
simulator state where it does not, as on ManiSkill's batched GPU path), so they differ only by
the policy's sampling. Each
env's first episode is scored (return or success), scores are normalised within the group, and
that advantage is applied to every step of the episode under the PPO-clip surrogate. The loss
averages over steps (``algo.loss_weighting=step``) or gives every scored episode the same weight,
its steps ``1 / length`` each (``episode``, GRPO's per-sequence mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rlplat.algos.advantages import group_normalized_advantages, nonuniform_group_mask
from rlplat.algos.base import Algorithm, BatchArithmeticError
from rlplat.algos.losses import entropy_bonus, kl_penalty, masked_mean, ppo_policy_loss
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.policies.base import EvalOutput
from rlplat.registry import checked, register

_WEIGHTINGS = ("episode", "step")
_KL_KINDS = ("k1", "k2", "k3")


def discounted_return(batch: Batch, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Outcome ``return``: each env's first-episode return, discounted by ``gamma`` within it [N].

    Every episode starts at t = 0 (episodic rollouts), so gamma^t discounts within it."""
    num_steps = mask.shape[0]
    discount = gamma ** torch.arange(num_steps, dtype=torch.float32)
    return (batch["rewards"].view(mask.shape) * mask * discount.unsqueeze(1)).sum(0)


def first_episode_success(batch: Batch, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Outcome ``success``: 1 where the env's first episode succeeded at any step, else 0 [N]."""
    return (batch["success"].view(mask.shape) & mask).any(0).float()


#: algo.outcome -> the episode score groups are normalised over.
OUTCOMES = {"return": discounted_return, "success": first_episode_success}


def first_episode_mask(dones: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: steps up to and including each env's first episode end."""
    ended_before = torch.cumsum(dones.long(), dim=0) - dones.long()
    return ended_before == 0


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization on episode outcomes (rlplat/algos/grpo.py)."""

    # Rollouts per group (env.num_envs must be a multiple); the envs of a group share their initial
    # state. At a fixed env budget more, smaller groups learned faster on the toy task (64 envs:
    # 16 groups of 4 beat 8 groups of 8).
    group_size: int = checked(4, ge=2)
    # Outcome score of an episode: return (sum of rewards) or success (0/1).
    outcome: str = checked("return", choices=tuple(OUTCOMES))
    # Discount inside the episode for outcome=return (1: plain sum; < 1 favours faster success).
    gamma: float = checked(0.99, ge=0, le=1)
    # Divide group-centred outcomes by the group std (false: Dr. GRPO style).
    std_normalize: bool = True
    # Drop groups whose outcomes are all equal (they carry no signal).
    filter_uniform_groups: bool = True
    # How the loss averages steps: step (every step the same) or episode (every scored episode
    # weighs the same, its steps 1/length: GRPO's per-sequence mean). Step weighting lets the
    # long, failed episodes outweigh the short successes: from the quickstart's SFT start the
    # action-token entropy stayed at 2.86-2.97 nats (3.24 with outcome=success) under step
    # weighting and fell to 2.70 in 20 iterations under episode weighting, but greedy success was
    # the same (0.55 / 0.61 at 10 / 20 iterations, seed 0; bench/results/learning_vla_toy_ab.json),
    # so the default stays step.
    loss_weighting: str = "step"
    # Weight of the KL penalty to the reference policy (0: no reference kept).
    kl_coef: float = checked(0.0, ge=0)
    # KL estimator: k1, k2 or k3.
    kl_kind: str = "k3"
    # Minibatches per epoch over the valid steps.
    num_minibatches: int = checked(4, ge=1)
    # Passes over each rollout.
    update_epochs: int = checked(4, ge=1)
    # Clip range of the probability ratio.
    clip_coef: float = checked(0.2, gt=0)
    # Weight of the entropy bonus.
    ent_coef: float = checked(0.0, ge=0)
    # Stop the epoch loop once approx KL exceeds this (null: never).
    target_kl: float | None = checked(0.1, gt=0)
    # Re-score the rollout's log-probs with the training weights before the update, so the
    # first ratio is 1 up to float rounding (null: on when the weights are bf16 or fp16).
    recompute_old_logprobs: bool | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=OptimConfig)


@register("algo", "grpo", GRPOConfig)
class GRPO(Algorithm):
    """PPO-clip on group-normalised episode outcomes, optional KL to the initial policy."""

    needs_value = False
    episodic = True
    needs_final_values = False

    def __init__(self, **cfg):
        super().__init__(**cfg)
        if cfg["outcome"] not in OUTCOMES:
            raise ValueError(f"algo.outcome={cfg['outcome']!r} is not one of {tuple(OUTCOMES)}")
        if cfg["kl_kind"] not in _KL_KINDS:
            raise ValueError(f"algo.kl_kind={cfg['kl_kind']!r} is not one of {_KL_KINDS}")
        if cfg["loss_weighting"] not in _WEIGHTINGS:
            raise ValueError(f"algo.loss_weighting={cfg['loss_weighting']!r} is not one of {_WEIGHTINGS}")

    @property
    def needs_ref(self) -> bool:
        return self.cfg["kl_coef"] > 0

    def rollout_steps(self, max_episode_steps: int) -> int:
        # One full episode per env: every first episode ends (success or time limit) by then.
        return max_episode_steps

    def reset_seeds(self, num_envs: int, rng: np.random.Generator) -> list[int]:
        group_size = self.cfg["group_size"]
        group_seeds = rng.integers(0, 2**31 - 1, size=num_envs // group_size)
        return [int(s) for s in np.repeat(group_seeds, group_size)]

    def check(self, num_envs: int, max_episode_steps: int | None, num_env_workers: int, num_actor_workers: int) -> None:
        group_size = self.cfg["group_size"]
        if group_size < 2 or num_envs % group_size:
            raise BatchArithmeticError(
                f"env.num_envs={num_envs} must be a multiple of algo.group_size={group_size} "
                f"(>= 2): each group of envs shares one initial state"
            )
        # Env workers hold contiguous shards and copy a leader's start state only inside their
        # own shard (EnvWorker.reset), so a group must not span two shards.
        if num_envs % num_env_workers == 0 and (num_envs // num_env_workers) % group_size:
            step = num_env_workers * group_size
            raise BatchArithmeticError(
                f"env.num_envs={num_envs} over {num_env_workers} env workers (placement.roles.env x "
                f"placement.pipeline_stages) gives shards of {num_envs // num_env_workers} envs, not a multiple of "
                f"algo.group_size={group_size}: a group would span two shards and could not share its start "
                f"state; use env.num_envs={step * max(1, num_envs // step)} (a multiple of {step})"
            )
        super().check(num_envs, max_episode_steps, num_env_workers, num_actor_workers)

    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        shape = (num_steps, num_envs)
        dones = batch["terminated"].view(shape) | batch["truncated"].view(shape)
        mask = first_episode_mask(dones)
        outcome = OUTCOMES[self.cfg["outcome"]](batch, mask, float(self.cfg["gamma"]))
        group_size = self.cfg["group_size"]
        advantages = group_normalized_advantages(outcome, group_size, self.cfg["std_normalize"])
        keep = torch.ones(num_envs, dtype=torch.bool)
        if self.cfg["filter_uniform_groups"]:
            keep = nonuniform_group_mask(outcome, group_size)
        mask = mask & keep.unsqueeze(0)
        batch["advantages"] = advantages.unsqueeze(0).expand(shape).reshape(-1)
        batch["mask"] = mask.reshape(-1)
        if self.cfg["loss_weighting"] == "episode":
            # Each scored episode weighs the same: its steps share 1 / its length.
            length = mask.sum(0, keepdim=True).clamp(min=1).float()
            batch["loss_weights"] = (mask / length).reshape(-1)
        batch.meta["valid_rows"] = int(mask.sum())
        batch.meta["kept_groups"] = int(keep.sum()) // group_size
        batch.meta["outcome_mean"] = float(outcome.mean())
        return batch

    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Bool mask (step weighting) or per-step float weights (episode weighting).
        mask = mb["loss_weights"] if "loss_weights" in mb else mb["mask"]
        pg_loss, metrics = ppo_policy_loss(out.logprobs, mb["logprobs"], mb["advantages"], self.cfg["clip_coef"], mask)
        entropy = entropy_bonus(out.entropy, mask)
        loss = pg_loss - self.cfg["ent_coef"] * entropy
        metrics = {**metrics, "pg_loss": pg_loss.detach(), "entropy": entropy.detach()}
        if self.needs_ref:
            kl = masked_mean(kl_penalty(out.logprobs, mb["ref_logprobs"], self.cfg["kl_kind"]), mask)
            loss = loss + self.cfg["kl_coef"] * kl
            metrics["kl_ref"] = kl.detach()
        return loss, metrics
