"""Supervised fine-tuning (behaviour cloning) on scripted-expert demonstrations.

Rollouts are driven by the env's expert (``uses_expert``): every step records the observation
and the expert's clean action, while the env executes that action plus Gaussian noise
(``expert_noise``), so the demonstrations also cover recoveries from small mistakes (DART,
Laskey et al. 2017). The loss is the negative log-likelihood of the expert action under the
policy; for OpenVLA that is the next-token cross-entropy on the action tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlplat.algos.base import Algorithm
from rlplat.algos.losses import masked_mean
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.policies.base import EvalOutput
from rlplat.registry import checked, register


def bc_loss(logprobs: torch.Tensor, num_tokens: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of demonstrated actions, per action token.

    Args:
        logprobs: log pi(a*|s) [B] of the demonstrated actions, summed over their tokens/dims.
        num_tokens: Tokens (or dims) summed in ``logprobs``; dividing by it gives the per-token
            cross-entropy that OpenVLA's fine-tuning reports.
        mask: Rows to count [B] (default: all).
    """
    return masked_mean(-logprobs, mask) / num_tokens


@dataclass
class SFTConfig:
    """Behaviour cloning on the env's scripted expert (rlplat/algos/sft.py)."""

    # Env steps per env per iteration (demonstration rows = num_envs x rollout_steps).
    rollout_steps: int = checked(50, ge=1)
    # Std of the Gaussian noise added to the executed expert action (the label stays clean).
    expert_noise: float = checked(0.3, ge=0)
    # Compute action statistics (q01/q99) from the first demonstrations and give them to the policy.
    compute_action_stats: bool = True
    # Name of those statistics (OpenVLA's unnorm_key); null: the env class name in lower case.
    stats_key: str | None = None
    # Minibatches per epoch (num_envs * rollout_steps must divide evenly). 50 gives 64-row steps at
    # the default 64 envs x 50 steps: behaviour cloning from scratch learns faster with many small steps.
    num_minibatches: int = checked(50, ge=1)
    # Passes over each batch of demonstrations.
    update_epochs: int = checked(1, ge=1)
    # Stop the epoch loop once approx KL exceeds this (null: never; unused by SFT).
    target_kl: float | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, max_grad_norm=1.0))


@register("algo", "sft", SFTConfig)
class SFT(Algorithm):
    """Behaviour cloning: continuing expert rollouts, NLL of the expert's actions."""

    needs_value = False
    needs_final_values = False
    uses_expert = True

    def rollout_steps(self, max_episode_steps: int) -> int:
        return int(self.cfg["rollout_steps"])

    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        # Demonstrations need no credit assignment.
        return batch

    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        num_tokens = mb["actions"].shape[-1]
        nll = bc_loss(out.logprobs, num_tokens)
        return nll, {"nll_per_token": nll.detach(), "entropy": out.entropy.mean().detach()}
