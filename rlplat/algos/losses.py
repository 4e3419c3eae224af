"""Policy-gradient losses and penalties as pure functions: tensors in, tensors out.

Every reduction goes through ``masked_mean`` so padded or filtered rows (a ``mask`` of
False/0) never count, and an all-masked minibatch gives 0 instead of NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the elements selected by ``mask``.

    Args:
        x: any shape.
        mask: bool or float weights of ``x``'s shape, or of its leading dims (rows [B] of
            per-step values [B, K]: each step of a row gets the row's weight); ``None``
            averages everything. Masked-out elements do not leak even if they hold inf or NaN.

    Returns:
        0-d tensor: ``sum(mask * x) / sum(mask)``, or 0 when the mask sums to 0.
    """
    if mask is None:
        return x.mean()
    if mask.shape != x.shape[: mask.ndim]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal x shape {tuple(x.shape)} or its leading dims")
    w = rows_to(mask, x).to(x.dtype)
    weighted = torch.where(w != 0, x * w, torch.zeros_like(x))
    total = w.sum()
    return weighted.sum() / torch.where(total != 0, total, torch.ones_like(total))


def rows_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row ``values`` [B] broadcast over the trailing dims of ``like`` [B, ...] (per-step
    log-probs [B, K] of a policy whose action is a chain of K stochastic steps)."""
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim))).expand_as(like)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ``ratio = exp(logp - old_logp)``;
    ``L = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Args:
        logp: log pi_theta(a|s) [B], differentiable; or per-step log-probs [B, K] of a chain of
            K stochastic steps (a diffusion policy's denoising steps, DPPO), each step its own
            ratio with the row's advantage.
        old_logp: log pi_theta_old(a|s) from the rollout, shaped like ``logp``.
        advantages: A [B].
        clip_coef: eps, the half-width of the trust band around ratio 1.
        mask: rows that count [B] (bool or float); ``None`` counts all.

    Returns:
        (loss, metrics): loss is 0-d; metrics are detached 0-d tensors: ``clipfrac``
        (fraction of rows with |ratio - 1| > eps), ``approx_kl`` (the k3 estimator
        ``(ratio - 1) - log ratio`` of KL(pi_old || pi_theta), for early stopping) and
        ``ratio_mean``.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    A = rows_to(advantages, logp)
    pg_losses = torch.max(-A * ratio, -A * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef))
    loss = masked_mean(pg_losses, mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_coef).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Critic regression loss ``0.5 * (V - R)^2``, optionally clipped as in cleanrl's PPO.

    With ``clip_coef`` c: ``V_clipped = V_old + clamp(V - V_old, -c, c)`` and the loss is
    ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, so the critic gains nothing by moving more
    than c from its rollout-time prediction.

    Args:
        values: V [B], differentiable.
        old_values: V_old [B] from the rollout.
        returns: R [B], the regression targets.
        clip_coef: c, or ``None`` for the plain squared error.
        mask: rows that count [B] (bool or float); ``None`` counts all.

    Returns:
        0-d loss.
    """
    V, V_old, R = values, old_values, returns
    sq_err = (V - R) ** 2
    if clip_coef is not None:
        V_clipped = V_old + (V - V_old).clamp(-clip_coef, clip_coef)
        sq_err = torch.max(sq_err, (V_clipped - R) ** 2)
    return 0.5 * masked_mean(sq_err, mask)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean policy entropy over the rows that count.

    Args:
        entropy: H(pi(.|s)) [B].
        mask: rows that count [B] (bool or float); ``None`` counts all.

    Returns:
        0-d tensor, to be subtracted (times a coefficient) from the loss.
    """
    return masked_mean(entropy, mask)


def _kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio**2


def _kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # With r = ref / pi = exp(-log_ratio): k3 = (r - 1) - log r >= 0, unbiased under a ~ pi.
    return torch.exp(-log_ratio) + log_ratio - 1.0


_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-sample estimate of KL(pi || pi_ref) from actions sampled by pi (Schulman 2020).

    With ``log_ratio = logp - ref_logp``: "k1" is ``log_ratio`` (unbiased, can be negative),
    "k2" is ``0.5 * log_ratio^2`` (biased, low variance), "k3" is
    ``exp(ref_logp - logp) - (ref_logp - logp) - 1`` (unbiased and non-negative).

    Args:
        logp: log pi(a|s), any shape.
        ref_logp: log pi_ref(a|s), same shape.
        kind: "k1", "k2" or "k3".

    Returns:
        Elementwise estimate, same shape as ``logp``.

    Raises:
        ValueError: unknown ``kind``; the message lists the valid ones.
    """
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator kind={kind!r}; valid kinds: {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logp - ref_logp)
