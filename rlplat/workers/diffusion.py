"""DiffusionWorker: a text-to-image policy in one process, serving the rollout and actor roles.

The rollout role samples trajectories (``generate``); the actor role owns the optimizer and runs
the algorithm's update. Colocated roles share one worker; separate rollout workers get the
trained weights after each update (``get_weights`` / ``set_weights``), as for action policies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from rlplat.algos.base import PreferenceAlgorithm
from rlplat.algos.optim import build_optimizer, set_lr
from rlplat.batch import Batch
from rlplat.runtime.dispatch import Dispatch, register
from rlplat.runtime.worker import Worker
from rlplat.workers.weights import TrainedWeights


class DiffusionWorker(TrainedWeights, Worker):
    """Holds a ``TextToImagePolicy`` (and its optimizer when it is an actor).

    Args:
        policy_cfg: the ``policy`` config (``_target_`` + arguments).
        algo_cfg: the ``algo`` config (``_target_`` + arguments).
        roles: roles this worker serves: rollout and/or actor.
        seed: weight-init and sampling seed.
        torch_threads: intra-op threads of this process.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        *,
        policy_cfg: dict[str, Any],
        algo_cfg: dict[str, Any],
        roles: list[str],
        seed: int,
        torch_threads: int = 1,
    ) -> None:
        super().__init__(rank, world_size)
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.policy = instantiate(policy_cfg)
        self.algo: PreferenceAlgorithm = instantiate(algo_cfg)
        self.roles = set(roles)
        self.optimizer: torch.optim.Optimizer | None = None
        if "actor" in self.roles:
            self.algo.attach(self.policy)
            self.optimizer = build_optimizer(self.policy.param_groups(float(self.algo.optim["lr"])), self.algo.optim)
        self.generator = torch.Generator().manual_seed(seed + 7919 * (rank + 1))

    # ----------------------------------------------------------------- rollout role
    @register(Dispatch.SHARD_BY_BATCH)
    def generate(self, requests: Batch, guidance_scale: float | None = None, sde_step: int | None = None,
                 prefix_steps: int = 0) -> Batch:
        """Samples one trajectory per request row.

        ``requests`` holds ``prompts`` (extras), ``noise_seed`` (x_T is drawn from it, so rows with
        equal seeds start from the same noise, whatever worker they land on) and ``seed`` (the
        DDIM step noise of the shard is drawn from its first row's seed). ``sde_step``: the one
        denoising step that draws noise (``TextToImagePolicy.sample_trajectory``); None: every step.
        ``prefix_steps``: the first this many steps draw their noise from the row's ``noise_seed``
        too (after x_T), so rows with equal seeds agree through them.
        """
        self.policy.eval()
        row_noise = [torch.Generator().manual_seed(int(s)) for s in requests["noise_seed"].tolist()]
        latents = torch.stack([torch.randn(self.policy.latent_shape, generator=g) for g in row_noise])
        step_noise = torch.Generator().manual_seed(int(requests["seed"][0]))
        prompts, size = list(requests["prompts"]), self.policy.sample_batch_size
        return Batch.concat([
            self.policy.sample_trajectory(prompts[i:i + size], generator=step_noise, latents=latents[i:i + size],
                                          guidance_scale=guidance_scale, sde_step=sde_step, prefix_steps=prefix_steps,
                                          prefix_generators=row_noise[i:i + size])
            for i in range(0, len(prompts), size)
        ])

    # ----------------------------------------------------------------- actor role
    @register(Dispatch.SHARD_BY_BATCH)
    def update(self, batch: Batch, lr: float, iteration: int = 1) -> dict[str, float]:
        """One algorithm update (training iteration ``iteration``, from 1) on this rank's rows."""
        if self.optimizer is None:
            raise RuntimeError(f"update() called on a worker with roles {sorted(self.roles)}, not actor")
        set_lr(self.optimizer, lr)
        self.policy.train()
        try:
            return self.algo.update(self.policy, self.optimizer, batch, self.generator)
        finally:
            self.policy.eval()

    # ----------------------------------------------------------------- weights and checkpoints
    def rng_streams(self) -> dict[str, torch.Generator]:
        return {"generator": self.generator}

    @register(Dispatch.ONE_TO_ALL)
    def save(self, path: str) -> None:
        """Weights (safetensors), optimizer and the diffusers-layout export on rank 0; RNG on every rank."""
        self._save_weights(Path(path))

    @register(Dispatch.ONE_TO_ALL)
    def load(self, path: str) -> None:
        """Restores what ``save`` wrote."""
        self._load_weights(Path(path))
