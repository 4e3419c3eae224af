"""Diffusion-DPO (Wallace et al. 2023): DPO on pairs of images through the denoising loss.

For a preferred image ``w`` and the other ``l`` of one caption, both noised with the same noise
at the same timestep, the per-sample squared prediction errors of the trained model and of the
reference (the model with its LoRA adapter disabled, or a frozen copy) give

    loss = -log sigmoid(-(beta / 2) * ((err_w - ref_err_w) - (err_l - ref_err_l)))

per pair: the model is pushed to denoise the preferred image better than the reference does,
and the other one worse. ``beta`` is large (thousands for SD1.5) because the errors are means
over latent elements.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlplat.algos.base import BatchArithmeticError, PreferenceAlgorithm
from rlplat.algos.optim import OptimConfig, OptimizerStep
from rlplat.batch import Batch
from rlplat.registry import checked, register


def diffusion_dpo_loss(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and the implicit accuracy.

    Args:
        model_err_w, model_err_l: the trained model's mean squared prediction error (against the
            target of its ``prediction_type``) on the preferred / other image [P].
        ref_err_w, ref_err_l: the same errors under the reference [P] (no gradient needed).
        beta: the DPO temperature.

    Returns:
        ``(loss [P], implicit_acc)``: the loss per pair (reduce outside) and the fraction of
        pairs whose argument ``-(beta / 2) * (...)`` is positive (the model already prefers ``w``
        more than the reference does). Equal model and reference give ``log 2`` and 0.
    """
    if not model_err_w.shape == model_err_l.shape == ref_err_w.shape == ref_err_l.shape:
        raise ValueError(f"diffusion_dpo_loss needs equal [P] shapes, got {tuple(model_err_w.shape)}, "
                         f"{tuple(model_err_l.shape)}, {tuple(ref_err_w.shape)}, {tuple(ref_err_l.shape)}")
    inside = -0.5 * beta * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))
    return -F.logsigmoid(inside), (inside > 0).float().mean()


# --------------------------------------------------------------------------- the algorithm


def pair_errors(policy: Any, images_w: Any, images_l: Any, prompts: Sequence[str], generator: torch.Generator,
                reference: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model_err_w, model_err_l, ref_err_w, ref_err_l)`` [P] for P pairs of uint8 images.

    Both images of a pair are noised with the same noise at the same uniform timestep; each error
    is the mean over latent elements of the squared difference between the prediction and the
    policy's ``prediction_target``. The reference errors come from ``reference`` (a frozen copy)
    or, when it is None, from the policy with its LoRA adapter disabled; they carry no gradient.
    """
    x0_w, x0_l = policy.images_to_latents(np.concatenate([images_w, images_l])).chunk(2)
    if tuple(x0_w.shape[1:]) != tuple(policy.latent_shape):
        raise ValueError(f"the pairs' images give latents of shape {tuple(x0_w.shape[1:])}, the policy's are "
                         f"{tuple(policy.latent_shape)}: set preference.resolution to the model's image size")
    x_w, noise, t = policy.noised(x0_w, generator)
    x_l, _, _ = policy.noised(x0_l, noise=noise, t=t)
    x_t, t2, text = torch.cat([x_w, x_l]), torch.cat([t, t]), [*prompts, *prompts]
    target = torch.cat([policy.prediction_target(x0_w, noise, t), policy.prediction_target(x0_l, noise, t)]).float()

    def errors(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(model.parameters()).dtype if model is reference else x_t.dtype  # a bf16 reference copy
        err = (model.predict(x_t.to(dtype), t2, text).float() - target).pow(2).flatten(1).mean(1)
        return err.chunk(2)

    err_w, err_l = errors(policy)
    with torch.no_grad():
        if reference is not None:
            ref_w, ref_l = errors(reference)
        else:
            with policy.adapter_disabled():
                ref_w, ref_l = errors(policy)
    return err_w, err_l, ref_w, ref_l


@dataclass
class DPOConfig:
    """Diffusion-DPO on pairs of a preference dataset (rlplat/algos/dpo.py).

    Batch arithmetic: an optimizer step sees ``batch_size`` pairs, whatever the number of
    devices; each forward pass takes ``micro_batch`` pairs, so a step accumulates
    ``batch_size / micro_batch`` passes on one actor (the paper's SD1.5 run: 2048 pairs per step
    = 16 GPUs x 1 pair x 128 accumulation). An iteration is ``num_minibatches`` steps.
    """

    # DPO temperature on the errors' difference (the paper: 5000 for SD1.5; errors are means over latent elements).
    beta: float = checked(5000.0, gt=0)
    # Pairs per optimizer step.
    batch_size: int = checked(64, ge=1)
    # Pairs per forward pass (gradient accumulation over batch_size / micro_batch passes).
    micro_batch: int = checked(64, ge=1)
    # Optimizer steps per iteration (fresh pairs each).
    num_minibatches: int = checked(1, ge=1)
    # The reference: auto (the adapter disabled with LoRA, else a frozen copy), adapter or frozen_copy.
    reference: str = checked("auto", choices=("auto", "adapter", "frozen_copy"))
    # Optimizer (AdamW). The paper's full fine-tuning lr is 1e-8 per pair of the batch (2.048e-5 at 2048).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, eps=1e-8, max_grad_norm=1.0))


@register("algo", "dpo", DPOConfig)
class DiffusionDPO(PreferenceAlgorithm):
    """Diffusion-DPO (``diffusion_dpo_loss``) on the pairs an offline collector reads from a dataset.

    The batch holds ``images_w`` and ``images_l`` (uint8 [N, H, W, 3], the preferred image first)
    and ``prompts`` (extras), N = ``batch_size x num_minibatches``. The reference is the policy
    with its LoRA adapter disabled, or (full fine-tuning, ``policy.lora.r=0``) a frozen copy
    taken before the first update (bfloat16 on a GPU).
    """

    samples_per_prompt = 0
    source_kind = "pairs"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        self.reference_model: Any = None

    def check(self, lora_rank: int) -> None:
        batch, micro = int(self.cfg["batch_size"]), int(self.cfg["micro_batch"])
        if micro > batch or batch % micro:
            raise BatchArithmeticError(f"algo.batch_size={batch} pairs per step is not a multiple of "
                                       f"algo.micro_batch={micro} pairs per pass; use a divisor of {batch}")
        if self.cfg["reference"] == "adapter" and lora_rank <= 0:
            raise ValueError(f"algo.reference=adapter needs a LoRA adapter to disable, but policy.lora.r={lora_rank}: "
                             f"set policy.lora.r>0, or algo.reference=auto (a frozen copy for full fine-tuning)")

    def attach(self, policy: Any) -> None:
        if self.cfg["reference"] == "frozen_copy" or not policy.reference_is_builtin:
            self.reference_model = frozen_copy(policy)

    def update(
        self,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        generator: torch.Generator,
        sync_grads: Callable[[], None] | None = None,
        sync_mean: Callable[[list[float]], list[float]] | None = None,
    ) -> dict[str, float]:
        """``num_minibatches`` optimizer steps of ``batch_size`` pairs, ``micro_batch`` pairs per pass."""
        stepper = OptimizerStep(optimizer, self.optim["max_grad_norm"], sync_grads, sync_mean)
        images_w, images_l, prompts = batch["images_w"].numpy(), batch["images_l"].numpy(), list(batch["prompts"])
        size, micro, beta = int(self.cfg["batch_size"]), int(self.cfg["micro_batch"]), float(self.cfg["beta"])
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for start in range(0, len(prompts), size):
            stop = min(start + size, len(prompts))
            stepper.begin()
            parts: dict[str, float] = defaultdict(float)
            for lo in range(start, stop, micro):
                hi = min(lo + micro, stop)
                err_w, err_l, ref_w, ref_l = pair_errors(policy, images_w[lo:hi], images_l[lo:hi], prompts[lo:hi],
                                                         generator, self.reference_model)
                loss, acc = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
                share = (hi - lo) / (stop - start)
                if not stepper.backward(loss.mean() * share):
                    break
                for key, value in (("loss", loss.mean()), ("implicit_acc", acc), ("model_err_w", err_w.mean()),
                                   ("model_err_l", err_l.mean()), ("ref_err_w", ref_w.mean()),
                                   ("ref_err_l", ref_l.mean())):
                    parts[key] += float(value.detach()) * share
            grad_norm = stepper.finish()
            if grad_norm is None:
                continue
            parts["grad_norm"] = grad_norm
            for key, value in parts.items():
                sums[key] += value
            steps += 1
        result = {f"train/{k}": v / max(steps, 1) for k, v in sums.items()}
        # How much better than the reference the model denoises the preferred image, minus the same for the other.
        if steps:
            result["train/reward_margin"] = -beta / 2 * (
                (result["train/model_err_w"] - result["train/ref_err_w"])
                - (result["train/model_err_l"] - result["train/ref_err_l"]))
        result["train/minibatches"] = float(steps)
        result["train/skipped_nonfinite"] = float(stepper.skipped)
        return result


def frozen_copy(policy: Any) -> Any:
    """A copy of ``policy`` that never trains (bfloat16 on a GPU): the full fine-tuning reference."""
    import copy

    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    reference.eval()
    if next(reference.parameters()).is_cuda:
        reference.to(torch.bfloat16)
    return reference
