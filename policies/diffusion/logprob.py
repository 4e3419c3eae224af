"""One DDIM step as a Gaussian policy step: the previous sample and its log-probability.

With eta > 0, DDIM's update x_t -> x_{t-1} (Song et al. 2021, eq. 12) draws
``x_{t-1} ~ N(mu_t, sigma_t^2 I)`` where
``mu_t = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat`` and
``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``, a = alphas_cumprod.
Treating each denoising step as an action makes the sampler an MDP whose per-step log-probs
feed policy-gradient and preference losses (DDPO, Black et al. 2023; D3PO, Yang et al. 2024).
The coefficients are read from a diffusers ``DDIMScheduler`` (after ``set_timesteps``), so the
step equals ``scheduler.step`` for the same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

REDUCTIONS = ("mean", "sum")


#: The scheduler prediction types the step and the training target understand.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _per_sample(values: torch.Tensor, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[timestep]`` broadcast to ``like`` (timestep: a scalar or one per batch row)."""
    picked = values.to(like.device)[timestep.to(like.device)].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1))) if picked.ndim else picked


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} and log p(x_{t-1} | x_t) under the DDIM step with noise scale ``eta``.

    Args:
        scheduler: A diffusers ``DDIMScheduler`` with ``set_timesteps`` called (its
            ``prediction_type``, ``clip_sample``/``thresholding`` and ``final_alpha_cumprod``
            apply as in ``scheduler.step``).
        model_output: The UNet's prediction [B, ...] (epsilon, v or x0 per ``prediction_type``).
        timestep: The current timestep t, an int or a tensor with one entry per batch row.
        sample: x_t [B, ...].
        eta: DDIM noise scale in (0, 1]; eta = 0 is deterministic and has no density.
        prev_sample: Score this x_{t-1} instead of drawing one (e.g. recomputing a stored
            trajectory's log-probs under updated weights).
        generator: Random generator(s) for the draw (same draw as ``scheduler.step``).
        reduction: "mean" over all non-batch elements (DDPO/D3PO's convention) or "sum" (the
            exact log-density of the whole sample).

    Returns:
        ``(prev_sample, log_prob)``: x_{t-1} [B, ...] (the given one, or a draw) and log-prob [B]
        in float32. The log-prob is differentiable in ``model_output``; ``prev_sample`` enters it
        detached, as a fixed action.

    Raises:
        ValueError: eta <= 0, an unknown reduction or prediction type, or set_timesteps not called.
    """
    if not eta > 0:
        raise ValueError(
            f"eta={eta}: a DDIM step with eta = 0 is deterministic and has no log-probability; "
            f"sample with eta > 0 (DDPO/D3PO use 1.0)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    x0, eps, a_t, a_prev, t, prev_t = _step_predictions(scheduler, model_output, timestep, sample)
    b_t = 1 - a_t
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    if bool((std <= 0).any()):
        raise ValueError(
            f"timestep {t.tolist()} -> {prev_t.tolist()} has zero DDIM variance (alpha_prev == alpha_t), so the "
            f"step is deterministic and has no log-probability; use steps_offset=1 as Stable Diffusion's "
            f"scheduler config does, or set_alpha_to_one=True"
        )
    # With a zero-terminal-SNR schedule (alpha_T = 0) and eta = 1 the first step's direction
    # weight is exactly 0 and may round below it: clamp it (diffusers' scheduler.step gives a NaN).
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = mean + std * noise
    action = prev_sample.detach().float()
    std32 = std.float()
    log_prob = -((action - mean.float()) ** 2) / (2 * std32**2) - torch.log(std32) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.expand_as(action)
    dims = tuple(range(1, action.ndim))
    log_prob = log_prob.mean(dim=dims) if reduction == "mean" else log_prob.sum(dim=dims)
    return prev_sample.to(sample.dtype), log_prob


def _step_predictions(scheduler: Any, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
    """``(x0_hat, eps_hat, a_t, a_prev, t, prev_t)`` of the DDIM step from ``timestep``, as
    ``scheduler.step`` computes them (prediction type, clipping / thresholding, final alpha)."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(num_inference_steps) first")
    config = scheduler.config
    t = torch.as_tensor(timestep, device=sample.device).long()
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    alphas = scheduler.alphas_cumprod.to(sample.device)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=sample.device, dtype=alphas.dtype)
    a_t = _per_sample(alphas, t, sample)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).to(sample.dtype)
    a_prev = a_prev.reshape(-1, *([1] * (sample.ndim - 1))) if a_prev.ndim else a_prev
    b_t = 1 - a_t

    if config.prediction_type == "epsilon":
        x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / b_t.sqrt()
    elif config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    else:
        raise ValueError(f"prediction_type={config.prediction_type!r} must be one of {PREDICTION_TYPES}")
    if config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0, eps, a_t, a_prev, t, prev_t


def ddim_step_deterministic(scheduler: Any, model_output: torch.Tensor, timestep: int | torch.Tensor,
                            sample: torch.Tensor) -> torch.Tensor:
    """x_{t-1} of the deterministic DDIM step (eta = 0: ``sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat``),
    equal to ``scheduler.step(..., eta=0)``; it has no log-probability."""
    x0, eps, _, a_prev, _, _ = _step_predictions(scheduler, model_output, timestep, sample)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def ddim_output_scale(scheduler: Any, timestep: int | torch.Tensor, eta: float) -> torch.Tensor:
    """How strongly the DDIM step's log-prob responds to the model's output: |d mu_t / d output| / sigma_t.

    The step's mean ``mu_t`` is affine in the model output (epsilon, v or x0; clipping and
    thresholding ignored), so the gradient of a step log-prob with respect to that output is
    ``z * (d mu_t / d output) / sigma_t`` per element (``z`` = the step's standard-normal noise):
    this factor. It differs by orders of magnitude across one trajectory. With the tiny model's
    zero-terminal-SNR schedule at 10 steps it is 0.055 at t=999 (the mean barely depends on the
    output) and 11.4 at t=99 (sigma 0.029), so in a loss summed over steps the last step's gradient
    is ~200x the first's, and an Adam step mostly redraws the last step's fine texture while the
    steps that place shapes and colours do not move (``PreferenceAlgorithm.step_weights``).

    Args:
        scheduler: A diffusers ``DDIMScheduler`` with ``set_timesteps`` called.
        timestep: t, an int or a tensor of timesteps.
        eta: DDIM noise scale (> 0).

    Returns:
        float32 tensor shaped like ``timestep``.
    """
    if not eta > 0:
        raise ValueError(f"eta={eta}: a DDIM step with eta = 0 has no log-probability to scale")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(num_inference_steps) first")
    config = scheduler.config
    t = torch.as_tensor(timestep).long()
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.double()
    a_t = alphas[t]
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], torch.as_tensor(float(scheduler.final_alpha_cumprod),
                                                                                    dtype=torch.float64))
    b_t = 1 - a_t
    std = eta * ((1 - a_prev) / b_t * (1 - a_t / a_prev)).sqrt()
    # mu = sqrt(a_prev) * x0 + direction * eps, with x0 and eps affine in the output.
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt()
    if config.prediction_type == "epsilon":
        slope = -a_prev.sqrt() * b_t.sqrt() / a_t.sqrt() + direction
    elif config.prediction_type == "v_prediction":
        slope = -a_prev.sqrt() * b_t.sqrt() + direction * a_t.sqrt()
    elif config.prediction_type == "sample":
        slope = a_prev.sqrt() - direction * a_t.sqrt() / b_t.sqrt()
    else:
        raise ValueError(f"prediction_type={config.prediction_type!r} must be one of {PREDICTION_TYPES}")
    return (slope.abs() / std).float()


def prediction_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for clean ``x0`` noised with ``noise`` at timesteps ``t``: the
    noise (epsilon), the velocity sqrt(a_t) eps - sqrt(1 - a_t) x0 (v_prediction) or x0 (sample),
    per the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type={kind!r} must be one of {PREDICTION_TYPES}")
