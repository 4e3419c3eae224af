"""Supervised (pre)training of a text-to-image diffusion model: the standard denoising loss.

For clean latents x0 (images through the VAE, or pixel-folded), noise eps ~ N(0, I) and a
uniform training timestep t, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (the scheduler's
``add_noise``); the UNet regresses eps (or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for
v-prediction) from (x_t, t, prompt). A fraction ``cond_dropout`` of prompts is replaced by the
empty prompt so the same model also predicts unconditionally (classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlplat.algos.base import PreferenceAlgorithm
from rlplat.algos.optim import OptimConfig, OptimizerStep
from rlplat.batch import Batch
from rlplat.registry import checked, register


def denoising_loss(
    policy: Any,
    images: np.ndarray,
    prompts: Sequence[str],
    generator: torch.Generator | None = None,
    cond_dropout: float = 0.1,
) -> torch.Tensor:
    """Mean squared error of the UNet's prediction on noised ``images`` (uint8 [B, H, W, 3]).

    ``policy`` is a ``DiffusionPolicy`` (``images_to_latents``, ``noised``, ``predict``,
    ``prediction_target``). ``generator`` draws the noise, timesteps and prompt dropout (CPU).
    """
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout={cond_dropout} must be in [0, 1)")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    x0 = policy.images_to_latents(images)
    x_t, noise, t = policy.noised(x0, generator)
    dropped = torch.rand(len(prompts), generator=generator) < cond_dropout
    text = [("" if drop else p) for p, drop in zip(prompts, dropped.tolist())]
    pred = policy.predict(x_t, t, text)
    return F.mse_loss(pred.float(), policy.prediction_target(x0, noise, t).float())


@dataclass
class DiffusionSFTConfig:
    """Denoising-loss (pre)training on the source's demonstrations (rlplat/algos/diffusion_sft.py)."""

    # Images per optimizer step.
    batch_size: int = checked(64, ge=1)
    # Optimizer steps per iteration (fresh demonstrations each).
    num_minibatches: int = checked(50, ge=1)
    # Share of captions replaced by the empty prompt (trains the unconditional branch for guidance).
    cond_dropout: float = checked(0.1, ge=0, le=1)
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, eps=1e-8, max_grad_norm=1.0))


@register("algo", "diffusion_sft", DiffusionSFTConfig)
class DiffusionSFT(PreferenceAlgorithm):
    """Denoising-loss (pre)training on the source's captioned demonstrations.

    Each iteration the controller draws ``batch_size x num_minibatches`` fresh demonstrations
    (the shapes world renders them on the fly, so nothing repeats); the worker takes one
    optimizer step per minibatch of ``batch_size``.
    """

    samples_per_prompt = 0

    def check(self, lora_rank: int) -> None:
        if int(self.cfg["batch_size"]) < 1 or int(self.cfg["num_minibatches"]) < 1:
            raise ValueError(f"algo.batch_size={self.cfg['batch_size']} and algo.num_minibatches="
                             f"{self.cfg['num_minibatches']} must be >= 1")

    def check_source(self, data: Any) -> None:
        if not data.has_demonstrations:
            raise ValueError(
                f"diffusion_sft trains on captioned images, but the preference source's prompt set "
                f"({type(data).__name__}) has prompts only: use a prompt set with "
                f"demonstrations (rlplat.envs.preference.shapes.ShapesPrompts, e.g. preference=shapes_fidelity)"
            )

    def update(
        self,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        generator: torch.Generator,
        sync_grads: Callable[[], None] | None = None,
        sync_mean: Callable[[list[float]], list[float]] | None = None,
    ) -> dict[str, float]:
        """One optimizer step of ``denoising_loss`` per minibatch of demonstrations."""
        stepper = OptimizerStep(optimizer, self.optim["max_grad_norm"], sync_grads, sync_mean)
        images, prompts = batch["images"].numpy(), list(batch["prompts"])
        losses, norms = [], []
        size = int(self.cfg["batch_size"])
        for start in range(0, len(prompts), size):
            loss = denoising_loss(policy, images[start:start + size], prompts[start:start + size], generator,
                                  float(self.cfg["cond_dropout"]))
            grad_norm = stepper.step(loss)
            if grad_norm is None:
                continue
            norms.append(grad_norm)
            losses.append(loss.item())
        return {"train/loss": float(np.mean(losses)) if losses else float("nan"),
                "train/grad_norm": float(np.mean(norms)) if norms else float("nan"),
                "train/minibatches": float(len(losses)), "train/skipped_nonfinite": float(stepper.skipped)}
