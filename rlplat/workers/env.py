"""EnvWorker: owns one shard of the training envs and one of the evaluation envs."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from rlplat.batch import Batch
from rlplat.runtime.dispatch import Dispatch, register
from rlplat.runtime.worker import Worker
from rlplat.workers.policy import PolicyWorker

SPLITS = ("train", "eval")
# Prefix of the final observation's keys in a step result (``include_final_obs``).
FINAL = "final/"
# Key of the policy replica's RNG state in ``EnvWorker.get_state``.
POLICY_RNG = "policy_rng"
# What ``EnvWorker.step`` returns about the step besides the next observation.
EPISODE_KEYS = ("rewards", "terminated", "truncated", "success", "episode_return", "episode_length")


def final_values(result: Batch, obs_keys: list[str], value: Callable[[Batch], Batch]) -> torch.Tensor:
    """V(final observation) where ``result`` (an ``EnvWorker.step`` result) ended an episode
    (terminated or truncated), 0 elsewhere; ``value(obs)`` gives a Batch with ``values``. The
    algorithm decides which ends it bootstraps (PPO's ``algo.bootstrap_at_done``)."""
    done = result["terminated"] | result["truncated"]
    values = torch.zeros(len(result))
    if done.any():
        final = Batch(batch_size=len(result))
        for key in obs_keys:
            final[key] = result[FINAL + key]
        values = torch.where(done, value(final)["values"], values)
    return values


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
            keys) so their ends can be bootstrapped.
        eval_ignore_terminations: build the evaluation envs with ``ignore_terminations=True``,
            so evaluation episodes run to the limit (success at the end vs at any step).
        torch_threads: intra-op threads of this process.
        policy: ``PolicyWorker`` arguments (``policy_cfg``, ``algo_cfg``, ``seed``) for a replica
            of the rollout policy in this process (``placement.rollout_in_env``): ``rollout``
            then runs whole rollouts here, with no call out per env step. The replica samples
            from this process's torch RNG, seeded per rank, and gets its weights from
            ``set_weights``.
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
        eval_ignore_terminations: bool = False,
        torch_threads: int = 1,
        policy: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(rank, world_size)
        torch.set_num_threads(torch_threads)
        sizes = {"train": num_envs, "eval": num_eval_envs}
        overrides = {"train": {}, "eval": {"ignore_terminations": True} if eval_ignore_terminations else {}}
        self.envs = {
            split: instantiate(env_cfg, num_envs=shard_size(total, rank, world_size), **overrides[split])
            for split, total in sizes.items()
        }
        self.include_final_obs = include_final_obs
        train = self.envs["train"]
        self.obs_keys = list(train.single_observation_space.spaces)
        self.replica: PolicyWorker | None = None
        if policy is not None:
            self.replica = PolicyWorker(rank, world_size, observation_space=train.single_observation_space,
                                        action_space=train.single_action_space, roles=["rollout"],
                                        torch_threads=torch_threads, **policy)

    @register(Dispatch.ONE_TO_ALL)
    def close(self) -> None:
        """Closes both splits' envs, so their simulator subprocesses exit with this worker, and
        drops them (idempotent). Dropping releases the vectors' queue semaphores now, while this
        process's multiprocessing resource tracker runs: Ray kills a worker's child processes,
        the tracker among them, and semaphores released after that relaunch a tracker that
        prints a KeyError traceback for each."""
        envs, self.envs = self.envs, {}
        while envs:
            split, env = envs.popitem()
            try:
                env.close()
            except Exception as err:  # a shard whose simulator died is already closed; close the other split too
                print(f"warning: closing the {split} envs of env worker {self.rank}: {err}", flush=True)
            del env
        gc.collect()  # the vectors sit in reference cycles

    @register(Dispatch.RANK_ZERO)
    def spec(self) -> dict[str, Any]:
        """Single observation/action spaces and the episode limit, for building policies."""
        env = self.envs["train"]
        return {
            "observation_space": env.single_observation_space,
            "action_space": env.single_action_space,
            "max_episode_steps": env.max_episode_steps,
            # Episode videos: the rate to play them at, and how many eval envs render() reaches.
            "control_hz": env.control_hz,
            "eval_envs": self.envs["eval"].num_envs,
        }

    @register(Dispatch.SHARD_BY_BATCH)
    def reset(self, seeds: Batch, split: str = "train", group_size: int | None = None) -> Batch:
        """Resets every env of ``split`` with one seed per env (``seeds["seed"]``).

        ``group_size``: blocks of that many consecutive envs start from their first env's state
        (``VectorEnv.reset_groups``; GRPO's groups), whatever the simulator does with equal
        seeds. Shards are contiguous and hold whole groups (``GRPO.check``), so the blocks of
        this shard are groups of the whole run.
        """
        seed = [int(s) for s in seeds["seed"]]
        env = self.envs[split]
        obs, _ = env.reset(seed=seed) if group_size is None else env.reset_groups(seed=seed, group_size=group_size)
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
                out[FINAL + key] = final[key]
        return out

    @register(Dispatch.SHARD_BY_BATCH)
    def rollout(self, obs: Batch, num_steps: int) -> dict[str, Any]:
        """``num_steps`` training steps from ``obs`` (this shard's rows), acting with the local
        policy replica. Returns ``steps``: per step (observation, policy output, result), where the
        result holds ``EPISODE_KEYS`` and, when truncated episodes are bootstrapped,
        ``final_values`` (V of the final observation where an episode ended, else 0); ``obs``: the
        observation after the last step; ``act_s``: seconds spent in the policy."""
        replica = self._replica()
        steps, act_s = [], 0.0
        for _ in range(num_steps):
            t0 = time.perf_counter()
            out = replica.act(obs)
            act_s += time.perf_counter() - t0
            result = self.step(out.select("actions"))
            episode = result.select(*EPISODE_KEYS)
            if self.include_final_obs:
                t0 = time.perf_counter()
                episode["final_values"] = final_values(result, self.obs_keys, replica.value)
                act_s += time.perf_counter() - t0
            steps.append((obs, out, episode))
            obs = result.select(*self.obs_keys)
        return {"steps": steps, "obs": obs, "act_s": act_s}

    @register(Dispatch.ONE_TO_ALL)
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads the trained weights into the policy replica."""
        self._replica().set_weights(weights)

    @register(Dispatch.ONE_TO_ALL)
    def set_action_stats(self, stats: dict[str, Any], key: str) -> None:
        """Hands action statistics to the policy replica (``PolicyWorker.set_action_stats``)."""
        self._replica().set_action_stats(stats, key)

    @register(Dispatch.ONE_TO_ALL)
    def load_policy(self, path: str) -> None:
        """Loads a checkpoint's policy weights and action statistics into the replica (its
        sampling RNG is part of ``get_state``)."""
        self._replica().load(path, rng=False)

    def _replica(self) -> PolicyWorker:
        if self.replica is None:
            raise RuntimeError("this EnvWorker holds no policy replica: it is built with policy=... "
                               "when placement.rollout_in_env=true")
        return self.replica

    @register(Dispatch.ONE_TO_ALL)
    def expert_actions(self, noise: float = 0.0, split: str = "train") -> Batch:
        """The env's scripted expert actions for this shard (``actions``), with optional noise."""
        return Batch({"actions": torch.as_tensor(self.envs[split].expert_actions(noise=noise), dtype=torch.float32)})

    @register(Dispatch.RANK_ZERO)
    def render(self, split: str = "eval", index: int = 0) -> np.ndarray:
        """RGB frame of one env of rank 0's shard, for episode videos."""
        return self.envs[split].render(index)

    @register(Dispatch.ONE_TO_ALL)
    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the training envs exactly (for checkpoints), and the
        policy replica's sampling RNG where there is one."""
        state = self.envs["train"].get_state()
        return {**state, POLICY_RNG: torch.get_rng_state()} if self.replica is not None else state

    @register(Dispatch.ONE_TO_ALL)
    def set_state(self, states: list[dict[str, Any]]) -> None:
        """Restores this rank's entry of ``states`` (as returned by ``get_state``)."""
        state = dict(states[self.rank])
        rng = state.pop(POLICY_RNG, None)
        if (rng is None) != (self.replica is None):
            raise ValueError("the checkpoint's env states were saved with placement.rollout_in_env="
                             f"{rng is not None}; resume with the same setting")
        if rng is not None:
            torch.set_rng_state(rng)
        self.envs["train"].set_state(state)


class EnvStages:
    """The env role split into ``K`` pipeline stages, each its own EnvWorker group, called as one.

    Stage k holds rows ``Batch.chunk(K)[k]`` of every env batch (training and evaluation), spread
    over the env devices like a single group's shards. Calls that take the whole batch (``reset``,
    ``step``, ...) run every stage at once and concatenate in stage order, so the loop sees one
    env of ``num_envs`` rows; ``step_async(k, ...)`` steps one stage alone, which is what lets the
    pipelined rollout overlap stage k's simulation with the policy's inference for another stage.
    With ``K = 1`` this is a plain EnvWorker group.

    Args:
        make_group: builds one stage's WorkerGroup given its EnvWorker ``init_kwargs`` updates
            (``num_envs``, ``num_eval_envs``) and its name.
        stages: K >= 1.
        num_envs: training envs over all stages.
        num_eval_envs: evaluation envs over all stages.
    """

    def __init__(self, make_group: Any, stages: int, num_envs: int, num_eval_envs: int) -> None:
        if stages < 1:
            raise ValueError(f"placement.pipeline_stages={stages} must be >= 1")
        for split, total in (("env.num_envs", num_envs), ("trainer.eval_num_envs", num_eval_envs)):
            if total < stages:
                raise ValueError(f"{split}={total} is smaller than placement.pipeline_stages={stages}: "
                                 "every stage needs at least one env (eval envs: trainer.eval_num_envs, "
                                 "default min(trainer.eval_episodes, env.num_envs))")
        self.groups = []
        first = 0
        try:
            for k in range(stages):
                size = shard_size(num_envs, k, stages)
                group = make_group({"num_envs": size, "num_eval_envs": shard_size(num_eval_envs, k, stages)},
                                   f"env{k}" if stages > 1 else "env")
                for rank in range(group.world_size):  # which training envs each rank holds, for messages
                    n = shard_size(size, rank, group.world_size)
                    group.labels.append(f"training envs {first}-{first + n - 1}")
                    first += n
                self.groups.append(group)
        except BaseException:
            self.shutdown()
            raise

    @property
    def stages(self) -> int:
        return len(self.groups)

    def spec(self) -> dict[str, Any]:
        return self.groups[0].spec()

    def _all(self, method: str, batch: Batch, split: str, **kwargs: Any) -> Batch:
        calls = [g.call_async(method, piece, split=split, **kwargs)
                 for g, piece in zip(self.groups, batch.chunk(self.stages))]
        return Batch.concat([c.get() for c in calls])

    def reset(self, seeds: Batch, split: str = "train", group_size: int | None = None) -> Batch:
        """Resets every stage (``seeds`` rows in global env order); ``group_size`` as for
        ``EnvWorker.reset`` (every shard of every stage holds whole groups: ``GRPO.check``)."""
        return self._all("reset", seeds, split, group_size=group_size)

    def step(self, actions: Batch, split: str = "train") -> Batch:
        """Steps every stage at once."""
        return self._all("step", actions, split)

    def step_async(self, stage: int, actions: Batch, split: str = "train") -> Any:
        """Starts stepping stage ``stage`` with its rows' actions; ``.get()`` waits for the result."""
        return self.groups[stage].call_async("step", actions, split=split)

    def stage_rows(self, batch: Batch) -> list[Batch]:
        """``batch`` (global env order) cut into the stages' rows."""
        return batch.chunk(self.stages)

    def rollout(self, obs: Batch, num_steps: int) -> tuple[list[tuple[Batch, Batch, Batch]], Batch, float]:
        """``EnvWorker.rollout`` on every shard of the one stage (``obs`` in global env order):
        per step (observation, policy output, result) in global env order, the observation after
        the last step, and the slowest shard's seconds in its policy replica."""
        if self.stages != 1:
            raise ValueError("rollouts in the env workers run unstaged: placement.pipeline_stages must be 1")
        shards = self.groups[0].rollout(obs, num_steps=num_steps)
        steps = [tuple(Batch.concat(list(part)) for part in zip(*step))
                 for step in zip(*(shard["steps"] for shard in shards))]
        return steps, Batch.concat([shard["obs"] for shard in shards]), max(shard["act_s"] for shard in shards)

    def _each(self, method: str, *args: Any) -> None:
        for call in [g.call_async(method, *args) for g in self.groups]:
            call.get()

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads trained weights into every env worker's policy replica."""
        self._each("set_weights", weights)

    def set_action_stats(self, stats: dict[str, Any], key: str) -> None:
        self._each("set_action_stats", stats, key)

    def load_policy(self, path: str) -> None:
        self._each("load_policy", path)

    def expert_actions(self, noise: float = 0.0, split: str = "train") -> list[Batch]:
        calls = [g.call_async("expert_actions", noise=noise, split=split) for g in self.groups]
        return [piece for c in calls for piece in c.get()]

    def render(self, split: str = "eval", index: int = 0) -> np.ndarray:
        """A frame of env ``index`` of the first stage's first shard."""
        return self.groups[0].render(split=split, index=index)

    def get_state(self) -> list[dict[str, Any]]:
        calls = [g.call_async("get_state") for g in self.groups]
        return [state for c in calls for state in c.get()]

    def set_state(self, states: list[dict[str, Any]]) -> None:
        per_stage = len(states) // self.stages
        if per_stage * self.stages != len(states) or any(g.world_size != per_stage for g in self.groups):
            raise ValueError(f"the checkpoint holds {len(states)} env shard states; this run has "
                             f"{sum(g.world_size for g in self.groups)} (keep placement and pipeline_stages to resume)")
        calls = [g.call_async("set_state", states[k * per_stage:(k + 1) * per_stage])
                 for k, g in enumerate(self.groups)]
        for c in calls:
            c.get()

    def shutdown(self) -> None:
        for group in self.groups:
            group.shutdown()
