"""ddim_step_with_logprob against an independent Gaussian built from the scheduler's own step."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from rlplat.policies.diffusion import ddim_step_with_logprob


def make_scheduler(**kw) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)
    scheduler.set_timesteps(20)
    return scheduler


def reference(scheduler: DDIMScheduler, out: torch.Tensor, t: int, x: torch.Tensor, eta: float, x_prev: torch.Tensor):
    """log N(x_prev; mu, sigma^2) with mu from scheduler.step without noise, sigma from its variance."""
    mean = scheduler.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    return torch.distributions.Normal(mean.double(), float(std)).log_prob(x_prev.double())


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_logprob_matches_the_scheduler_gaussian(eta, prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    out = torch.randn(3, 4, 8, 8)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[10]), int(scheduler.timesteps[-1])):
        x_prev, logp = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=torch.Generator().manual_seed(1))
        # The draw is scheduler.step's draw for the same generator.
        stepped = scheduler.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
        torch.testing.assert_close(x_prev, stepped, rtol=1e-5, atol=1e-5)
        ref = reference(scheduler, out, t, x, eta, x_prev)
        torch.testing.assert_close(logp.double(), ref.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
        _, logp_sum = ddim_step_with_logprob(scheduler, out, t, x, eta, prev_sample=x_prev, reduction="sum")
        torch.testing.assert_close(logp_sum.double(), ref.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(logp_sum, logp * x[0].numel(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("steps", [3, 20])
def test_zero_terminal_snr_first_step_is_finite(steps):
    # alpha_T = 0 (the tiny model's schedule): with eta = 1 the first step's mean is
    # sqrt(alpha_prev) * x0 exactly, and its direction weight 1 - alpha_prev - sigma^2 = 0 must
    # not round into a NaN (it does for 3 steps without the clamp).
    scheduler = make_scheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                               timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[0])
    assert t == 999 and float(scheduler.alphas_cumprod[t]) == 0.0
    torch.manual_seed(3)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_prev, logp = ddim_step_with_logprob(scheduler, out, t, x, 1.0, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(x_prev).all()) and bool(torch.isfinite(logp).all())
    a_prev = scheduler.alphas_cumprod[t - 1000 // steps]
    mean = a_prev.sqrt() * (-out)  # v-prediction at alpha_t = 0: x0 = -v
    std = (1 - a_prev).sqrt()
    expected = torch.distributions.Normal(mean.double(), float(std)).log_prob(x_prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp.double(), expected, rtol=1e-4, atol=1e-4)


def test_scoring_a_given_sample_and_per_row_timesteps():
    scheduler = make_scheduler()
    torch.manual_seed(2)
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ts = scheduler.timesteps[[2, 15]]
    x_prev, logp = ddim_step_with_logprob(scheduler, out, ts, x, 1.0, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        _, row = ddim_step_with_logprob(scheduler, out[i : i + 1], int(ts[i]), x[i : i + 1], 1.0,
                                        prev_sample=x_prev[i : i + 1])
        torch.testing.assert_close(row, logp[i : i + 1], rtol=1e-5, atol=1e-5)
    # A sample far from the mean is less likely; gradients flow to the model output only.
    out.requires_grad_(True)
    _, near = ddim_step_with_logprob(scheduler, out, ts, x, 1.0, prev_sample=x_prev)
    _, far = ddim_step_with_logprob(scheduler, out, ts, x, 1.0, prev_sample=x_prev + 3.0)
    assert bool((far < near).all())
    near.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_eta_zero_and_bad_arguments_are_refused():
    scheduler = make_scheduler()
    x = torch.zeros(1, 1, 2, 2)
    t = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="eta=0.*no log-probability"):
        ddim_step_with_logprob(scheduler, x, t, x, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        ddim_step_with_logprob(scheduler, x, t, x, 1.0, reduction="max")
    # Without steps_offset the last step (t = 0 -> final alpha = alpha_0) has zero variance.
    flat = DDIMScheduler(set_alpha_to_one=False, steps_offset=0)
    flat.set_timesteps(10)
    with pytest.raises(ValueError, match="zero DDIM variance.*steps_offset=1"):
        ddim_step_with_logprob(flat, x, int(flat.timesteps[-1]), x, 1.0)
    fresh = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(fresh, x, t, x, 1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_target_is_what_the_unet_regresses(prediction_type):
    from rlplat.policies.diffusion.logprob import prediction_target

    scheduler = make_scheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 700])
    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(prediction_target(scheduler, x0, noise, t), expected)
    # Consistent with the step: the target at x_t = add_noise(x0, noise, t) recovers x0 there.
    if prediction_type == "v_prediction":
        x_t = scheduler.add_noise(x0, noise, t)
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * expected, x0, rtol=1e-4, atol=1e-5)


def test_prediction_target_refuses_unknown_types():
    from rlplat.policies.diffusion.logprob import prediction_target

    from types import SimpleNamespace

    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    with pytest.raises(ValueError, match="prediction_type='flow' must be one of"):
        prediction_target(scheduler, torch.zeros(1), torch.zeros(1), torch.tensor([0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_output_scale_is_the_mean_slope_over_the_std(prediction_type, zero_snr):
    from rlplat.policies.diffusion import ddim_output_scale

    if zero_snr and prediction_type == "epsilon":
        pytest.skip("epsilon prediction has no x0 at zero terminal SNR")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {}
    scheduler = make_scheduler(prediction_type=prediction_type, **extra)
    scheduler.set_timesteps(10)
    x = torch.randn(1, 4, dtype=torch.float64)
    scales = ddim_output_scale(scheduler, scheduler.timesteps, 1.0)
    for t, scale in zip(scheduler.timesteps.tolist(), scales.tolist()):
        # The mean is affine in the model output: its slope is the difference of two noiseless steps.
        def noiseless_step(value, eta=1.0):
            out = torch.full_like(x, value)
            return scheduler.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample

        zero, one = noiseless_step(0.0), noiseless_step(1.0)
        if zero_snr and t == scheduler.timesteps[0] and torch.isnan(zero).any():
            # At the first zero-SNR step the direction weight sqrt(1 - a_prev - std^2) is exactly 0
            # with eta 1 and diffusers (0.42) rounds it below 0 into a NaN (ddim_step_with_logprob
            # clamps it). There a_t = 0, so the predicted noise does not depend on the model output
            # and the mean's slope is sqrt(a_prev) d x0 / d output whatever eta: take it at eta 0.5.
            zero, one = noiseless_step(0.0, 0.5), noiseless_step(1.0, 0.5)
        prev_t = t - 1000 // scheduler.num_inference_steps
        std = scheduler._get_variance(t, prev_t) ** 0.5
        assert scale == pytest.approx(float((one - zero).abs().mean() / std), rel=1e-3), t
    if zero_snr:  # the trajectory's steps differ by orders of magnitude (why step_weight exists)
        assert scales.max() / scales.min() > 100
