"""Shared machinery of the simulator envs (ManiSkill3, LIBERO) behind the VectorEnv contract.

A simulator env is a *backend* that steps N scenes and returns contract observations (numpy,
without ``instruction``), wrapped by ``SimVectorEnv``, which adds what every simulator needs the
same way: instructions, episode returns and lengths, SAME_STEP auto-reset with ``final_obs``, the
snapshot for checkpoints. The backends: ``ProcessVector`` (one single-scene gymnasium env per
subprocess, or all in this process), ``GroupedProcessVector`` (several scenes per subprocess,
stepped one after another there: fewer processes, less memory, less switching on small CPUs),
both for CPU simulators and built by ``process_vector``, and a simulator's own batched env
(ManiSkill on the GPU).

A backend has ``observation_space`` (single, contract keys), ``action_space`` (single),
``max_episode_steps`` and the methods ``reset(seeds) -> obs``, ``reset_rows(mask) -> obs`` (a
new episode on the masked rows, each continuing its own RNG), ``step(actions) -> (obs, reward,
terminated, truncated, success)``, ``render(index)``, ``snapshot()``, ``restore(snap)``,
``dead()`` (the simulator processes that exited, so a crash is named: ``SimulatorDied``) and
``close()``; backends of envs that copy group start states (``VectorEnv.reset_groups``) also
have ``copy_starts(sources) -> obs``: right after a reset, every env i restarts from the state
of env ``sources[i]`` (a source from its own), and the new observations of all envs come back.
Sources restart too because setting a state is not bit-for-bit the path a reset takes (PhysX
keeps solver data outside the state): envs that all went through the same ``set_state`` step
identically, a source that kept its reset would drift from its copies at float precision. On the
CPU backends the sources' ``snapshot()`` goes, through this process (a source and its copies may
live in different subprocesses), to ``start_from(snap) -> obs`` of every env.
"""

from __future__ import annotations

import abc
import functools
import signal
import string
import time
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from rlplat.envs.base import Obs, Seed, SimulatorDied, VectorEnv, step_info

VECTOR_MODES = ("async", "sync")
_INSTRUCTION_MAX_CHARS = 256


def stack_obs(rows: Sequence[Obs]) -> Obs:
    """Single-env observations -> one batched observation (a new leading dim)."""
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def copy_sources(sources: Sequence[int] | np.ndarray, num_envs: int) -> tuple[list[int], list[int]]:
    """``copy_starts``'s ``sources`` as ints, and the distinct sources (ascending).

    Raises:
        ValueError: naming ``sources`` if it has the wrong length, or an env copied from takes
            another env's state itself (the result would depend on the order of the copies).
    """
    sources = [int(i) for i in np.asarray(sources).reshape(-1)]
    if len(sources) != num_envs or not all(0 <= i < num_envs for i in sources):
        raise ValueError(f"sources: need one env index in [0, {num_envs}) per env, got {sources}")
    leaders = sorted(set(sources))
    chained = [i for i in leaders if sources[i] != i]
    if chained:
        raise ValueError(f"sources: envs {chained} are copied from but take another env's state themselves; "
                         "point every env at an env that is its own source")
    return sources, leaders


def spaces_of(obs: Obs) -> spaces.Dict:
    """Single-env spaces of a batched contract observation (uint8 images, float32 or int64 rest)."""
    out = {}
    for key, value in obs.items():
        if value.dtype == np.uint8:
            out[key] = spaces.Box(0, 255, value.shape[1:], np.uint8)
        elif np.issubdtype(value.dtype, np.integer):
            out[key] = spaces.Box(0, np.iinfo(np.int64).max, value.shape[1:], np.int64)
        else:
            out[key] = spaces.Box(-np.inf, np.inf, value.shape[1:], np.float32)
    return spaces.Dict(out)


class ProcessVector:
    """A gymnasium vector of single-scene envs (``vector="async"``: a subprocess each; ``"sync"``:
    all in this process), auto-reset left to the owner so success is read before any reset.

    The single envs are ``gymnasium.Env``s with contract observations and ``info["success"]``,
    plus ``max_episode_steps``, ``snapshot()`` and ``restore(snap)``.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gymnasium.Env]], vector: str, context: str | None) -> None:
        if vector not in VECTOR_MODES:
            raise ValueError(f"vector: must be one of {VECTOR_MODES}, got {vector!r}")
        mode = gymnasium.vector.AutoresetMode.DISABLED
        if vector == "async":
            self.vec = gymnasium.vector.AsyncVectorEnv(list(env_fns), context=context, autoreset_mode=mode)
        else:
            self.vec = gymnasium.vector.SyncVectorEnv(list(env_fns), autoreset_mode=mode)
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space
        self.max_episode_steps = int(self.vec.get_attr("max_episode_steps")[0])

    def reset(self, seeds: list[int]) -> Obs:
        obs, _ = self.vec.reset(seed=seeds)
        return {k: np.array(v) for k, v in obs.items()}

    def reset_rows(self, mask: np.ndarray) -> Obs:
        # No seed: each env continues its own RNG, as one big env would.
        obs, _ = self.vec.reset(options={"reset_mask": np.asarray(mask, bool)})
        return {k: np.array(v) for k, v in obs.items()}

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        obs, reward, terminated, truncated, info = self.vec.step(actions)
        success = np.asarray(info.get("success", np.zeros(len(reward), bool)), bool)
        return ({k: np.array(v) for k, v in obs.items()}, np.asarray(reward, np.float64),
                np.asarray(terminated, bool), np.asarray(truncated, bool), success)

    def render(self, index: int) -> np.ndarray:
        if isinstance(self.vec, gymnasium.vector.SyncVectorEnv):
            return self.vec.envs[index].render()
        return self.vec.call("render")[index]

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self.vec.call("snapshot"))

    def restore(self, snaps: list[dict[str, Any]]) -> None:
        if isinstance(self.vec, gymnasium.vector.SyncVectorEnv):
            for env, snap in zip(self.vec.envs, snaps, strict=True):
                env.restore(snap)
            return
        # gymnasium's call() passes the same arguments to every env; each needs its own snapshot.
        _call_each(self.vec, "restore", [(snap,) for snap in snaps])

    def dead(self) -> list[tuple[int, int, slice]]:
        """(process index, exit code, the envs it held) of every simulator process that exited."""
        return _dead_processes(self.vec, [slice(i, i + 1) for i in range(self.vec.num_envs)])

    def copy_starts(self, sources: Sequence[int] | np.ndarray) -> Obs:
        """Right after a reset, env i restarts from env ``sources[i]``'s state (see the module
        docstring); returns every env's new observation."""
        sources, leaders = copy_sources(sources, self.vec.num_envs)
        if isinstance(self.vec, gymnasium.vector.SyncVectorEnv):
            snaps = {i: self.vec.envs[i].snapshot() for i in leaders}
            rows = [env.start_from(snaps[i]) for env, i in zip(self.vec.envs, sources, strict=True)]
        else:
            snaps = dict(zip(leaders, _call_each(self.vec, "snapshot", {i: () for i in leaders}), strict=True))
            rows = _call_each(self.vec, "start_from", [(snaps[i],) for i in sources])
        return {k: np.array(v) for k, v in stack_obs(rows).items()}

    def close(self, terminate: bool = False) -> None:
        if isinstance(self.vec, gymnasium.vector.AsyncVectorEnv):
            self.vec.close(terminate=terminate)
        else:
            self.vec.close()


def _dead_processes(vec: Any, held: list[slice]) -> list[tuple[int, int, slice]]:
    processes = getattr(vec, "processes", [])  # AsyncVectorEnv's; a SyncVectorEnv has none
    return [(i, p.exitcode, held[i]) for i, p in enumerate(processes) if p.exitcode is not None]


def _exit_words(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _call_each(vec: gymnasium.vector.AsyncVectorEnv, name: str,
               args: Sequence[tuple] | dict[int, tuple]) -> list[Any]:
    """``name(*args[i])`` on sub-env i of ``vec`` (every sub-env for a sequence, the listed ones
    for a dict), all at once; the answers in that order. gymnasium's ``call`` passes the same
    arguments to every sub-env, so this speaks its pipe protocol (``("_call", ...)``) directly;
    a sub-env's error is re-raised here as ``call`` would."""
    calls = dict(args) if isinstance(args, dict) else dict(enumerate(args))
    if not isinstance(args, dict) and len(calls) != len(vec.parent_pipes):
        raise ValueError(f"{name}: {len(calls)} argument tuples for {len(vec.parent_pipes)} sub-envs")
    pipes = [vec.parent_pipes[i] for i in calls]
    for pipe, a in zip(pipes, calls.values(), strict=True):
        pipe.send(("_call", (name, a, {})))
    results, successes = zip(*[pipe.recv() for pipe in pipes])
    # gymnasium counts the errors to fetch from all its sub-envs: the others count as fine.
    vec._raise_if_errors([True] * (len(vec.parent_pipes) - len(pipes)) + list(successes))
    return list(results)


class _EnvGroup(gymnasium.Env):
    """Several single-scene envs in one process, stepped one after another: one subprocess of a
    ``GroupedProcessVector``. Its ``*_group`` methods take and return batches over its envs.

    Only the first env is built up front (gymnasium builds a throwaway copy of sub-env 0 in the
    parent to read the spaces, which are a single scene's); the others on first use.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gymnasium.Env]]) -> None:
        self._fns = list(env_fns)
        self.envs = [self._fns[0]()]
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self.max_episode_steps = self.envs[0].max_episode_steps
        self._last: list[Obs] = []

    def _all(self) -> list[gymnasium.Env]:
        while len(self.envs) < len(self._fns):
            self.envs.append(self._fns[len(self.envs)]())
        return self.envs

    def reset_group(self, seeds: list[int]) -> Obs:
        self._last = [env.reset(seed=int(seed))[0] for env, seed in zip(self._all(), seeds, strict=True)]
        return stack_obs(self._last)

    def reset_rows_group(self, mask: np.ndarray) -> Obs:
        for i in np.flatnonzero(mask):
            self._last[i] = self.envs[i].reset()[0]
        return stack_obs(self._last)

    def step_group(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        out = [env.step(action) for env, action in zip(self.envs, actions, strict=True)]
        self._last = [o[0] for o in out]
        return (stack_obs(self._last), np.array([o[1] for o in out], np.float64), np.array([o[2] for o in out], bool),
                np.array([o[3] for o in out], bool), np.array([bool(o[4].get("success", False)) for o in out]))

    def render_env(self, index: int) -> np.ndarray:
        return self.envs[index].render()

    def snapshot_group(self) -> list[dict[str, Any]]:
        return [env.snapshot() for env in self.envs]

    def restore_group(self, snaps: list[dict[str, Any]]) -> None:
        for env, snap in zip(self._all(), snaps, strict=True):
            env.restore(snap)

    def start_from_group(self, snaps: list[dict[str, Any]]) -> Obs:
        """``start_from(snaps[i])`` on every env i of this group; their observations."""
        self._last = [env.start_from(snap) for env, snap in zip(self._all(), snaps, strict=True)]
        return stack_obs(self._last)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Obs, dict]:
        raise NotImplementedError("an env group resets through reset_group")

    def step(self, action: np.ndarray) -> Any:
        raise NotImplementedError("an env group steps through step_group")

    def close(self) -> None:
        for env in self.envs:
            env.close()


class GroupedProcessVector:
    """The ``ProcessVector`` interface with ``envs_per_process`` scenes in each subprocess.

    The envs are split into contiguous groups (sizes as ``np.array_split``); every call goes to
    all groups at once and their answers are concatenated in env order, so the rows, seeds and
    episodes are those of a ``ProcessVector`` over the same env functions.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gymnasium.Env]], envs_per_process: int, context: str | None) -> None:
        fns = list(env_fns)
        chunks = np.array_split(np.arange(len(fns)), -(-len(fns) // envs_per_process))
        self.slices = [slice(int(c[0]), int(c[-1]) + 1) for c in chunks]
        self.vec = gymnasium.vector.AsyncVectorEnv(
            [functools.partial(_EnvGroup, fns[sl]) for sl in self.slices], context=context,
            shared_memory=False, autoreset_mode=gymnasium.vector.AutoresetMode.DISABLED)
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space
        self.max_episode_steps = int(self.vec.get_attr("max_episode_steps")[0])

    def dead(self) -> list[tuple[int, int, slice]]:
        """(process index, exit code, the envs it held) of every simulator process that exited."""
        return _dead_processes(self.vec, self.slices)

    @staticmethod
    def _concat(parts: list[Obs]) -> Obs:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def reset(self, seeds: list[int]) -> Obs:
        return self._concat(_call_each(self.vec, "reset_group", [(list(seeds[sl]),) for sl in self.slices]))

    def reset_rows(self, mask: np.ndarray) -> Obs:
        mask = np.asarray(mask, bool)
        return self._concat(_call_each(self.vec, "reset_rows_group", [(mask[sl],) for sl in self.slices]))

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        parts = _call_each(self.vec, "step_group", [(actions[sl],) for sl in self.slices])
        obs = self._concat([p[0] for p in parts])
        return (obs, *(np.concatenate([p[i] for p in parts]) for i in range(1, 5)))

    def _group_of(self, index: int) -> tuple[int, int]:
        for g, sl in enumerate(self.slices):
            if sl.start <= index < sl.stop:
                return g, index - sl.start
        raise IndexError(f"env index {index} out of range for {self.slices[-1].stop} envs")

    def render(self, index: int) -> np.ndarray:
        group, inner = self._group_of(index)
        return _call_each(self.vec, "render_env", {group: (inner,)})[0]

    def snapshot(self) -> list[dict[str, Any]]:
        return [snap for group in _call_each(self.vec, "snapshot_group", [()] * len(self.slices)) for snap in group]

    def restore(self, snaps: list[dict[str, Any]]) -> None:
        _call_each(self.vec, "restore_group", [(snaps[sl],) for sl in self.slices])

    def copy_starts(self, sources: Sequence[int] | np.ndarray) -> Obs:
        """As ``ProcessVector.copy_starts``; a source and its copies may sit in different
        subprocesses, so the sources' snapshots come here and go out to the copies' groups."""
        sources, leaders = copy_sources(sources, self.slices[-1].stop)
        groups = sorted({self._group_of(i)[0] for i in leaders})
        by_group = dict(zip(groups, _call_each(self.vec, "snapshot_group", {g: () for g in groups}), strict=True))
        snaps = [by_group[g][inner] for g, inner in map(self._group_of, sources)]
        return self._concat(_call_each(self.vec, "start_from_group", [(snaps[sl],) for sl in self.slices]))

    def close(self, terminate: bool = False) -> None:
        self.vec.close(terminate=terminate)


def process_vector(env_fns: Sequence[Callable[[], gymnasium.Env]], vector: str, context: str | None,
                   envs_per_process: int = 1) -> ProcessVector | GroupedProcessVector:
    """The CPU backend for ``vector`` ("async" or "sync") with ``envs_per_process`` scenes per
    subprocess (async only; 1: gymnasium's AsyncVectorEnv, a subprocess per scene)."""
    if not isinstance(envs_per_process, int) or envs_per_process < 1:
        raise ValueError(f"envs_per_process: must be an int >= 1, got {envs_per_process!r}")
    if vector == "async" and envs_per_process > 1 and len(env_fns) > 1:
        return GroupedProcessVector(env_fns, envs_per_process, context)
    return ProcessVector(env_fns, vector, context)


class SimVectorEnv(VectorEnv, abc.ABC):
    """The contract around a simulator backend (see the module docstring).

    Subclasses build the backend, call ``super().__init__(backend, num_envs)`` and implement
    ``instructions(obs)``.

    Args:
        sim: the backend.
        num_envs: N.
        ignore_terminations: success does not end the episode (episodes run to the limit).
    """

    def __init__(self, sim: Any, num_envs: int, ignore_terminations: bool = False) -> None:
        self._sim = sim
        self.ignore_terminations = bool(ignore_terminations)
        single = dict(sim.observation_space.spaces)
        single["instruction"] = spaces.Text(_INSTRUCTION_MAX_CHARS, charset=string.printable)
        super().__init__(num_envs=num_envs, max_episode_steps=sim.max_episode_steps,
                         single_observation_space=spaces.Dict(single), single_action_space=sim.action_space)
        self._ep_return = np.zeros(num_envs, np.float64)
        self._ep_length = np.zeros(num_envs, np.int64)
        self._last_obs: Obs | None = None

    @abc.abstractmethod
    def instructions(self, obs: Obs) -> list[str]:
        """The language instruction of every row of ``obs``."""

    def _with_instruction(self, obs: Obs) -> Obs:
        obs["instruction"] = np.array(self.instructions(obs), dtype=object)
        return obs

    def _sim_call(self, method: str, *args: Any) -> Any:
        """``self._sim.<method>(*args)``; a simulator process that died is named (``SimulatorDied``)."""
        try:
            return getattr(self._sim, method)(*args)
        except (EOFError, OSError) as err:  # a dead subprocess: broken pipe, connection reset
            dead, deadline = self._sim.dead(), time.monotonic() + 3.0
            while not dead and time.monotonic() < deadline:  # the exit status arrives after the pipe breaks
                time.sleep(0.05)
                dead = self._sim.dead()
            if not dead:
                raise
            self._sim.close(terminate=True)  # the others too: the vector cannot go on without it
            index, code, envs = dead[0]
            raise SimulatorDied(f"lost its simulator process {index} (this shard's envs {envs.start}-"
                                f"{envs.stop - 1}; {_exit_words(code)})") from err

    def reset(self, *, seed: Seed = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        obs = self._sim_call("reset", self._seeds(seed))
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._last_obs = self._with_instruction(obs)
        return self._last_obs, {}

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions, np.float32)
        if actions.shape != self.action_space.shape:
            raise ValueError(f"actions: expected shape {self.action_space.shape}, got {actions.shape}")
        obs, reward, terminated, truncated, success = self._sim_call("step", actions)
        if self.ignore_terminations:
            terminated = np.zeros_like(terminated)
        self._ep_return += reward
        self._ep_length += 1
        done = terminated | truncated
        info = step_info(success, done, self._ep_return, self._ep_length,
                         self._with_instruction({k: v.copy() for k, v in obs.items()}))
        if done.any():
            fresh = self._sim_call("reset_rows", done)
            for key, value in fresh.items():
                obs[key][done] = value[done]
            self._ep_return[done] = 0.0
            self._ep_length[done] = 0
        self._last_obs = self._with_instruction(obs)
        return self._last_obs, reward.astype(np.float32), terminated, truncated, info

    def render(self, index: int = 0) -> np.ndarray:
        if self._last_obs is not None and "image" in self._last_obs:
            return self._last_obs["image"][index]
        return self._sim_call("render", index)

    def get_state(self) -> dict[str, Any]:
        return {"sim": self._sim_call("snapshot"), "ep_return": self._ep_return.copy(),
                "ep_length": self._ep_length.copy(), "last_obs": self._last_obs}

    def set_state(self, state: dict[str, Any]) -> None:
        self._sim_call("restore", state["sim"])
        self._ep_return[:] = state["ep_return"]
        self._ep_length[:] = state["ep_length"]
        self._last_obs = state["last_obs"]

    def close_extras(self, **kwargs: Any) -> None:
        self._sim.close()
