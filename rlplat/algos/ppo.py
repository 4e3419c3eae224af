"""PPO (Schulman et al. 2017) with GAE, as in cleanrl's continuous-action PPO."""

from __future__ import annotations

import torch

from rlplat.algos.advantages import gae, normalize
from rlplat.algos.base import Algorithm
from rlplat.algos.losses import entropy_bonus, ppo_policy_loss, value_loss
from rlplat.batch import Batch
from rlplat.policies.base import EvalOutput


def bootstrap_next_values(
    values: torch.Tensor,
    last_values: torch.Tensor,
    final_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
) -> torch.Tensor:
    """V(s_{t+1}) as seen by each step of a rollout with same-step auto-reset.

    Args:
        values: V(s_t) [T, N] recorded during the rollout.
        last_values: V(s_T) [N] of the observation after the last step.
        final_values: V(final obs) [T, N] where the episode was truncated (else ignored).
        terminated: [T, N] episode reached a terminal state at step t (no bootstrap: 0).
        truncated: [T, N] episode hit its time limit at step t (bootstrap from the final obs).

    Returns:
        next_values [T, N]: the next row of ``values`` (or ``last_values``) while the episode
        goes on, V(final obs) after a truncation, 0 after a termination.
    """
    following = torch.cat([values[1:], last_values.unsqueeze(0)], dim=0)
    next_values = torch.where(truncated.bool(), final_values, following)
    return torch.where(terminated.bool(), torch.zeros_like(next_values), next_values)


class PPO(Algorithm):
    """Clipped-surrogate PPO on continuing rollouts of ``rollout_steps`` per env."""

    def rollout_steps(self, max_episode_steps: int) -> int:
        return int(self.cfg["rollout_steps"])

    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        shape = (num_steps, num_envs)
        values = batch["values"].view(shape)
        terminated, truncated = batch["terminated"].view(shape), batch["truncated"].view(shape)
        next_values = bootstrap_next_values(
            values, batch.meta["last_values"], batch["final_values"].view(shape), terminated, truncated
        )
        advantages, returns = gae(
            batch["rewards"].view(shape), values, next_values, terminated | truncated,
            self.cfg["gamma"], self.cfg["gae_lambda"],
        )
        batch["advantages"] = advantages.reshape(-1)
        batch["returns"] = returns.reshape(-1)
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
