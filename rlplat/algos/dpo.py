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

import torch
import torch.nn.functional as F


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
