"""EnvWorker: owns one shard of the training envs and one of the evaluation envs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from rlplat.batch import Batch
from rlplat.runtime.dispatch import Dispatch, register
from rlplat.runtime.worker import Worker

SPLITS = ("train", "eval")


def shard_size(total: int, rank: int, world_size: int) -> int:
    """Rows of ``total`` that rank gets under ``Batch.chunk`` (contiguous, np.array_split sizes)."""
    return total // world_size + (1 if rank < total % world_size else 0)


class EnvWorker(Worker):
    """A shard of vector envs for training and one for evaluation.

    Shards are contiguous slices of the global env index, and every env is seeded by its global
    index, so a run gives the same trajectories whatever the number of env workers.

    Args:
        env_cfg: the ``env`` config (a ``_target_`` plus constructor arguments).
        num_envs: training envs over all workers.
        num_eval_envs: evaluation envs over all workers.
        include_final_obs: return the terminal observation of finished episodes (``final/*``
            keys) so truncated episodes can be bootstrapped.
        torch_threads: intra-op threads of this process.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        *,
        env_cfg: dict[str, Any],
        num_envs: int,
        num_eval_envs: int,
        include_final_obs: bool = True,
        torch_threads: int = 1,
    ) -> None:
        super().__init__(rank, world_size)
        torch.set_num_threads(torch_threads)
        sizes = {"train": num_envs, "eval": num_eval_envs}
        self.envs = {
            split: instantiate(env_cfg, num_envs=shard_size(total, rank, world_size))
            for split, total in sizes.items()
        }
        self.include_final_obs = include_final_obs

    @register(Dispatch.RANK_ZERO)
    def spec(self) -> dict[str, Any]:
        """Single observation/action spaces and the episode limit, for building policies."""
        env = self.envs["train"]
        return {
            "observation_space": env.single_observation_space,
            "action_space": env.single_action_space,
            "max_episode_steps": env.max_episode_steps,
        }

    @register(Dispatch.SHARD_BY_BATCH)
    def reset(self, seeds: Batch, split: str = "train") -> Batch:
        """Resets every env of ``split`` with one seed per env (``seeds["seed"]``)."""
        obs, _ = self.envs[split].reset(seed=[int(s) for s in seeds["seed"]])
        return Batch.from_numpy_dict(obs)

    @register(Dispatch.SHARD_BY_BATCH)
    def step(self, actions: Batch, split: str = "train") -> Batch:
        """Steps ``split`` with ``actions["actions"]``; auto-resets finished envs."""
        obs, reward, terminated, truncated, info = self.envs[split].step(actions["actions"].numpy())
        out = Batch.from_numpy_dict(obs)
        out["rewards"] = torch.as_tensor(reward, dtype=torch.float32)
        out["terminated"] = torch.as_tensor(terminated, dtype=torch.bool)
        out["truncated"] = torch.as_tensor(truncated, dtype=torch.bool)
        out["success"] = torch.as_tensor(info["success"], dtype=torch.bool)
        out["episode_return"] = torch.as_tensor(info["episode_return"], dtype=torch.float32)
        out["episode_length"] = torch.as_tensor(info["episode_length"], dtype=torch.long)
        if self.include_final_obs:
            final = Batch.from_numpy_dict(info["final_obs"])
            for key in final.keys():
                out[f"final/{key}"] = final[key]
        return out

    @register(Dispatch.ONE_TO_ALL)
    def expert_actions(self, noise: float = 0.0, split: str = "train") -> Batch:
        """The env's scripted expert actions for this shard (``actions``), with optional noise."""
        env = self.envs[split]
        if not hasattr(env, "expert_actions"):
            raise NotImplementedError(
                f"{type(env).__name__} has no scripted expert (expert_actions); algo=sft needs one"
            )
        return Batch({"actions": torch.as_tensor(env.expert_actions(noise=noise), dtype=torch.float32)})

    @register(Dispatch.RANK_ZERO)
    def render(self, split: str = "eval", index: int = 0) -> np.ndarray:
        """RGB frame of one env of rank 0's shard, for episode videos."""
        return self.envs[split].render(index)

    @register(Dispatch.ONE_TO_ALL)
    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the training envs exactly (for checkpoints)."""
        return self.envs["train"].get_state()

    @register(Dispatch.ONE_TO_ALL)
    def set_state(self, states: list[dict[str, Any]]) -> None:
        """Restores this rank's entry of ``states`` (as returned by ``get_state``)."""
        self.envs["train"].set_state(states[self.rank])
