"""Policy contracts shared by every family.

An ``ActionPolicy`` maps batched observations to actions for embodied RL (PPO, GRPO, SFT); a
``DiffusionPolicy`` samples images with per-step log-probabilities for preference tuning. The
trainer only talks to these methods, so a new family plugs in by implementing them.

Observations are a mapping (a dict, or an ``rlplat.batch.Batch``) with the VectorEnv keys:
``state`` float [B, S], ``proprio`` float [B, P], ``image`` uint8 [B, H, W, 3] and
``instruction`` (a sequence of B strings). A policy reads the keys it needs.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Observation = Mapping[str, Any]


@dataclass
class ActOutput:
    """What ``ActionPolicy.act`` returns for a batch of B observations."""

    # Env actions [B, A] (continuous) ready to send to the env.
    actions: torch.Tensor
    # log pi(a|s) of the sampled actions [B], summed over action dims.
    logprobs: torch.Tensor
    # V(s) [B], or None for policies without a critic.
    values: torch.Tensor | None = None
    # Family-specific tensors to keep with the rollout (e.g. VLA action tokens) [B, ...].
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvalOutput:
    """What ``ActionPolicy.evaluate`` returns for given observations and actions."""

    # log pi(a|s) [B] under the current parameters, summed over action dims.
    logprobs: torch.Tensor
    # Entropy of pi(.|s) [B].
    entropy: torch.Tensor
    # V(s) [B], or None for policies without a critic.
    values: torch.Tensor | None = None


class ActionPolicy(nn.Module, abc.ABC):
    """A stochastic policy (optionally with a critic) over batched observations."""

    #: Whether ``values`` are produced (PPO needs a critic; GRPO does not).
    has_value: bool = True

    @classmethod
    def preflight(cls, **kwargs: Any) -> None:
        """Checks, before any worker starts, what a constructor call with ``kwargs`` needs from
        the machine (weights on disk, ...); raises ValueError/FileNotFoundError naming the fix."""

    @abc.abstractmethod
    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        """Samples (or takes the mode of) actions for a batch of observations."""

    @abc.abstractmethod
    def evaluate(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        """Log-probabilities and entropy of given actions, plus values, with gradients."""

    def value(self, obs: Observation) -> torch.Tensor:
        """V(s) [B] for bootstrapping; raises for policies without a critic."""
        raise NotImplementedError(f"{type(self).__name__} has no value head")

    # ---- training hooks with defaults; families override what they need -------------------

    #: Whether ``evaluate_reference`` scores under the frozen reference without a second copy
    #: (e.g. a LoRA policy with its adapter disabled). Otherwise the trainer keeps a frozen copy.
    reference_is_builtin: bool = False

    def evaluate_reference(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        """``evaluate`` under the reference policy, for policies with ``reference_is_builtin``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no built-in reference")

    def observe(self, obs: Observation, reduce: Callable[[list[float]], list[float]] | None = None) -> None:
        """Folds a training batch into the policy's input statistics (a no-op unless the policy
        normalises its observations). ``reduce`` averages floats over data-parallel ranks holding
        equal shards, so every rank keeps the same statistics."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its ``lr`` (default: every trainable weight at ``lr``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights training changes: what checkpoints store and weight syncs copy."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads what ``trainable_state_dict`` returned (strictly)."""
        self.load_state_dict(dict(state))

    def set_action_stats(self, stats: Mapping[str, Any], key: str) -> None:
        """Adopts action statistics computed from demonstrations (``compute_stats`` format).

        Policies that act in a normalised action space (OpenVLA's bins) unnormalise with them;
        the default ignores them (a Gaussian policy acts in env units directly).
        """

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path | None:
        """Exports the policy in its ecosystem's format (None: nothing beyond the checkpoint)."""
        return None


class DiffusionPolicy(nn.Module, abc.ABC):
    """A text-to-image sampler whose denoising steps have tractable log-probabilities."""

    @abc.abstractmethod
    def sample(
        self, prompts: Sequence[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns images [B, 3, H, W], latents per step [B, T+1, ...], step log-probs [B, T]."""

    @abc.abstractmethod
    def step_logprob(
        self, latents_t: torch.Tensor, latents_prev: torch.Tensor, t: torch.Tensor, cond: Any
    ) -> torch.Tensor:
        """log p(latents_prev | latents_t, t, cond) [B], reduced as the config names."""
