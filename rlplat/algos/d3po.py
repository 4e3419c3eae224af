"""D3PO: direct preference optimisation for diffusion models without a reward model.

Yang et al. 2024 (arXiv:2311.13231). Each denoising step of a pair of trajectories that share
the prompt and the initial noise is a DPO comparison: the preferred trajectory's step should
become more likely relative to the reference model, the other's less. The per-step ratio is
clipped to [1 - eps, 1 + eps] before the log, so once a step has moved eps away from the
reference its gradient stops (the clip acts like PPO's trust region). ``clip_mode="one_sided"``
clips as PPO does: only on the side the label pushes toward, so a step that moved the wrong
way keeps its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlplat.algos.base import STEP_WEIGHTS, PreferenceAlgorithm
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.registry import checked, register


# algo.clip_mode: how d3po_loss clips each step's ratio to the reference.
CLIP_MODES = ("symmetric", "one_sided")


def d3po_loss(
    logp_w: torch.Tensor,
    ref_logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float = 0.1,
    clip_coef: float = 0.1,
    clip_mode: str = "symmetric",
) -> torch.Tensor:
    """Per-pair D3PO loss for one denoising step.

    ``rho_i = clip(exp(logp_i - ref_logp_i), 1 - eps, 1 + eps)`` for the preferred (w) and the
    other (l) sample, and ``loss = -log sigmoid(beta * (log rho_w - log rho_l))``.

    ``clip_mode``: "symmetric" (the paper's) clamps both ratios to the band both ways, so a step
    that moved the wrong way (rho_w < 1 - eps, rho_l > 1 + eps) gets no gradient either;
    "one_sided" clamps as PPO's pessimistic clip does, only where the label pushes:
    ``rho_w = min(rho, 1 + eps)``, ``rho_l = max(rho, 1 - eps)``, so the update stops pushing a
    step that moved eps the right way and keeps pulling back one that moved the wrong way.

    Args:
        logp_w, logp_l: log-probs [B] of the preferred / dispreferred step under the policy
            (differentiable).
        ref_logp_w, ref_logp_l: the same steps under the reference model [B] (no gradient).
        beta: DPO temperature (D3PO's default 0.1).
        clip_coef: Half-width of the ratio band (D3PO's default 0.1).

    Returns:
        loss [B] (not reduced). Before the first update (policy == reference) it is log 2.
    """
    if clip_coef <= 0 or clip_coef >= 1:
        raise ValueError(f"clip_coef={clip_coef} must be in (0, 1)")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"algo.clip_mode={clip_mode!r} must be one of {CLIP_MODES}")
    lo, hi = 1.0 - clip_coef, 1.0 + clip_coef
    one_sided = clip_mode == "one_sided"
    rho_w = torch.exp(logp_w - ref_logp_w.detach()).clamp(None if one_sided else lo, hi)
    rho_l = torch.exp(logp_l - ref_logp_l.detach()).clamp(lo, None if one_sided else hi)
    return -F.logsigmoid(beta * (torch.log(rho_w) - torch.log(rho_l)))


# --------------------------------------------------------------------------- pairs and update


def _clipped(log_ratio: torch.Tensor, clip_coef: float, clip_mode: str, side: str) -> torch.Tensor:
    """Where d3po_loss's clip stops the gradient of the preferred (side "w") or other ("l") ratio."""
    ratio = log_ratio.exp()
    above, below = ratio > 1.0 + clip_coef, ratio < 1.0 - clip_coef
    if clip_mode == "one_sided":
        return above if side == "w" else below
    return above | below


def order_pairs(first: Batch, second: Batch, a_preferred: np.ndarray, keep: np.ndarray) -> Batch:
    """The kept pairs as (preferred w, other l): ``w_latents``, ``w_next_latents``, ``w_logprobs``,
    the same with ``l_``, ``timesteps`` and ``prompts``."""
    prompts = list(first["prompts"])
    pick = torch.as_tensor(np.asarray(a_preferred, bool))
    rows = torch.as_tensor(np.flatnonzero(keep))

    def order(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = first[key], second[key]
        shape = (-1,) + (1,) * (a.ndim - 1)
        w = torch.where(pick.reshape(shape), a, b)
        l_ = torch.where(pick.reshape(shape), b, a)
        return w[rows], l_[rows]

    fields: dict[str, torch.Tensor] = {"timesteps": first["timesteps"][rows]}
    if "sde_step" in first:  # algo.branch: the step both samples drew noise at
        fields["sde_step"] = first["sde_step"][rows]
    for key in ("latents", "next_latents", "logprobs"):
        fields[f"w_{key}"], fields[f"l_{key}"] = order(key)
    return Batch(fields, extras={"prompts": [prompts[i] for i in rows.tolist()]}, batch_size=len(rows))


def pair_rows(scores: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (a, b) [P] of each prompt's pair among ``scores`` [P * group_size] (the prompts'
    groups one after another): the two samples of a pair, or a larger group's highest- and
    lowest-scoring samples (a: the highest; the first of equal scores). Labels come after."""
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(f"{len(scores)} samples do not split into groups of algo.group_size={group_size} (>= 2)")
    groups = scores.reshape(-1, group_size)
    start = np.arange(len(groups)) * group_size
    if group_size == 2:
        return start, start + 1
    high, low = groups.argmax(axis=1), groups.argmin(axis=1)
    low = np.where(high == low, (high + 1) % group_size, low)  # all equal: any two (a tie)
    return start + high, start + low


def _pair_logprobs(policy: Any, pairs: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [P] of denoising step ``step`` of the preferred (w) and the other (l) samples."""
    t, prompts = pairs["timesteps"][:, step], list(pairs["prompts"])
    return tuple(policy.step_logprob(pairs[f"{s}_latents"][:, step], pairs[f"{s}_next_latents"][:, step], t, prompts)
                 for s in "wl")


def _adapter_reference(policy: Any, pairs: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA adapter disabled: the pretrained model, as in D3PO."""
    with torch.no_grad(), policy.adapter_disabled():
        return _pair_logprobs(policy, pairs, step)


# algo.reference -> (policy, pairs, step) -> reference log-probs (w [P], l [P]).
REFERENCES = {"adapter": _adapter_reference,
              "sampled": lambda policy, pairs, step: (pairs["w_logprobs"][:, step], pairs["l_logprobs"][:, step])}


def d3po_step_loss(
    policy: Any, pairs: Batch, step: int, beta: float = 0.1, clip_coef: float = 0.1, reference: str = "adapter",
    clip_mode: str = "symmetric",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean D3PO loss of denoising step ``step`` over ``pairs`` (with gradients).

    ``reference``: "adapter" scores the reference with the policy's LoRA adapter disabled (the
    pretrained model, as in D3PO); "sampled" uses the log-probs recorded at sampling time.
    """
    if reference not in REFERENCES:
        raise ValueError(f"algo.reference={reference!r} must be one of {tuple(REFERENCES)}")
    logp_w, logp_l = _pair_logprobs(policy, pairs, step)
    ref_w, ref_l = (ref.to(logp_w) for ref in REFERENCES[reference](policy, pairs, step))
    loss = d3po_loss(logp_w, ref_w, logp_l, ref_l, beta, clip_coef, clip_mode)
    with torch.no_grad():
        log_ratio_w, log_ratio_l = logp_w - ref_w, logp_l - ref_l
        metrics = {
            "implicit_acc": (log_ratio_w > log_ratio_l).float().mean(),
            "clipfrac": ((log_ratio_w.exp() - 1).abs() > clip_coef).float().mean(),
            # The share of the pairs' ratios (w and l) whose gradient the clip stops.
            "clip_stopped": 0.5 * (_clipped(log_ratio_w, clip_coef, clip_mode, "w").float().mean()
                                   + _clipped(log_ratio_l, clip_coef, clip_mode, "l").float().mean()),
            "kl": 0.5 * ((log_ratio_w**2).mean() + (log_ratio_l**2).mean()),
        }
        if reference == "adapter":  # the reference is the base model: the same number under the shared name
            metrics["kl_to_base"] = 0.5 * metrics["kl"]
    return loss.mean(), metrics


@dataclass
class D3POConfig:
    """D3PO on online pairs that share x_T (rlplat/algos/d3po.py)."""

    # Prompts per iteration; each gets group_size samples and one pair of them.
    batch_size: int = checked(16, ge=1)
    # Samples per prompt, all from one x_T. 2: the paper's pair. More: the pair is the group's
    # highest- and lowest-scoring samples, so its label rests on a wider score gap than a random
    # pair's (the update's cost stays one pair per prompt; the sampling's grows with the group).
    group_size: int = checked(2, ge=2)
    # Minibatches (optimizer steps) per epoch over the kept pairs.
    num_minibatches: int = checked(2, ge=1)
    # Passes over each iteration's pairs.
    update_epochs: int = checked(1, ge=1)
    # Share of the denoising steps trained per minibatch (drawn at random).
    timestep_fraction: float = checked(1.0, gt=0, le=1)
    # Denoising steps nearest the image that get no update (0: every step trains). The last DDIM
    # step has the smallest std, so its ratio leaves the clip band first.
    skip_final_steps: int = checked(0, ge=0)
    # Denoising steps nearest the noise that get no update (0: every step trains): those steps lay
    # the image out (which shapes, where), so skipping them leaves the layout to the base model
    # and tunes only how it is rendered.
    skip_initial_steps: int = checked(0, ge=0)
    # Loss weight of each denoising step: uniform (the paper's) or output_scale (divided by how
    # strongly the step's log-prob responds to the model output, so the low-noise steps near the
    # image stop drowning out the ones that place shapes: rlplat.algos.base.step_weights).
    step_weight: str = checked("uniform", choices=tuple(STEP_WEIGHTS))
    # Draw each iteration's pairs along the deterministic DDIM path except at one random step (of
    # the trainable ones) and train that step only: a pair then differs by that step's noise
    # alone, so its label credits that step (rlplat.algos.base.PreferenceAlgorithm.branch_step).
    branch: bool = False
    # With skip_initial_steps: the rows of a group also share the sampler's noise at the untrained
    # initial steps, so they part where training starts and their scores compare what the
    # trained steps drew rather than a layout the untrained steps drew differently.
    share_prefix: bool = False
    # DPO temperature beta.
    beta: float = checked(0.1, gt=0)
    # Half-width of the clipped ratio band.
    clip_coef: float = checked(0.1, gt=0)
    # How each ratio is clipped: symmetric (the paper's: to the band both ways, so a step that
    # moved the wrong way gets no gradient either) or one_sided (PPO's pessimistic clip: only on
    # the side the label pushes, so such a step is pulled back): d3po_loss.
    clip_mode: str = checked("symmetric", choices=CLIP_MODES)
    # Reference log-probs: adapter (LoRA disabled, the pretrained model) or sampled (at sampling time).
    reference: str = checked("adapter", choices=tuple(REFERENCES))
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, eps=1e-8, max_grad_norm=1.0))


@register("algo", "d3po", D3POConfig, renamed={"clip_eps": "clip_coef"})
class D3PO(PreferenceAlgorithm):
    """D3PO on online pairs: ``group_size`` samples per prompt from one x_T (the paper's two), one
    pair of them labelled by the preference source."""

    samples_per_prompt = 2
    share_noise = True

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        self.samples_per_prompt = int(cfg.get("group_size", 2))

    @property
    def needs_adapter_reference(self) -> bool:
        return self.cfg.get("reference", "adapter") == "adapter"

    def prepare(self, traj: Batch, scores: np.ndarray, source: Any, rng: np.random.Generator
                ) -> tuple[Batch, dict[str, float]]:
        """Picks each prompt's pair (``pair_rows``), labels it and keeps the informative ones."""
        a, b = pair_rows(np.asarray(scores), self.samples_per_prompt)
        a_preferred, keep = source.labels(scores[a], scores[b], rng)
        gap = np.abs(scores[a] - scores[b])
        return order_pairs(traj[torch.as_tensor(a)], traj[torch.as_tensor(b)], a_preferred, keep), {
            "pairs/kept_fraction": float(keep.mean()), "pairs/score_gap": float(gap.mean()),
        }

    def update(self, policy: Any, optimizer: torch.optim.Optimizer, batch: Batch, generator: torch.Generator,
               *args: Any, **kwargs: Any) -> dict[str, float]:
        return super().update(policy, optimizer, self.trained_part(batch), generator, *args, **kwargs)

    def step_loss(self, policy: Any, mb: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return d3po_step_loss(policy, mb, step, float(self.cfg["beta"]), float(self.cfg["clip_coef"]),
                              self.cfg.get("reference", "adapter"), self.cfg.get("clip_mode", "symmetric"))
