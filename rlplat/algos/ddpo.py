"""DDPO and GRPO for diffusion: policy gradients on the denoising steps of sampled images.

DDPO (Black et al. 2023): each image's reward becomes an advantage, normalised per prompt by a
running ``PerPromptStatTracker`` (global statistics until a prompt has ``min_count`` scores),
clipped to +-``adv_clip_max``, and every denoising step of the image gets a PPO-clip update on
its step ratio ``exp(logp - old_logp)``. With "mean"-reduced log-probs the ratios stay close to
1, so the clip range is tiny (1e-4, DDPO's default). GRPO for diffusion replaces the tracker by
group-normalised advantages over the G images sampled for the same prompt
(``rlplat.algos.advantages.group_normalized_advantages``).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlplat.algos.advantages import group_normalized_advantages
from rlplat.algos.base import STEP_WEIGHTS, PreferenceAlgorithm
from rlplat.algos.losses import ppo_policy_loss
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.registry import checked, register


class PerPromptStatTracker:
    """Running per-prompt reward statistics (DDPO's stat tracking).

    Args:
        buffer_size: Scores kept per prompt (the oldest are dropped).
        min_count: A prompt with fewer scores is normalised with the batch's global statistics.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size} and min_count={min_count} must be >= 1")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts: Sequence[str], rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
        """Adds the scores, then returns advantages (r - mean) / (std + eps) per row [B]."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"got {len(rewards)} rewards but {len(prompts)} prompts")
        advantages = np.empty_like(rewards)
        global_mean, global_std = rewards.mean(), rewards.std()
        for prompt in dict.fromkeys(prompts):
            rows = np.array([p == prompt for p in prompts])
            self.buffers[prompt].extend(rewards[rows].tolist())
            history = np.asarray(self.buffers[prompt])
            mean, std = (history.mean(), history.std()) if len(history) >= self.min_count else (global_mean, global_std)
            advantages[rows] = (rewards[rows] - mean) / (std + eps)
        return advantages

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers.clear()
        for prompt, values in state.items():
            self.buffers[prompt].extend(values)


def ddpo_step_loss(
    policy: Any, traj: Batch, step: int, advantages: torch.Tensor, clip_coef: float = 1e-4,
    adv_clip_max: float = 5.0, kl_coef: float = 0.0, kl_to_base_rows: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of denoising step ``step`` for the trajectories in ``traj`` (with gradients).

    ``traj`` is ``sample_trajectory``'s Batch (its ``logprobs`` are the old log-probs);
    ``advantages`` [B] per image. With ``kl_coef`` > 0 the k3 KL estimate to the adapter-disabled
    reference (LoRA) is added. ``kl_to_base``, half the mean squared log-ratio to that reference,
    is measured on every row when ``kl_coef`` > 0, else on the first ``kl_to_base_rows`` rows
    (0: not measured).
    """
    prompts = list(traj["prompts"])
    t = traj["timesteps"][:, step]
    logp = policy.step_logprob(traj["latents"][:, step], traj["next_latents"][:, step], t, prompts)
    old = traj["logprobs"][:, step].to(logp)
    adv = advantages.to(logp).clamp(-adv_clip_max, adv_clip_max)
    loss, metrics = ppo_policy_loss(logp, old, adv, clip_coef)
    rows = len(prompts) if kl_coef > 0 else min(int(kl_to_base_rows), len(prompts))
    if rows > 0:
        with torch.no_grad(), policy.adapter_disabled():
            ref = policy.step_logprob(traj["latents"][:rows, step], traj["next_latents"][:rows, step], t[:rows],
                                      prompts[:rows])
        log_ratio = ref - logp[:rows]
        metrics["kl_to_base"] = 0.5 * (log_ratio.detach() ** 2).mean()
        if kl_coef > 0:
            kl = (log_ratio.exp() - 1 - log_ratio).mean()
            loss = loss + kl_coef * kl
            metrics["kl"] = kl.detach()
    return loss, metrics


# algo.advantage -> (algo, prompts, scores [B]) -> advantages [B]: normalised within the group_size
# samples of each prompt (GRPO for diffusion) or by the prompt's running statistics (DDPO).
ADVANTAGES = {
    "group": lambda algo, prompts, scores: group_normalized_advantages(torch.as_tensor(scores, dtype=torch.float32),
                                                                         algo.samples_per_prompt),
    "per_prompt": lambda algo, prompts, scores: torch.as_tensor(algo.tracker.update(prompts, scores),
                                                                dtype=torch.float32),
}


@dataclass
class DDPOConfig:
    """DDPO / GRPO for diffusion: PPO-clip on the denoising-step ratios (rlplat/algos/ddpo.py)."""

    # Prompts per iteration.
    batch_size: int = checked(8, ge=1)
    # Samples per prompt (the group of advantage=group).
    group_size: int = checked(4, ge=1)
    # per_prompt (DDPO's running per-prompt statistics) or group (GRPO: normalised within the group).
    advantage: str = checked("group", choices=tuple(ADVANTAGES))
    # Scores kept per prompt by the tracker (advantage=per_prompt).
    tracker_buffer_size: int = checked(32, ge=1)
    # Scores a prompt needs before its own statistics are used (advantage=per_prompt).
    tracker_min_count: int = checked(16, ge=1)
    # Minibatches (optimizer steps) per epoch.
    num_minibatches: int = checked(2, ge=1)
    # Passes over each iteration's samples.
    update_epochs: int = checked(1, ge=1)
    # Share of the denoising steps trained per minibatch (drawn at random).
    timestep_fraction: float = checked(1.0, gt=0, le=1)
    # Denoising steps nearest the image that get no update (0: every step trains). The last DDIM
    # step has the smallest std, so its log-ratio moves most per weight change.
    skip_final_steps: int = checked(0, ge=0)
    # Denoising steps nearest the noise that get no update (0: every step trains): those steps lay
    # the image out (which shapes, where), so skipping them leaves the layout to the base model
    # and tunes only how it is rendered.
    skip_initial_steps: int = checked(0, ge=0)
    # Loss weight of each denoising step: uniform (the paper's) or output_scale (divided by how
    # strongly the step's log-prob responds to the model output, so the low-noise steps near the
    # image stop drowning out the ones that place shapes: rlplat.algos.base.step_weights).
    step_weight: str = checked("uniform", choices=tuple(STEP_WEIGHTS))
    # Draw each iteration's samples along the deterministic DDIM path except at one random step
    # (of the trainable ones), from one x_T per prompt, and train that step only: the group's
    # differences are then that step's doing (rlplat.algos.base.PreferenceAlgorithm.branch_step).
    branch: bool = False
    # Sample each prompt's group from one x_T (as D3PO's pairs): the group's images then share the
    # layout the first steps draw from x_T and differ by the sampler's noise, so with
    # skip_initial_steps the advantages credit the steps that train rather than x_T.
    share_noise: bool = False
    # With skip_initial_steps: the rows of a group also share the sampler's noise at the untrained
    # initial steps (implies share_noise), so they part where training starts and their scores
    # compare what the trained steps drew rather than a layout the untrained steps drew differently.
    share_prefix: bool = False
    # Clip range of the step ratio (tiny: log-probs are means over elements).
    clip_coef: float = checked(1e-4, gt=0)
    # Advantages are clipped to +- this.
    adv_clip_max: float = checked(5.0, gt=0)
    # Weight of the k3 KL to the adapter-disabled reference (needs LoRA; 0: none).
    kl_coef: float = checked(0.0, ge=0)
    # Rows of each minibatch whose log-ratio to the base (LoRA disabled) is measured, without
    # gradients, for train/kl_to_base (0: not measured; every row when kl_coef > 0). A few rows keep
    # the measurement to a few % of the update (one extra forward on 4 of 16 rows).
    kl_to_base_rows: int = checked(4, ge=0)
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, eps=1e-8, max_grad_norm=1.0))


@register("algo", "ddpo", DDPOConfig, renamed={"clip_range": "clip_coef"})
class DDPO(PreferenceAlgorithm):
    """DDPO (``advantage=per_prompt``, running per-prompt statistics) or GRPO for diffusion
    (``advantage=group``: normalised over the ``group_size`` samples of each prompt)."""

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        if cfg["advantage"] not in ADVANTAGES:
            raise ValueError(f"algo.advantage={cfg['advantage']!r} must be one of {tuple(ADVANTAGES)}")
        self.advantages = ADVANTAGES[cfg["advantage"]]
        self.samples_per_prompt = int(cfg["group_size"])
        # A group shares x_T when asked (algo.share_noise), when branching (its differences are
        # then the branch step's noise alone) and when it shares the untrained steps' noise.
        self.share_noise = bool(cfg.get("share_noise", False) or cfg.get("branch", False)
                                or cfg.get("share_prefix", False))
        if cfg["advantage"] == "group" and self.samples_per_prompt < 2:
            raise ValueError(f"algo.advantage=group needs algo.group_size >= 2 (got {self.samples_per_prompt}): "
                             f"a group of one image has no baseline")
        self.tracker = PerPromptStatTracker(cfg["tracker_buffer_size"], cfg["tracker_min_count"])

    @property
    def needs_adapter_reference(self) -> bool:
        return float(self.cfg.get("kl_coef", 0.0)) > 0

    def prepare(self, traj: Batch, scores: np.ndarray, source: Any, rng: np.random.Generator
                ) -> tuple[Batch, dict[str, float]]:
        """Adds per-image ``advantages`` to the trajectories."""
        adv = self.advantages(self, list(traj["prompts"]), scores)
        traj = traj.select(*(k for k in traj if k != "images"))
        traj["advantages"] = adv
        return traj, {"train/advantage_abs": float(adv.abs().mean())}

    def update(self, policy: Any, optimizer: torch.optim.Optimizer, batch: Batch, generator: torch.Generator,
               *args: Any, **kwargs: Any) -> dict[str, float]:
        return super().update(policy, optimizer, self.trained_part(batch), generator, *args, **kwargs)

    def step_loss(self, policy: Any, mb: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Without an adapter there is no base to compare with: kl_to_base is not measured.
        kl_rows = int(self.cfg.get("kl_to_base_rows", 0)) if getattr(policy, "reference_is_builtin", False) else 0
        return ddpo_step_loss(policy, mb, step, mb["advantages"], float(self.cfg["clip_coef"]),
                              float(self.cfg["adv_clip_max"]), float(self.cfg.get("kl_coef", 0.0)), kl_rows)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))
