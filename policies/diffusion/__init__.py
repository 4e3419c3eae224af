"""Diffusion policy family: text-to-image UNets (diffusers) with per-step log-probabilities."""

from rlplat.policies.diffusion.logprob import ddim_output_scale, ddim_step_with_logprob

__all__ = ["ddim_output_scale", "ddim_step_with_logprob"]
