"""Advantage estimators: GAE (Schulman et al. 2016) and group-relative outcomes (GRPO).

Pure functions: tensors in, tensors out. Both normalisations here (``normalize`` and the
group std of ``group_normalized_advantages``) use the *sample* standard deviation (Bessel's
correction, ``torch.std``'s default), as cleanrl's PPO and most GRPO implementations do, so
one concept ("the std of advantages") has one meaning across the package. A single element
has no spread: its std is taken as 0, and its normalised value is 0.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a time-major rollout.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``, with ``A_T = 0``.

    Args:
        rewards: r_t [T, N].
        values: V(s_t) [T, N].
        next_values: V(s_{t+1}) as seen by step t [T, N]: the caller puts 0 where the episode
            terminated at t and V(final obs) where it was truncated at t.
        dones: [T, N] bool or float, the episode ended at step t (terminated or truncated);
            it cuts the recursion so no advantage flows across an episode boundary.
        gamma: discount factor.
        lam: GAE lambda (0: one-step TD error, 1: Monte-Carlo return minus value).

    Returns:
        (advantages, returns), both [T, N], with ``returns = advantages + values``.
    """
    if not rewards.shape == values.shape == next_values.shape == dones.shape:
        raise ValueError(
            f"gae needs equal [T, N] shapes, got rewards {tuple(rewards.shape)}, values "
            f"{tuple(values.shape)}, next_values {tuple(next_values.shape)}, dones {tuple(dones.shape)}"
        )
    delta = rewards + gamma * next_values - values
    not_done = 1.0 - dones.to(delta.dtype)
    A_next = torch.zeros_like(delta[0])
    advantages_reversed = []
    for t in reversed(range(delta.shape[0])):
        A_next = delta[t] + gamma * lam * not_done[t] * A_next
        advantages_reversed.append(A_next)
    advantages = torch.stack(advantages_reversed[::-1])
    return advantages, advantages + values


def normalize(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Standardise to mean 0 and (sample) std 1 over the selected elements.

    Args:
        x: any shape.
        mask: bool (or 0/1) tensor of ``x``'s shape selecting the elements that count;
            ``None`` selects all.
        eps: added to the std so a constant input gives 0 instead of NaN.

    Returns:
        Tensor of ``x``'s shape: ``(x - mean) / (std + eps)`` on selected elements, 0 elsewhere.
        Mean and std are over selected elements only; std is the sample std (Bessel-corrected).
    """
    selected = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    x_sel = x[selected]
    if x_sel.numel() == 0:
        return torch.zeros_like(x)
    mu = x_sel.mean()
    sigma = x_sel.std() if x_sel.numel() > 1 else torch.zeros_like(mu)
    return torch.where(selected, (x - mu) / (sigma + eps), torch.zeros_like(x))


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Views outcome scores [B] as [B / group_size, group_size] consecutive blocks."""
    B = rewards.numel()
    if rewards.dim() != 1 or group_size < 1 or B % group_size:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length B={B} is a multiple of "
            f"group_size={group_size} (>= 1); got shape {tuple(rewards.shape)}"
        )
    return rewards.view(B // group_size, group_size)


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages: each score relative to its group (Shao et al. 2024).

    ``A_i = r_i - mean(r_group)``, divided by ``std(r_group) + eps`` when ``std_normalize``
    (GRPO); without it this is the Dr. GRPO variant (Liu et al. 2025), which drops the std to
    avoid up-weighting groups whose scores barely differ. The std is the sample std
    (Bessel-corrected), as in DeepSeekMath-style implementations that call ``torch.std``.

    Args:
        rewards: outcome scores r [B]; groups are consecutive blocks of ``group_size``.
        group_size: G, members per group; must divide B.
        std_normalize: divide by the group std.
        eps: added to the std; a group of equal scores gets advantage 0, not NaN.

    Returns:
        Advantages [B].

    Raises:
        ValueError: B is not a multiple of ``group_size`` (the message names both).
    """
    r = _groups(rewards, group_size)
    A = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        sigma = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(A)
        A = A / (sigma + eps)
    return A.reshape(-1)


def nonuniform_group_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which members belong to an informative group (scores not all equal).

    Args:
        rewards: outcome scores [B]; groups are consecutive blocks of ``group_size``.
        group_size: members per group; must divide B.

    Returns:
        Bool tensor [B]: True for every member of a group whose scores differ.
    """
    r = _groups(rewards, group_size)
    informative = r.amax(dim=1) != r.amin(dim=1)
    return informative.repeat_interleave(group_size)

