"""Weight sync and checkpoint files shared by the workers that train a policy.

``PolicyWorker`` (action policies) and ``DiffusionWorker`` (text-to-image policies) keep the
same files in a checkpoint's ``policy/`` folder: the trained weights (safetensors) and the
optimizer once, from actor rank 0, the family's own export (``pretrained/``) beside them, and
each rank's RNG streams, so that a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlplat.runtime.dispatch import Dispatch, register

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
PRETRAINED_DIR = "pretrained"


class TrainedWeights:
    """Mixin for a Worker with ``policy`` (``trainable_state_dict``, ``load_trainable_state_dict``,
    ``save_pretrained``), ``optimizer`` (None without the actor role), ``rank`` and ``roles``.

    ``rng_streams()`` names the worker's own generators; they are saved with torch's global RNG.
    """

    def rng_streams(self) -> dict[str, torch.Generator]:
        raise NotImplementedError

    @register(Dispatch.RANK_ZERO)
    def get_weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the trained weights (to sync rollout workers; frozen weights stay put)."""
        return {k: v.detach().cpu().clone() for k, v in self.policy.trainable_state_dict().items()}

    @register(Dispatch.ONE_TO_ALL)
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads trained weights (strictly: names and shapes must match)."""
        self.policy.load_trainable_state_dict(weights)

    def _writes_weights(self) -> bool:
        # Weights once per checkpoint: a separate rollout group holds a synced copy of them.
        return self.rank == 0 and "actor" in self.roles

    def _save_weights(self, folder: Path) -> None:
        """Weights, optimizer and the family's export (e.g. save_pretrained + LoRA adapter) on actor
        rank 0; every rank's RNG streams."""
        folder.mkdir(parents=True, exist_ok=True)
        if self._writes_weights():
            save_file({k: v.contiguous() for k, v in self.get_weights().items()}, folder / WEIGHTS_FILE)
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            self.policy.save_pretrained(folder / PRETRAINED_DIR)
        rng = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in self.rng_streams().items()}}
        torch.save(rng, self._rng_file(folder))

    def _load_weights(self, folder: Path, rng: bool = True) -> None:
        """Restores what ``_save_weights`` wrote (weights always; optimizer, and RNG if ``rng``,
        where present)."""
        self.policy.load_trainable_state_dict(load_file(folder / WEIGHTS_FILE))
        if self.optimizer is not None and (folder / OPTIMIZER_FILE).exists():
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
        if rng and self._rng_file(folder).exists():
            rng = torch.load(self._rng_file(folder), weights_only=True)
            torch.set_rng_state(rng["torch"])
            for name, generator in self.rng_streams().items():
                generator.set_state(rng[name])

    def _rng_file(self, folder: Path) -> Path:
        return folder / f"rng_{'-'.join(sorted(self.roles))}_rank{self.rank}.pt"
