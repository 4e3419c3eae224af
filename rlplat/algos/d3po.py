"""D3PO: direct preference optimisation for diffusion models without a reward model.

Yang et al. 2024 (arXiv:2311.13231). Each denoising step of a pair of trajectories that share
the prompt and the initial noise is a DPO comparison: the preferred trajectory's step should
become more likely relative to the reference model, the other's less. The per-step ratio is
clipped to [1 - eps, 1 + eps] before the log, so once a step has moved eps away from the
reference its gradient stops (the clip acts like PPO's trust region).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d3po_loss(
    logp_w: torch.Tensor,
    ref_logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float = 0.1,
    clip_eps: float = 0.1,
) -> torch.Tensor:
    """Per-pair D3PO loss for one denoising step.

    ``rho_i = clip(exp(logp_i - ref_logp_i), 1 - eps, 1 + eps)`` for the preferred (w) and the
    other (l) sample, and ``loss = -log sigmoid(beta * (log rho_w - log rho_l))``.

    Args:
        logp_w, logp_l: log-probs [B] of the preferred / dispreferred step under the policy
            (differentiable).
        ref_logp_w, ref_logp_l: the same steps under the reference model [B] (no gradient).
        beta: DPO temperature (D3PO's default 0.1).
        clip_eps: Half-width of the ratio band (D3PO's default 0.1).

    Returns:
        loss [B] (not reduced). Before the first update (policy == reference) it is log 2.
    """
    if clip_eps <= 0 or clip_eps >= 1:
        raise ValueError(f"clip_eps={clip_eps} must be in (0, 1)")
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps
    rho_w = torch.exp(logp_w - ref_logp_w.detach()).clamp(lo, hi)
    rho_l = torch.exp(logp_l - ref_logp_l.detach()).clamp(lo, hi)
    return -F.logsigmoid(beta * (torch.log(rho_w) - torch.log(rho_l)))
