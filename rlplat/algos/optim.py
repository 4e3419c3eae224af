"""The optimizer and the one optimizer step every algorithm takes.

``build_optimizer`` makes AdamW (Adam when ``weight_decay`` is 0) over the policy's parameter
groups, whatever is trainable (a LoRA adapter or every weight). ``OptimizerStep`` is the step:
zero the gradients, back-propagate one loss or several accumulated ones, agree across
data-parallel ranks whether every loss was finite, average the gradients, clip their global
norm, and step; a step whose loss or gradient norm is not finite on any rank is skipped by all
ranks (so none waits alone in the all-reduce) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlplat.registry import checked

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """Adam settings shared by every algorithm."""

    # Learning rate.
    lr: float = checked(3e-4, gt=0)
    # Adam epsilon.
    eps: float = checked(1e-5, gt=0)
    # Linearly anneal the learning rate to 0 over trainer.total_steps (or trainer.time_budget_s,
    # whichever ends the run first).
    anneal_lr: bool = False
    # Adapt the learning rate to this approx KL per minibatch (rsl_rl's "adaptive" schedule, for
    # PPO / GRPO): after a minibatch whose KL to the rollout policy is above twice this the lr is
    # divided by 1.5, below half of it multiplied by 1.5, within [1e-5, 1e-2]; the factor carries
    # over iterations and checkpoints. Null: off. Not with anneal_lr. The lr moves once per
    # minibatch, so with many minibatches per iteration it swings far: on PushCube (64 per
    # iteration) 0.04 drove it to 1e-2 within 5 iterations and broke the policy, and at 0.02 it sat
    # at 1e-5 while the KL stayed 0.02-0.05 (bench/results/learning_maniskill_pushcube.json).
    desired_kl: float | None = checked(None, gt=0)
    # Clip the global gradient norm to this value.
    max_grad_norm: float = checked(0.5, gt=0)
    # Decoupled weight decay (AdamW).
    weight_decay: float = checked(0.0, ge=0)


#: The adaptive schedule's step (multiply or divide by it) and the lr's bounds (rsl_rl's values).
KL_LR_STEP, KL_LR_MIN, KL_LR_MAX = 1.5, 1e-5, 1e-2


def check_optim(optim: Mapping[str, Any]) -> None:
    """Refuses settings that contradict each other (ValueError naming the keys); the algorithms
    call it when they are built, so a bad config stops at validation."""
    if optim.get("desired_kl") is not None and optim.get("anneal_lr", False):
        raise ValueError(f"algo.optim.anneal_lr=true and algo.optim.desired_kl={optim['desired_kl']} both set the "
                         f"learning rate's schedule: keep one (set algo.optim.anneal_lr=false or "
                         f"algo.optim.desired_kl=null)")


def adapt_lr_to_kl(optimizer: torch.optim.Optimizer, kl: float, desired_kl: float) -> float:
    """One step of the KL-adaptive schedule: moves every group's ``kl_factor`` (kept in the
    optimizer's param groups, so it is saved with the optimizer) and its lr; returns the base
    lr (group lr / lr_scale) after the change."""
    for group in optimizer.param_groups:
        base = group["lr"] / group.get("lr_scale", 1.0)
        if kl > 2.0 * desired_kl:
            base = max(KL_LR_MIN, base / KL_LR_STEP)
        elif kl < 0.5 * desired_kl:
            base = min(KL_LR_MAX, base * KL_LR_STEP)
        group["kl_factor"] = base / group.get("base_lr", base)
        group["lr"] = base * group.get("lr_scale", 1.0)
    first = optimizer.param_groups[0]
    return first["lr"] / first.get("lr_scale", 1.0)


def annealed_lr(optim: Mapping[str, Any], step: int, total_steps: int, time_share: float = 0.0) -> float:
    """``optim["lr"]`` at iteration ``step``, decayed linearly to 0 at ``total_steps`` when ``optim["anneal_lr"]``;
    ``time_share`` (the share of a wall-clock budget spent, ``trainer.time_budget_s``) decays it
    instead when it is further along."""
    lr = float(optim["lr"])
    if optim.get("anneal_lr", False):
        lr *= max(0.0, 1.0 - max(step / max(total_steps, 1), float(time_share)))
    return lr


def build_optimizer(param_groups: list[dict[str, Any]], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (each with its own ``lr``; with ``weight_decay`` 0 it is Adam).

    Each group remembers its lr relative to ``optim["lr"]`` (``lr_scale``), so ``set_lr`` moves
    every group by the same factor (a value head at its own lr keeps its ratio under annealing).
    """
    base_lr = float(optim["lr"])
    for group in param_groups:
        group["lr_scale"] = group["lr"] / base_lr if base_lr else 1.0
    return torch.optim.AdamW(param_groups, lr=base_lr, eps=float(optim.get("eps", 1e-5)),
                             weight_decay=float(optim.get("weight_decay", 0.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's learning rate to ``lr`` times its ``lr_scale`` and its ``kl_factor``
    (what the KL-adaptive schedule has made of ``lr`` so far; 1 without it)."""
    for group in optimizer.param_groups:
        group["base_lr"] = lr
        group["lr"] = lr * group.get("kl_factor", 1.0) * group.get("lr_scale", 1.0)


class OptimizerStep:
    """One optimizer step over one loss or several accumulated ones.

    Args:
        optimizer: the optimizer (``build_optimizer``).
        max_grad_norm: global gradient-norm clip.
        sync_grads: averages the gradients over data-parallel ranks (None: one rank).
        sync_mean: averages a list of floats over those ranks (None: one rank).

    Use ``step(loss)`` for a single loss, or ``begin()``, ``backward(loss)`` per accumulated
    part and ``finish()``. ``skipped`` counts the steps not taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 sync_grads: Callable[[], None] | None = None,
                 sync_mean: Callable[[list[float]], list[float]] | None = None) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.sync_grads, self.sync_mean = sync_grads, sync_mean
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.skipped = 0
        self._bad_loss: float | None = None

    def begin(self) -> None:
        """Starts a step: clears the gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_loss = None

    def backward(self, loss: torch.Tensor) -> bool:
        """Back-propagates one (part of the) loss; False, and nothing back-propagated, if it is not finite."""
        if self._bad_loss is not None or not torch.isfinite(loss):
            if self._bad_loss is None:
                self._bad_loss = float(loss.detach())
            return False
        loss.backward()
        return True

    def finish(self) -> float | None:
        """Ends the step: the global gradient norm (before clipping), or None when skipped."""
        bad = float(self._bad_loss is not None)
        if self.sync_mean is not None:
            bad = self.sync_mean([bad])[0]
        if bad > 0:
            return self._skip("non-finite loss %s (on this rank or another): step skipped", self._bad_loss)
        if self.sync_grads is not None:
            self.sync_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if not torch.isfinite(grad_norm):
            # Gradients are already averaged here, so every rank sees the same norm.
            return self._skip("non-finite gradient norm %s: step skipped", float(grad_norm))
        self.optimizer.step()
        return float(grad_norm)

    def step(self, loss: torch.Tensor) -> float | None:
        """``begin``, ``backward(loss)``, ``finish``."""
        self.begin()
        self.backward(loss)
        return self.finish()

    def _skip(self, message: str, value: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        log.warning(message, value)

