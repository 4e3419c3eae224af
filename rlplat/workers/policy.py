"""PolicyWorker: the policy in one process, serving the rollout, actor and ref roles it holds.

Colocated roles live in one worker (no weight copies); when rollout and actor sit on different
devices they are separate groups and the controller copies weights after each update. Several
actor workers train data-parallel: each takes a shard of the rollout and gradients are averaged
with torch.distributed (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from rlplat.algos.base import Algorithm
from rlplat.algos.optim import build_optimizer, set_lr
from rlplat.batch import Batch
from rlplat.policies.base import ActionPolicy
from rlplat.runtime.dispatch import Dispatch, register
from rlplat.runtime.worker import Worker
from rlplat.workers.weights import TrainedWeights

ACTION_STATS_FILE = "action_stats.json"


class PolicyWorker(TrainedWeights, Worker):
    """Holds a policy (and its optimizer when it is an actor).

    Args:
        policy_cfg: the ``policy`` config (``_target_`` + arguments).
        algo_cfg: the ``algo`` config (``_target_`` + arguments).
        observation_space: the env's single observation space.
        action_space: the env's single action space.
        roles: roles this worker serves: any of rollout, actor, ref.
        seed: parameter init seed (equal on every rank so data-parallel replicas start equal).
        torch_threads: intra-op threads of this process.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        *,
        policy_cfg: dict[str, Any],
        algo_cfg: dict[str, Any],
        observation_space: Any,
        action_space: Any,
        roles: list[str],
        seed: int,
        torch_threads: int = 1,
    ) -> None:
        super().__init__(rank, world_size)
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.policy: ActionPolicy = instantiate(
            policy_cfg, observation_space=observation_space, action_space=action_space
        )
        self.algo: Algorithm = instantiate(algo_cfg)
        self.roles = set(roles)
        self.ref: ActionPolicy | None = None
        if self.algo.needs_ref and "rollout" in self.roles and not self.policy.reference_is_builtin:
            # The reference is the policy as initialised (or loaded), frozen.
            self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.optimizer: torch.optim.Optimizer | None = None
        if "actor" in self.roles:
            self.optimizer = build_optimizer(self.policy.param_groups(float(self.algo.optim["lr"])), self.algo.optim)
        # Action statistics adopted from demonstrations (saved with checkpoints).
        self.action_stats: dict[str, Any] | None = None
        # Minibatch order and action sampling get their own streams, distinct per rank.
        self.minibatch_generator = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
        torch.manual_seed(seed + 104729 * (rank + 1))

    # ----------------------------------------------------------------- rollout role
    @register(Dispatch.SHARD_BY_BATCH)
    @torch.no_grad()
    def act(self, obs: Batch, deterministic: bool = False) -> Batch:
        """Actions, log-probs (and values, ref log-probs) for a batch of observations."""
        self.policy.eval()
        out = self.policy.act(obs, deterministic=deterministic)
        result = Batch({"actions": out.actions, "logprobs": out.logprobs})
        if out.values is not None:
            result["values"] = out.values
        for key, value in out.extras.items():
            result[key] = value
        if self.algo.needs_ref and "rollout" in self.roles:
            if self.ref is not None:
                ref = self.ref.evaluate_actions(obs, out.actions, out.extras)
            else:
                ref = self.policy.evaluate_actions_reference(obs, out.actions, out.extras)
            result["ref_logprobs"] = ref.logprobs
        return result

    @register(Dispatch.SHARD_BY_BATCH)
    @torch.no_grad()
    def value(self, obs: Batch) -> Batch:
        """V(s) for a batch of observations (bootstrapping)."""
        self.policy.eval()
        return Batch({"values": self.policy.value(obs)})

    # ----------------------------------------------------------------- actor role
    @register(Dispatch.SHARD_BY_BATCH)
    def update(self, batch: Batch, lr: float, iteration: int = 1) -> dict[str, float]:
        """One algorithm update (training iteration ``iteration``, from 1) on this rank's shard."""
        if self.optimizer is None:
            raise RuntimeError(f"update() called on a worker with roles {sorted(self.roles)}, not actor")
        set_lr(self.optimizer, lr)
        self.policy.train()
        distributed = self.world_size > 1
        metrics = self.algo.update(
            self.policy,
            self.optimizer,
            batch,
            self.minibatch_generator,
            sync_grads=self._average_gradients if distributed else None,
            sync_mean=self._average_floats if distributed else None,
            iteration=iteration,
        )
        # After the update, so the next rollout and the update on it share one normalisation.
        self.policy.observe(batch, self._average_floats if distributed else None)
        return metrics

    def _average_gradients(self) -> None:
        for p in self.policy.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def _average_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()

    @register(Dispatch.RANK_ZERO)
    def rendezvous(self) -> str:
        """A tcp:// address on rank 0's host for torch.distributed."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{socket.gethostbyname(socket.gethostname())}:{port}"

    @register(Dispatch.ONE_TO_ALL)
    def init_distributed(self, init_method: str) -> None:
        """Joins the data-parallel process group of the actor workers."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size)

    # ----------------------------------------------------------------- weights and checkpoints
    def rng_streams(self) -> dict[str, torch.Generator]:
        return {"minibatch": self.minibatch_generator}

    @register(Dispatch.ONE_TO_ALL)
    def set_action_stats(self, stats: dict[str, Any], key: str) -> None:
        """Adopts action statistics from demonstrations (see ``ActionPolicy.set_action_stats``)."""
        self.policy.set_action_stats(stats, key)
        self.action_stats = {"key": key, "stats": stats}

    @register(Dispatch.ONE_TO_ALL)
    def save(self, path: str) -> None:
        """Writes weights (safetensors), optimizer and action statistics on actor rank 0, and every
        rank's RNG streams."""
        folder = Path(path)
        self._save_weights(folder)
        if self._writes_weights() and self.action_stats is not None:
            (folder / ACTION_STATS_FILE).write_text(json.dumps(self.action_stats, indent=2))

    @register(Dispatch.ONE_TO_ALL)
    def load(self, path: str, rng: bool = True) -> None:
        """Restores what ``save`` wrote (weights always; optimizer, and RNG unless ``rng=False``,
        where present)."""
        folder = Path(path)
        if (folder / ACTION_STATS_FILE).exists():
            saved = json.loads((folder / ACTION_STATS_FILE).read_text())
            self.set_action_stats(saved["stats"], saved["key"])
        # The reference stays the initial policy: it is rebuilt from the same seed on resume.
        self._load_weights(folder, rng=rng)
