"""The Algorithm contract: batch arithmetic, advantages and a loss; the update loop is shared.

An algorithm is chosen by ``algo._target_`` and built from its config. The controller asks it
how to roll out (``rollout_steps``, ``reset_seeds``), checks its batch arithmetic at start-up,
calls ``compute_advantages`` on the collected rollout, and the actor worker runs ``update``,
which minimises ``loss`` over minibatches.
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from rlplat.batch import Batch
from rlplat.policies.base import ActionPolicy, EvalOutput

log = logging.getLogger(__name__)


class BatchArithmeticError(ValueError):
    """Sizes from several config groups do not fit together."""


class Algorithm(abc.ABC):
    """Base class of embodied RL algorithms (PPO, GRPO).

    Attributes:
        needs_value: whether the policy's critic is trained and used.
        episodic: whether each iteration starts fresh episodes from chosen seeds (GRPO groups)
            instead of continuing the envs where the last iteration left them (PPO).
        needs_final_values: whether truncated episodes are bootstrapped with V(final obs).
    """

    needs_value: ClassVar[bool] = True
    episodic: ClassVar[bool] = False
    needs_final_values: ClassVar[bool] = True

    #: Whether rollouts act with the env's scripted expert instead of the policy (SFT).
    uses_expert: ClassVar[bool] = False

    def __init__(self, **cfg: Any) -> None:
        self.cfg = cfg
        self.optim = cfg["optim"]
        self.iteration = 1

    # ----------------------------------------------------------------- rollout shape
    @abc.abstractmethod
    def rollout_steps(self, max_episode_steps: int) -> int:
        """Env steps per env per iteration."""

    def reset_seeds(self, num_envs: int, rng: np.random.Generator) -> list[int] | None:
        """Per-env seeds for the envs at the start of an iteration (episodic algorithms)."""
        return None

    @property
    def needs_ref(self) -> bool:
        """Whether a frozen reference policy must score the rollouts."""
        return False

    def check(self, num_envs: int, max_episode_steps: int, num_env_workers: int, num_actor_workers: int) -> None:
        """Checks that the sizes fit together; raises BatchArithmeticError naming the numbers."""
        if num_envs % num_env_workers:
            raise BatchArithmeticError(
                f"env.num_envs={num_envs} must be a multiple of the {num_env_workers} env workers "
                f"(placement.roles.env); use env.num_envs={num_env_workers * max(1, num_envs // num_env_workers)}"
            )
        rows = num_envs * self.rollout_steps(max_episode_steps)
        minibatches = self.cfg["num_minibatches"]
        if rows % (minibatches * num_actor_workers):
            raise BatchArithmeticError(
                f"a rollout holds env.num_envs={num_envs} x rollout_steps="
                f"{self.rollout_steps(max_episode_steps)} = {rows} rows, which does not split into "
                f"algo.num_minibatches={minibatches} x {num_actor_workers} actor workers; "
                f"pick sizes so that {minibatches * num_actor_workers} divides {rows}"
            )

    # ----------------------------------------------------------------- learning
    @abc.abstractmethod
    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        """Adds ``advantages`` (and ``returns``, ``mask``) to a time-major rollout batch."""

    @abc.abstractmethod
    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one minibatch and detached metrics."""

    def update(
        self,
        policy: ActionPolicy,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        generator: torch.Generator,
        sync_grads: Callable[[], None] | None = None,
        sync_scalar: Callable[[float], float] | None = None,
        iteration: int = 1,
    ) -> dict[str, float]:
        """Runs the epochs x minibatches optimisation of ``loss`` on one rollout.

        ``sync_grads`` averages gradients over data-parallel actor workers, and ``sync_scalar``
        averages a float (the KL used for early stopping, so every rank stops together).
        ``iteration`` (from 1) is the training iteration, for schedules such as critic warm-up.
        Minibatches whose loss is not finite are skipped and counted, never stepped.
        """
        self.iteration = iteration
        sums: dict[str, float] = defaultdict(float)
        count, skipped = 0, 0
        target_kl = self.cfg.get("target_kl")
        params = [p for p in policy.parameters() if p.requires_grad]
        stop = False
        for _ in range(self.cfg["update_epochs"]):
            for mb in batch.minibatches(self.cfg["num_minibatches"], generator):
                # The minibatch carries the rollout's extras (e.g. the VLA's action tokens).
                out = policy.evaluate(mb, mb["actions"], mb)
                loss, metrics = self.loss(mb, out)
                if not torch.isfinite(loss):
                    skipped += 1
                    log.warning("non-finite loss %s: minibatch skipped", float(loss))
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sync_grads is not None:
                    sync_grads()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim["max_grad_norm"])
                optimizer.step()
                metrics = {**metrics, "loss": loss.detach(), "grad_norm": grad_norm}
                for key, value in metrics.items():
                    sums[key] += float(value)
                count += 1
                kl = float(metrics.get("approx_kl", 0.0))
                if sync_scalar is not None:
                    kl = sync_scalar(kl)
                if target_kl is not None and kl > target_kl:
                    stop = True
                    break
            if stop:
                break
        result = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
        result["train/minibatches"] = float(count)
        result["train/skipped_nonfinite"] = float(skipped)
        result["train/early_stop"] = float(stop)
        return result

    def learning_rate(self, step: int, total_steps: int) -> float:
        """Learning rate at iteration ``step`` (linear annealing when optim.anneal_lr)."""
        lr = float(self.optim["lr"])
        if self.optim.get("anneal_lr", False):
            lr *= max(0.0, 1.0 - step / max(total_steps, 1))
        return lr
