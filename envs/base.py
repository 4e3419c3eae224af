"""The VectorEnv contract every rlplat environment follows (toy, ManiSkill, LIBERO).

A ``VectorEnv`` is a batch of ``num_envs`` independent sub-environments stepped together with
numpy arrays. It follows the gymnasium 1.x vector API with SAME_STEP auto-reset, and fixes the
observation keys, the info keys and the seeding rule so that workers, policies and algorithms
can rely on them without knowing which simulator is underneath.

Observation keys (a dict of numpy arrays, leading dim N = ``num_envs``):
    ``state``: float32 [N, S]. Privileged full state, for MLP baselines and critics.
    ``proprio``: float32 [N, P]. What a real robot knows about itself (e.g. end-effector pose).
    ``image``: uint8 [N, H, W, 3]. Camera view, row 0 at the top. Present only when the env's
        obs mode includes rgb.
    ``instruction``: object array [N] of str. The natural-language task for each env.

Info keys returned by ``step`` (all arrays of length N):
    ``success``: bool. The task is solved at this step (evaluated before any reset).
    ``done``: bool. ``terminated | truncated``.
    ``episode_return``: float32. Undiscounted return of the episode that ended; 0 on other rows.
    ``episode_length``: int64. Length of the episode that ended; 0 on other rows.
    ``final_obs``: dict with the observation keys, full batch. On rows where ``done`` it is
        the last observation of the finished episode (for bootstrapping truncated episodes);
        other rows hold the same values as the returned obs and carry no extra meaning.

Seeding: every sub-env owns its own ``np.random.Generator``. ``reset(seed=s)`` seeds env i with
``s + i``, so a shard holding envs [a, b) of a larger run, reset with the seed list
``[s + a, ..., s + b - 1]``, behaves exactly like those rows of one big env.

Groups: ``reset_groups(seed, group_size)`` resets and makes every block of ``group_size``
consecutive envs start from its first env's (the leader's) state, so the episodes of a group
differ only by the actions taken (GRPO compares them). Where the start state is a function of
the seed alone (the toy env, one CPU scene per env) giving members their leader's seed suffices;
where it is not (ManiSkill's batched GPU reset draws all scenes from one stream) the env copies
the leader's simulator state onto the members.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

Obs = dict[str, np.ndarray]


def check_arg(ok: bool, name: str, message: str) -> None:
    """Raises ``ValueError("<name>: <message>")`` unless ``ok``: env arguments name themselves."""
    if not ok:
        raise ValueError(f"{name}: {message}")


Seed = int | Sequence[int] | np.ndarray | None


class SimulatorDied(RuntimeError):
    """A simulator process behind a VectorEnv exited (killed, crashed, out of memory); the message
    names which process, the envs it held and how it exited. The run treats it as a dead worker
    (``trainer.max_restarts``)."""


def step_info(success: np.ndarray, done: np.ndarray, episode_return: np.ndarray, episode_length: np.ndarray,
              final_obs: Obs) -> dict[str, Any]:
    """The info dict of the contract for one step: the running return and length reported only
    on rows whose episode ended (0 elsewhere)."""
    return {
        "success": success,
        "done": done,
        "episode_return": np.where(done, episode_return, 0.0).astype(np.float32),
        "episode_length": np.where(done, episode_length, 0),
        "final_obs": final_obs,
    }


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A JSON-able description of an observation or action space (``Dict`` of ``Box`` / ``Text``),
    which ``space_from_json`` turns back into an equal space: a run writes its env's spaces this
    way, so a server can rebuild the policy without the simulator."""
    if isinstance(space, spaces.Dict):
        return {"type": "dict", "spaces": {key: space_to_json(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, spaces.Box):
        return {"type": "box", "shape": list(space.shape), "dtype": space.dtype.str,
                "low": space.low.tolist(), "high": space.high.tolist()}
    if isinstance(space, spaces.Text):
        return {"type": "text", "min_length": space.min_length, "max_length": space.max_length,
                "charset": "".join(sorted(space.character_set))}
    raise TypeError(f"cannot describe a {type(space).__name__} space (the env contract uses Dict, Box and Text)")


def space_from_json(data: dict[str, Any]) -> spaces.Space:
    """The space ``space_to_json`` described."""
    kind = data.get("type")
    if kind == "dict":
        return spaces.Dict({key: space_from_json(sub) for key, sub in data["spaces"].items()})
    if kind == "box":
        dtype = np.dtype(data["dtype"])
        shape = tuple(data["shape"])
        return spaces.Box(np.asarray(data["low"], dtype).reshape(shape), np.asarray(data["high"], dtype).reshape(shape),
                          shape, dtype)
    if kind == "text":
        return spaces.Text(data["max_length"], min_length=data["min_length"], charset=data["charset"])
    raise ValueError(f"unknown space type {kind!r} (expected dict, box or text)")


def group_leaders(num_envs: int, group_size: int) -> np.ndarray:
    """The leader of every env's group: int64 [num_envs], env i -> ``i // group_size * group_size``.

    Groups are blocks of ``group_size`` consecutive envs, so a contiguous shard whose size is a
    multiple of ``group_size`` holds whole groups (the leader of a row never lives elsewhere).

    Raises:
        ValueError: naming ``group_size`` unless it is an int >= 1 that divides ``num_envs``.
    """
    check_arg(isinstance(group_size, numbers.Integral) and not isinstance(group_size, bool)
              and group_size >= 1 and num_envs % group_size == 0, "group_size",
              f"must be an int >= 1 that divides num_envs={num_envs} (a group never spans two env "
              f"shards), got {group_size!r}")
    return np.arange(num_envs, dtype=np.int64) // int(group_size) * int(group_size)


class VectorEnv(gymnasium.vector.VectorEnv, abc.ABC):
    """Abstract batched environment with SAME_STEP partial auto-reset.

    Subclasses call ``super().__init__`` with the single-env spaces and implement ``reset``,
    ``step``, ``get_state``, ``set_state`` and ``render``, and override ``reset_groups`` when
    equal seeds do not give equal start states. See the module docstring for the observation
    and info keys every implementation must produce.

    Attributes:
        num_envs: Number of sub-environments N.
        max_episode_steps: Steps after which an episode is truncated.
        single_observation_space: ``spaces.Dict`` of one sub-env's observation.
        single_action_space: ``spaces.Box`` of one sub-env's action.
        observation_space: The batched observation space.
        action_space: The batched action space.
        control_hz: Steps per second of the system the env models (episode videos play at this
            rate); None when it has none (videos then play at 10 fps).
    """

    control_hz: float | None = None

    # SAME_STEP: the obs returned by step() already starts the next episode on rows that
    # ended; the terminal obs lives in info["final_obs"]. This avoids the "dead" step of
    # NEXT_STEP auto-reset, which would waste simulator time and complicate GAE.
    metadata: dict[str, Any] = {"autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int,
        max_episode_steps: int,
        single_observation_space: spaces.Dict,
        single_action_space: spaces.Box,
    ) -> None:
        """Sets the spaces and sizes shared by all envs.

        Args:
            num_envs: Number of sub-environments, >= 1.
            max_episode_steps: Episode limit in steps, >= 1.
            single_observation_space: One sub-env's observation space.
            single_action_space: One sub-env's action space.
        """
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.single_observation_space = single_observation_space
        self.single_action_space = single_action_space
        self.observation_space = batch_space(single_observation_space, num_envs)
        self.action_space = batch_space(single_action_space, num_envs)

    @abc.abstractmethod
    def reset(
        self, *, seed: Seed = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        """Starts a new episode in every sub-env.

        Args:
            seed: An int s seeds env i with s + i; a sequence gives one seed per env; None
                continues each env's generator (or seeds from OS entropy on first use).
            options: Reserved for env-specific options.

        Returns:
            ``(obs, info)`` with the observation keys of the contract.
        """

    @abc.abstractmethod
    def step(
        self, actions: np.ndarray
    ) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Advances every sub-env by one step, auto-resetting those that end.

        Args:
            actions: float array [N, A].

        Returns:
            ``(obs, reward float32 [N], terminated bool [N], truncated bool [N], info)`` with
            the info keys of the contract.
        """

    @abc.abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Returns a picklable snapshot from which ``set_state`` continues bit-exactly.

        It holds the env arrays, step counters and every generator's ``bit_generator.state``.
        """

    @abc.abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a snapshot made by ``get_state`` on an env built with the same arguments."""

    @abc.abstractmethod
    def render(self, index: int = 0) -> np.ndarray:  # type: ignore[override]
        """Draws sub-env ``index`` as uint8 [H, W, 3] for episode videos, whatever the obs mode."""

    def reset_groups(self, *, seed: Seed = None, group_size: int) -> tuple[Obs, dict[str, Any]]:
        """``reset(seed)`` where every group of ``group_size`` consecutive envs starts from the
        state of its first env (the leader), whatever seeds the other members were given.

        GRPO normalises outcomes within a group, which is only an advantage estimate when the
        group's episodes start alike and differ by the policy's sampling alone. This default
        resets every member with its leader's seed: enough for envs whose start state is a
        function of the seed alone (each sub-env draws its episode from its own generator
        seeded by it). Envs where equal seeds do not give equal states override it.

        Args:
            seed: As for ``reset``; the leaders' seeds decide the groups' start states.
            group_size: Envs per group, dividing ``num_envs``.

        Returns:
            ``(obs, info)`` as from ``reset``; a member's row equals its leader's.

        Raises:
            ValueError: naming ``group_size`` if it does not divide ``num_envs``.
        """
        leaders = group_leaders(self.num_envs, group_size)
        seeds = self._seeds(seed)
        return self.reset(seed=[seeds[i] for i in leaders])

    def expert_actions(self, noise: float = 0.0) -> np.ndarray:
        """A scripted expert's actions [N, A] for the current states, plus Gaussian ``noise`` (the
        demonstrations of ``algo=sft``); envs without an expert raise."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted expert (expert_actions); algo=sft needs one")

    def close_extras(self, **kwargs: Any) -> None:
        """Releases simulator resources; numpy envs have none."""

    def _seeds(self, seed: Seed) -> list[int]:
        """Turns a ``reset`` seed argument into one non-negative int seed per sub-env.

        Args:
            seed: An int s (env i gets s + i), a sequence of ``num_envs`` ints, or None (a
                fresh seed from OS entropy, then the int rule).

        Returns:
            ``num_envs`` seeds.

        Raises:
            ValueError: If a seed is negative or the sequence has the wrong length.
        """
        if seed is None:
            # Draw one base seed from OS entropy and apply the int rule, so an unseeded run is
            # still reproducible from the seed stored in ``np_random_seed``.
            seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
        if isinstance(seed, numbers.Integral):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = [int(s) for s in np.asarray(seed).reshape(-1)]
            if len(seeds) != self.num_envs:
                raise ValueError(
                    f"seed: got a sequence of {len(seeds)} seeds for num_envs={self.num_envs}; "
                    "pass one seed per env or a single int."
                )
        if min(seeds) < 0:
            raise ValueError(f"seed: seeds must be non-negative, got min {min(seeds)}.")
        self._np_random_seed = seeds[0]
        return seeds
