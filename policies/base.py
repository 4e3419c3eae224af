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

import numpy as np
import torch
from torch import nn

Observation = Mapping[str, Any]


@dataclass
class ActOutput:
    """What ``ActionPolicy.act`` returns for a batch of B observations."""

    # Env actions [B, A] (continuous) ready to send to the env.
    actions: torch.Tensor
    # log pi(a|s) of the sampled actions [B], summed over action dims; or [B, K], one per step
    # for a policy whose action comes out of a chain of K stochastic steps (a diffusion policy's
    # denoising steps: DPPO), which the losses treat as K ratios sharing the row's advantage.
    logprobs: torch.Tensor
    # V(s) [B], or None for policies without a critic.
    values: torch.Tensor | None = None
    # Family-specific tensors to keep with the rollout (e.g. VLA action tokens) [B, ...].
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvalOutput:
    """What ``ActionPolicy.evaluate_actions`` returns for given observations and actions."""

    # log pi(a|s) under the current parameters, shaped as ``ActOutput.logprobs`` ([B] or [B, K]).
    logprobs: torch.Tensor
    # Entropy of pi(.|s) [B].
    entropy: torch.Tensor
    # V(s) [B], or None for policies without a critic.
    values: torch.Tensor | None = None


class TrainableModule(nn.Module):
    """The training hooks every policy family shares; families override what they need."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its ``lr`` (default: every trainable weight at ``lr``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights training changes: what checkpoints store and weight syncs copy."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads what ``trainable_state_dict`` returned (strictly)."""
        self.load_state_dict(dict(state))

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path | None:
        """Exports the policy in its ecosystem's format (None: nothing beyond the checkpoint)."""
        return None


class ActionPolicy(TrainableModule, abc.ABC):
    """A stochastic policy (optionally with a critic) over batched observations."""

    #: Whether ``values`` are produced (PPO needs a critic; GRPO does not).
    has_value: bool = True

    @abc.abstractmethod
    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        """Samples (or takes the mode of) actions for a batch of observations."""

    @abc.abstractmethod
    def evaluate_actions(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        """Log-probabilities and entropy of given actions, plus values, with gradients."""

    def value(self, obs: Observation) -> torch.Tensor:
        """V(s) [B] for bootstrapping; raises for policies without a critic."""
        raise NotImplementedError(f"{type(self).__name__} has no value head")

    # ---- training hooks with defaults; families override what they need -------------------

    #: Whether ``evaluate_actions_reference`` scores under the frozen reference without a second copy
    #: (e.g. a LoRA policy with its adapter disabled). Otherwise the trainer keeps a frozen copy.
    reference_is_builtin: bool = False

    def evaluate_actions_reference(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        """``evaluate_actions`` under the reference policy, for policies with ``reference_is_builtin``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no built-in reference")

    def observe(self, obs: Observation, reduce: Callable[[list[float]], list[float]] | None = None) -> None:
        """Folds a training batch into the policy's input statistics (a no-op unless the policy
        normalises its observations). ``reduce`` averages floats over data-parallel ranks holding
        equal shards, so every rank keeps the same statistics."""

    def set_action_stats(self, stats: Mapping[str, Any], key: str) -> None:
        """Adopts action statistics computed from demonstrations (``compute_stats`` format).

        Policies that act in a normalised action space (OpenVLA's bins) unnormalise with them;
        the default ignores them (a Gaussian policy acts in env units directly).
        """


class DiffusionPolicy(TrainableModule, abc.ABC):
    """A text-to-image denoiser whose sampling steps have tractable log-probabilities.

    What the image algorithms call: sampling with the trajectory recorded (DDPO, D3PO), the
    log-probability of one recorded step under the current weights, and the denoising-loss
    pieces (noise clean latents, predict, the target), which diffusion SFT and Diffusion-DPO use.
    Latents are the diffusion space [B, C, h, w]; images are uint8 [B, H, W, 3].
    """

    #: Images per denoiser batch when a caller samples more (the rollout worker splits requests).
    sample_batch_size: int = 64
    #: Whether ``adapter_disabled`` gives the reference model (LoRA) without a second copy.
    reference_is_builtin: bool = False

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latents (C, h, w)."""

    @abc.abstractmethod
    def sample_trajectory(self, prompts: Sequence[str], generator: torch.Generator | None = None,
                          latents: torch.Tensor | None = None, guidance_scale: float | None = None) -> Any:
        """Samples images for ``prompts`` (from ``latents`` = x_T when given) and records the chain: a
        Batch with ``latents`` and ``next_latents`` [B, T, ...] (x_t, x_{t-1}), ``timesteps`` [B, T],
        per-step ``logprobs`` [B, T], ``images`` and ``prompts`` (extras)."""

    @abc.abstractmethod
    def step_logprob(self, latents_t: torch.Tensor, latents_prev: torch.Tensor, t: torch.Tensor, cond: Any
                     ) -> torch.Tensor:
        """log p(latents_prev | latents_t, t, cond) [B] with gradients, reduced as the config names."""

    @abc.abstractmethod
    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, noise, t)``: clean latents noised at training timesteps (the forward process);
        ``noise`` / ``t`` not given are drawn (standard normal, uniform timesteps) with ``generator``.
        Diffusion-DPO noises both images of a pair with the same ``noise`` and ``t``."""

    @abc.abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The denoiser's conditional output at (x_t, t) for ``prompts``, with gradients (no guidance)."""

    @abc.abstractmethod
    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``predict`` regresses for clean latents ``x0`` noised with ``noise`` at ``t`` (noise,
        velocity or x0, per the model's prediction type): the denoising loss's target."""

    @abc.abstractmethod
    def images_to_latents(self, images: Any) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> latents."""

    @abc.abstractmethod
    def latents_to_images(self, latents: torch.Tensor) -> Any:
        """Latents -> uint8 images [B, H, W, 3] (numpy)."""

    def adapter_disabled(self) -> Any:
        """A context in which the policy is its reference model (needs ``reference_is_builtin``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no built-in reference")


# --------------------------------------------------------------------------- action statistics


def compute_stats(
    actions: np.ndarray,
    proprio: np.ndarray | None = None,
    num_trajectories: int | None = None,
    mask: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """One dataset's entry of ``dataset_statistics.json`` from its transitions.

    Args:
        actions: All actions of the dataset [N, D], trajectories concatenated.
        proprio: Proprioceptive states [N, P]; None records the statistics of zeros shaped like
            ``actions``, as OpenVLA does for datasets without proprio.
        num_trajectories: Number of trajectories in ``actions``; None records 1 (the array is
            taken as one trajectory).
        mask: Per action dim, whether to (un)normalise it. Default: all True. OpenVLA's Open-X
            datasets (EEF_POS) use ``[True] * 6 + [False]``, leaving the gripper dim as is;
            pass that for data whose last dim is an absolute gripper command.

    Returns:
        ``{"action": {mean, std, max, min, q01, q99, mask}, "proprio": {mean, std, max, min,
        q01, q99}, "num_transitions": N, "num_trajectories": T}``, lists of python numbers,
        q01/q99 being ``np.quantile`` at 0.01/0.99 (as OpenVLA). Store it under a key:
        ``save_stats({"my_dataset": entry}, path)``.
    """
    a = _as_float_2d(actions, "actions")
    n, d = a.shape
    p = np.zeros_like(a) if proprio is None else _as_float_2d(proprio, "proprio")
    if p.shape[0] != n:
        raise ValueError(f"proprio has {p.shape[0]} rows but actions has {n}; pass one per transition")
    if mask is None:
        mask = [True] * d
    mask = [bool(m) for m in mask]
    if len(mask) != d:
        raise ValueError(f"mask has {len(mask)} entries but actions have {d} dims; pass one per dim")
    if num_trajectories is None:
        num_trajectories = 1
    if int(num_trajectories) != num_trajectories or not 1 <= num_trajectories <= n:
        raise ValueError(f"num_trajectories must be an integer in [1, {n}], got {num_trajectories!r}")
    return {
        "action": {**_moments(a), "mask": mask},
        "proprio": _moments(p),
        "num_transitions": int(n),
        "num_trajectories": int(num_trajectories),
    }


def _moments(x: np.ndarray) -> dict[str, list[float]]:
    """OpenVLA get_dataset_statistics: mean, std (ddof=0), max, min, q01, q99 per dim."""
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "max": x.max(0).tolist(),
        "min": x.min(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def _as_float_2d(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {arr.shape}")
    # Keep a floating dtype as given (OpenVLA computes on float32 data); integers become float64.
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)
