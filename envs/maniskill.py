"""ManiSkillEnv: any registered ManiSkill3 task behind the VectorEnv contract, on GPU or CPU.

Two simulator paths, one class:

- ``sim_backend="physx_cuda"``: one batched ManiSkill env with ``num_envs`` scenes on the GPU
  (thousands of envs per process; partial resets through ManiSkill's ``env_idx`` option).
- ``sim_backend="physx_cpu"``: SAPIEN's CPU simulator holds one scene per process, so the
  shard is a gymnasium vector env (``vector="async"``: one subprocess per env; ``"sync"``: all
  in this process) of single ManiSkill envs, each converted to the contract's numpy
  observation inside its own process.

``"auto"`` picks ``physx_cuda`` when torch sees a GPU, else ``physx_cpu``.

SAPIEN needs a Vulkan device even for state observations; on a machine without a GPU that is
Mesa's lavapipe >= 25 (``scripts/setup_system.sh`` installs it). Building an env without one
fails at once with a message naming that script.

Seeding follows the contract on the CPU path: env i of a shard reset with seed s + i starts
the same episode as row i of one big env, and auto-resets continue each env's own ManiSkill
RNG, so sharded and single-process runs match exactly. On the GPU path ManiSkill draws the
randomisation of one batched reset from a single torch stream (seeded by the first env's
seed): runs are reproducible but not shard-invariant.

GRPO groups (``reset_groups``): on the GPU path equal seeds do not give equal scenes (one torch
stream per batched reset), so after the reset every env restarts from its group leader's state
through ManiSkill's own ``reset(options={"env_idx": ..., "reset_to_env_states": ...})``: the
leader's row of ``get_state_dict()`` is written into each env of its group, leader included
(setting a state is not bit-for-bit a reset's path, and envs that all took the same path step
identically), the controllers are reset and the observations read again. The CPU path does the
same per scene (each process gets its leader's ``get_state()`` and RNG states), so the mechanism
is tested without a GPU. ManiSkill 3.0.1's state dict holds only the poses and velocities of
non-static actors and the root pose, qpos and qvel of articulations
(``ManiSkillScene.get_sim_state``; no task overrides ``get_state_dict``): a task that keeps
randomisation elsewhere (goal tensors on the task, per-scene geometry built at load time) cannot
be copied this way, so only ``GROUP_COPY_TASKS`` are copied; other tasks reset members with their
leader's seed on the CPU path (one scene per process: the seed decides the episode) and are
refused on the GPU path.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from rlplat.envs.base import Obs, Seed, VectorEnv, check_arg, group_leaders
from rlplat.envs.sim import GroupedProcessVector, ProcessVector, SimVectorEnv, copy_sources, process_vector, spaces_of
from rlplat.registry import checked, register

OBS_MODES = ("state", "rgb", "rgbd")
REWARD_MODES = ("sparse", "dense", "normalized_dense")
SIM_BACKENDS = ("auto", "physx_cpu", "physx_cuda")

#: Language instruction per task id, for VLA prompts. Tasks not listed take the first sentence
#: of their docstring's "Task Description" (ManiSkill tasks document themselves), or the
#: ``instruction`` argument.
INSTRUCTIONS: dict[str, str] = {
    "PushCube-v1": "push the cube to the red and white target",
    "PullCube-v1": "pull the cube to the red and white target",
    "PickCube-v1": "pick up the cube and move it to the goal position",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PokeCube-v1": "use the peg to push the cube to the goal",
    "PlaceSphere-v1": "place the sphere into the bin",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole from the side",
    "PullCubeTool-v1": "use the tool to pull the cube closer",
    "PushT-v1": "push the t-shaped block onto the target",
    "RollBall-v1": "push the ball so it rolls into the goal region",
    "PlugCharger-v1": "plug the charger into the receptacle",
    "TwoRobotStackCube-v1": "stack the cubes together with both arms",
}

#: Tasks whose whole per-episode randomisation lives in ManiSkill's state dict (poses of
#: non-static actors, goal markers included, and the robot's qpos), with identical scenes built in
#: every sub-scene: copying a leader's ``get_state_dict()`` rows makes a member's episode its own.
#: Checked against ManiSkill 3.0.1's ``_load_scene`` / ``_initialize_episode`` / ``evaluate``; add a
#: task only after the same check. RollBall-v1's one task tensor, ``reached_status``, is 0 after
#: every reset. Not copyable: PlugCharger-v1 keeps its randomised ``goal_pose`` on the task,
#: PegInsertionSide-v1 builds a peg of random size in every scene.
GROUP_COPY_TASKS = frozenset({
    "PushCube-v1", "PullCube-v1", "PickCube-v1", "StackCube-v1", "PokeCube-v1", "PlaceSphere-v1",
    "LiftPegUpright-v1", "PullCubeTool-v1", "PushT-v1", "RollBall-v1",
})

SETUP_HINT = (
    "SAPIEN (ManiSkill3) needs a Vulkan device even for state observations. Without a GPU, "
    "install Mesa >= 25 lavapipe and the Vulkan loader with `sudo bash scripts/setup_system.sh` "
    "(Debian 12 and 13), or run on a machine with an NVIDIA driver."
)



def task_instruction(task: str) -> str:
    """The language instruction of a registered ManiSkill task (see ``INSTRUCTIONS``)."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    doc = (REGISTERED_ENVS[task].cls.__doc__ or "") if task in REGISTERED_ENVS else ""
    match = re.search(r"\*\*Task Description:\*\*\s*(.+?)(?:\.\s|\n\s*\n|$)", doc, re.DOTALL)
    if not match:
        raise ValueError(
            f"instruction: task {task!r} has no entry in envs/maniskill.py INSTRUCTIONS and no "
            "'Task Description' in its docstring; pass env.instruction='...'"
        )
    return " ".join(match.group(1).split()).lower()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _flatten(tree: Any) -> np.ndarray:
    """Concatenates the leaves of a (nested) dict of [B, ...] arrays into float32 [B, D]."""
    if isinstance(tree, dict):
        parts = [_flatten(value) for value in tree.values()]
        parts = [p for p in parts if p.shape[1] > 0]
        return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0), np.float32)
    array = _to_numpy(tree)
    return array.reshape(array.shape[0], -1).astype(np.float32)


def contract_obs(base_env: Any, raw: Any, cameras: dict[str, str], depth: bool) -> Obs:
    """ManiSkill's batched raw observation -> the contract's numpy keys (no ``instruction``).

    Args:
        base_env: the unwrapped ManiSkill env (for the agent's proprioception).
        raw: ``obs`` of an env made with obs mode ``state`` (a flat tensor) or ``<visual>+state``
            (a dict with ``state`` and ``sensor_data``).
        cameras: contract key -> ManiSkill camera name (e.g. ``{"image": "base_camera"}``).
        depth: also return ``<key>_depth`` (float32 metres, [B, H, W, 1]).

    Returns:
        ``state`` [B, S], ``proprio`` [B, P] (joint positions and velocities) and the camera keys.
    """
    out: Obs = {}
    state = raw["state"] if isinstance(raw, dict) else raw
    out["state"] = _flatten(state)
    out["proprio"] = _flatten(base_env.agent.get_proprioception())
    for key, camera in cameras.items():
        data = raw["sensor_data"][camera]
        out[key] = _to_numpy(data["rgb"]).astype(np.uint8)
        if depth:
            # ManiSkill depth is int16 millimetres.
            out[f"{key}_depth"] = _to_numpy(data["depth"]).astype(np.float32) / 1000.0
    return out


def _episode_limit(env: Any, max_episode_steps: int | None) -> int:
    """The limit ManiSkill's TimeLimitWrapper enforces (the override, else the registered one)."""
    if max_episode_steps is not None:
        return int(max_episode_steps)
    while env is not None:
        if getattr(env, "_max_episode_steps", None) is not None:
            return int(env._max_episode_steps)
        env = getattr(env, "env", None)
    raise ValueError("max_episode_steps: the task registers no episode limit; set env.max_episode_steps")


def _snapshot(base: Any) -> dict[str, Any]:
    """Simulator state, step counters and ManiSkill's RNGs of an unwrapped env (picklable)."""
    return {
        "sim": _to_numpy(base.get_state()),
        "elapsed_steps": _to_numpy(base._elapsed_steps).copy(),
        "main_seed": list(base._main_seed), "episode_seed": np.array(base._episode_seed, np.int64),
        # BatchedRNG proxies every attribute (pickling included) to its RandomStates: keep theirs.
        "main_rng": [rng.get_state() for rng in base._batched_main_rng.rngs],
        "episode_rng": [rng.get_state() for rng in base._batched_episode_rng.rngs],
    }


def _restore(base: Any, snap: dict[str, Any]) -> None:
    import torch

    base.set_state(torch.as_tensor(snap["sim"], device=base.device))
    _restore_counters(base, snap)


def _restore_counters(base: Any, snap: dict[str, Any]) -> None:
    """The step counters, seeds and RNGs of a ``_snapshot`` (everything but the simulator state)."""
    import torch

    base._elapsed_steps[:] = torch.as_tensor(snap["elapsed_steps"], device=base.device)
    base._main_seed, base._episode_seed = list(snap["main_seed"]), np.array(snap["episode_seed"], np.int64)
    from mani_skill.envs.utils.randomization.batched_rng import BatchedRNG

    def rngs(states: list) -> BatchedRNG:
        out = [np.random.RandomState() for _ in states]
        for rng, state in zip(out, states, strict=True):
            rng.set_state(state)
        return BatchedRNG.from_rngs(out)

    base._batched_main_rng, base._batched_episode_rng = rngs(snap["main_rng"]), rngs(snap["episode_rng"])
    base._main_rng, base._episode_rng = base._batched_main_rng[0], base._batched_episode_rng[0]


def make_maniskill(task: str, sim_backend: str, num_envs: int, obs_mode: str, control_mode: str | None,
                   reward_mode: str, image_size: int, robot_uids: str | None,
                   max_episode_steps: int | None, render_size: int) -> Any:
    """``gymnasium.make`` of a ManiSkill task with the contract's settings (raises with a hint)."""
    os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    kwargs: dict[str, Any] = {
        "num_envs": num_envs,
        "obs_mode": "state" if obs_mode == "state" else f"{obs_mode}+state",
        "reward_mode": reward_mode,
        "sim_backend": sim_backend,
        "render_backend": "gpu" if sim_backend == "physx_cuda" else "cpu",
        "render_mode": "rgb_array",
        # Unseeded (auto-)resets draw from the env's own seeded RNG instead of torch's global one.
        "enhanced_determinism": True,
        "sensor_configs": {"width": image_size, "height": image_size},
        "human_render_camera_configs": {"width": render_size, "height": render_size},
    }
    if control_mode is not None:
        kwargs["control_mode"] = control_mode
    if robot_uids is not None:
        kwargs["robot_uids"] = robot_uids
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        return gymnasium.make(task, **kwargs)
    except RuntimeError as err:
        text = str(err)
        if "rendering device" in text or "Vulkan" in text or "vk::" in text:
            raise RuntimeError(f"{text}\n{SETUP_HINT}") from err
        if 'device "cuda"' in text:
            raise RuntimeError(
                f"{text}\nsim_backend: physx_cuda needs an NVIDIA GPU; use env.sim_backend=physx_cpu "
                "(or auto) on this machine."
            ) from err
        raise


class _ManiSkillHandle:
    """A made ManiSkill env of ``num_envs`` scenes with the contract's spaces, snapshot and close."""

    def __init__(self, num_envs: int, cameras: dict[str, str], depth: bool, make_kwargs: dict[str, Any]) -> None:
        self.env = make_maniskill(num_envs=num_envs, **make_kwargs)
        self.base = self.env.unwrapped
        self.cameras, self.depth = dict(cameras), depth
        raw, _ = self.env.reset(seed=list(range(num_envs)) if num_envs > 1 else 0)
        self.observation_space = spaces_of(self._contract(raw))
        self.action_space = self.base.single_action_space
        self.max_episode_steps = _episode_limit(self.env, make_kwargs["max_episode_steps"])

    def _contract(self, raw: Any) -> Obs:
        return contract_obs(self.base, raw, self.cameras, self.depth)

    def snapshot(self) -> dict[str, Any]:
        return _snapshot(self.base)

    def restore(self, snap: dict[str, Any]) -> None:
        _restore(self.base, snap)

    def dead(self) -> list[tuple[int, int, slice]]:
        """Simulator processes that exited: none (the scenes live in this process)."""
        return []

    def close(self) -> None:
        self.env.close()


class SingleManiSkill(_ManiSkillHandle, gymnasium.Env):
    """One CPU ManiSkill env with unbatched contract observations (runs inside a vector worker).

    Auto-reset is left to the owner (``reset(options={"reset_mask": ...})`` of the vector env),
    so ``success`` is read before any reset. ``snapshot``/``restore`` carry the simulator state,
    ManiSkill's RNGs and the step counter, for checkpoints. PhysX's solver caches (warm starts,
    contacts) are not part of the simulator state, so setting the state mid-episode continues only
    to ~1e-5; a snapshot therefore also holds how the episode began (the reset's seed and the RNGs
    it drew from, or the state it was copied from) and the actions taken since, and ``restore``
    repeats them: the restored episode continues exactly.
    """

    def __init__(self, cameras: dict[str, str], depth: bool, **make_kwargs: Any) -> None:
        super().__init__(1, cameras, depth, make_kwargs)
        self._episode_start: dict[str, Any] | None = None  # the vector resets with seeds before use
        self._episode_actions: list[np.ndarray] = []

    def snapshot(self) -> dict[str, Any]:
        return {**_snapshot(self.base), "episode_start": self._episode_start,
                "episode_actions": np.array(self._episode_actions, np.float32).reshape(-1, *self.action_space.shape)}

    def restore(self, snap: dict[str, Any]) -> None:
        start = snap.get("episode_start")
        if start is None:  # no record of the episode: the state alone (~1e-5 within the episode)
            super().restore(snap)
            return
        if "copied" in start:
            self.start_from(start["copied"])
        else:
            _restore_counters(self.base, start["before"])
            self.reset(seed=start["seed"])
        for action in snap["episode_actions"]:
            self.env.step(action[None])
        _restore_counters(self.base, snap)
        self._episode_actions = [a.copy() for a in snap["episode_actions"]]

    def _obs(self, raw: Any) -> Obs:
        return {k: v[0] for k, v in self._contract(raw).items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Obs, dict]:
        before = _snapshot(self.base)  # the counters and RNGs this reset draws from
        raw, _ = self.env.reset(seed=seed)
        self._episode_start, self._episode_actions = {"before": before, "seed": seed}, []
        return self._obs(raw), {}

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, bool, dict]:
        action = np.asarray(action, np.float32)
        self._episode_actions.append(action.copy())
        raw, reward, terminated, truncated, info = self.env.step(action[None])
        success = bool(_to_numpy(info["success"]).reshape(-1)[0]) if "success" in info else False
        return (self._obs(raw), float(_to_numpy(reward).reshape(-1)[0]), bool(_to_numpy(terminated)[0]),
                bool(_to_numpy(truncated)[0]), {"success": success})

    def render(self) -> np.ndarray:
        return _to_numpy(self.env.render())[0].astype(np.uint8)

    def start_from(self, snap: dict[str, Any]) -> Obs:
        """Starts this episode from another env's ``snapshot()`` taken right after its reset (a
        GRPO group leader's) and returns the observation there.

        The state goes in through ManiSkill's ``reset_to_env_states``, which resets the
        controller after setting it and reads the observation again, exactly as the leader's own
        reset did; the leader's step counter and RNGs follow, so later auto-resets also match.
        """
        import torch

        raw, _ = self.env.reset(options={"reset_to_env_states": {"env_states": torch.as_tensor(snap["sim"])}})
        _restore_counters(self.base, snap)
        self._episode_start = {"copied": {k: v for k, v in snap.items() if not k.startswith("episode_")}}
        self._episode_actions = []
        return self._obs(raw)


def _single(cameras: dict[str, str], depth: bool, make_kwargs: dict[str, Any]) -> SingleManiSkill:
    return SingleManiSkill(cameras, depth, **make_kwargs)


@dataclass
class ManiSkillEnvConfig:
    """Constructor arguments of envs/maniskill.py's ManiSkillEnv (see its docstring)."""

    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = checked(16, ge=1)
    # A registered ManiSkill3 env id (PushCube-v1, PickCube-v1, StackCube-v1, ...).
    task: str = "PushCube-v1"
    # state, rgb or rgbd (state and proprio are always returned).
    obs_mode: str = "state"
    # ManiSkill controller (pd_ee_delta_pose, pd_joint_delta_pos, ...); null: the task's default.
    control_mode: str | None = "pd_ee_delta_pose"
    # sparse, dense or normalized_dense.
    reward_mode: str = "normalized_dense"
    # auto (physx_cuda with a GPU, else physx_cpu), physx_cpu or physx_cuda.
    sim_backend: str = "auto"
    # CPU path: async (subprocesses) or sync (all in the worker process).
    vector: str = "async"
    # CPU async path: scenes per subprocess, stepped in turn (1: a process per scene; a few
    # processes of several scenes use a small CPU better and need a fraction of the memory).
    envs_per_process: int = checked(1, ge=1)
    # Camera side in pixels (rgb modes).
    image_size: int = checked(128, ge=8)
    # ManiSkill sensor behind the image key.
    camera: str = "base_camera"
    # Sensor behind wrist_image (e.g. hand_camera with robot_uids=panda_wristcam); null: none.
    wrist_camera: str | None = None
    # ManiSkill robot id; null: the task's default.
    robot_uids: str | None = None
    # Episode limit; null: the task's registered limit.
    max_episode_steps: int | None = checked(None, ge=1)
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False
    # Language instruction; null: envs/maniskill.py's table or the task docstring.
    instruction: str | None = None
    # Side of render() frames (episode videos) in state mode.
    render_size: int = checked(256, ge=8)
    # Start method of the async CPU vector (forkserver, spawn or fork).
    context: str | None = "forkserver"


@register("env", "maniskill", ManiSkillEnvConfig)
class ManiSkillEnv(SimVectorEnv):
    """A registered ManiSkill3 task (e.g. PushCube-v1) as a contract VectorEnv.

    **Task Description:** the task's own (see its ManiSkill docstring); ``instruction`` holds the
    language version from ``INSTRUCTIONS`` (or the task docstring, or the ``instruction`` arg).

    **Randomizations / Success Conditions:** the task's own. ``info["success"]`` is ManiSkill's
    success flag at this step; tasks terminate on success unless ``ignore_terminations``.

    **Observations** (dict, leading dim N):
    - ``state`` float32 [N, S]: ManiSkill's flattened state observation (agent qpos/qvel and
      the privileged task extras such as object and goal poses), in every obs mode.
    - ``proprio`` float32 [N, P]: the robot's joint positions and velocities.
    - ``image`` uint8 [N, H, W, 3] (``rgb``/``rgbd``): ``camera``; ``wrist_image`` when
      ``wrist_camera`` is set; ``*_depth`` float32 [N, H, W, 1] in metres with ``rgbd``.
    - ``instruction`` object [N] of str.

    **Actions:** the controller's (``control_mode``, e.g. ``pd_ee_delta_pose``: 7-dim delta
    end-effector pose + gripper; ``pd_joint_delta_pos``: 8-dim), in [-1, 1].

    **Rewards:** ManiSkill's ``reward_mode``: sparse (success), dense, or normalized_dense
    (dense scaled to [0, 1] per step).
    """

    # ManiSkill3's tabletop tasks control at 20 Hz (control_freq; the simulation runs at 100).
    control_hz = 20.0

    def __init__(
        self,
        *,
        num_envs: int = 16,
        task: str = "PushCube-v1",
        obs_mode: str = "state",
        control_mode: str | None = "pd_ee_delta_pose",
        reward_mode: str = "normalized_dense",
        sim_backend: str = "auto",
        vector: str = "async",
        envs_per_process: int = 1,
        image_size: int = 128,
        camera: str = "base_camera",
        wrist_camera: str | None = None,
        robot_uids: str | None = None,
        max_episode_steps: int | None = None,
        ignore_terminations: bool = False,
        instruction: str | None = None,
        render_size: int = 256,
        context: str | None = "forkserver",
    ) -> None:
        """Builds a shard of ``num_envs`` envs of ``task``; call ``reset`` before ``step``.

        Args:
            num_envs: Envs in this shard, >= 1.
            task: A registered ManiSkill3 env id (``PushCube-v1``, ``PickCube-v1``, ...).
            obs_mode: "state", "rgb" or "rgbd" (state and proprio are always returned).
            control_mode: ManiSkill controller name; None keeps the task's default.
            reward_mode: "sparse", "dense" or "normalized_dense".
            sim_backend: "auto", "physx_cpu" or "physx_cuda".
            vector: CPU path only: "async" (subprocesses) or "sync" (in this process).
            envs_per_process: CPU async path: scenes per subprocess, stepped one after another
                there (1: a subprocess per scene). A few processes of several scenes each use
                a small CPU better than one per scene, and a fraction of the memory.
            image_size: Camera side in pixels (rgb modes).
            camera: ManiSkill sensor behind ``image``.
            wrist_camera: Sensor behind ``wrist_image`` (e.g. "hand_camera" with
                ``robot_uids="panda_wristcam"``); None for none.
            robot_uids: ManiSkill robot id; None keeps the task's default.
            max_episode_steps: Episode limit; None keeps the task's registered limit.
            ignore_terminations: Run every episode to ``max_episode_steps`` (success does not
                end it; ManiSkill's GPU PPO baseline trains this way).
            instruction: Overrides the task's language instruction.
            render_size: Side of ``render()`` frames (episode videos) in state mode.
            context: multiprocessing start method of the async CPU vector ("forkserver", "spawn",
                "fork"); scripts that build async envs need an ``if __name__ == "__main__":``
                guard with forkserver or spawn.

        Raises:
            ValueError: If an argument is out of range; the message names it.
            RuntimeError: Without a Vulkan device (message points to scripts/setup_system.sh) or
                with physx_cuda and no GPU.
        """
        check_arg(isinstance(num_envs, int) and num_envs >= 1, "num_envs", f"must be an int >= 1, got {num_envs!r}")
        check_arg(obs_mode in OBS_MODES, "obs_mode", f"must be one of {OBS_MODES}, got {obs_mode!r}")
        check_arg(reward_mode in REWARD_MODES, "reward_mode", f"must be one of {REWARD_MODES}, got {reward_mode!r}")
        check_arg(sim_backend in SIM_BACKENDS, "sim_backend", f"must be one of {SIM_BACKENDS}, got {sim_backend!r}")
        check_arg(isinstance(image_size, int) and image_size >= 16, "image_size", f"must be an int >= 16, got {image_size!r}")
        os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
        import mani_skill.envs  # noqa: F401
        from mani_skill.utils.registration import REGISTERED_ENVS

        check_arg(task in REGISTERED_ENVS, "task",
               f"{task!r} is not a registered ManiSkill3 env; e.g. {sorted(REGISTERED_ENVS)[:8]} ...")
        if sim_backend == "auto":
            import torch

            sim_backend = "physx_cuda" if torch.cuda.is_available() else "physx_cpu"
        self.task = task
        self.obs_mode = obs_mode
        self.sim_backend = sim_backend
        self.instruction = instruction if instruction is not None else task_instruction(task)
        cameras = {} if obs_mode == "state" else {"image": camera}
        if wrist_camera is not None and obs_mode != "state":
            cameras["wrist_image"] = wrist_camera
        make_kwargs = {
            "task": task, "sim_backend": sim_backend, "obs_mode": obs_mode, "control_mode": control_mode,
            "reward_mode": reward_mode, "image_size": image_size, "robot_uids": robot_uids,
            "max_episode_steps": max_episode_steps, "render_size": render_size,
        }
        depth = obs_mode == "rgbd"
        if sim_backend == "physx_cuda":
            sim: _Batched | ProcessVector | GroupedProcessVector = _Batched(num_envs, cameras, depth, make_kwargs)
        else:
            fns = [functools.partial(_single, cameras, depth, make_kwargs) for _ in range(num_envs)]
            sim = process_vector(fns, vector, context, envs_per_process)
        super().__init__(sim, num_envs, ignore_terminations=ignore_terminations)

    def instructions(self, obs: Obs) -> list[str]:
        return [self.instruction] * self.num_envs

    def reset_groups(self, *, seed: Seed = None, group_size: int) -> tuple[Obs, dict[str, Any]]:
        """``reset(seed)``, then every group member takes its leader's simulator state (see the
        module docstring): on the GPU path equal seeds do not give equal scenes.

        Tasks outside ``GROUP_COPY_TASKS`` keep state the copy would miss: on the CPU path their
        members are reset with their leader's seed instead (each scene's episode is a function
        of its seed), on the GPU path they are refused.

        Raises:
            ValueError: naming ``group_size`` if it does not divide ``num_envs``; naming ``task``
                for a task outside ``GROUP_COPY_TASKS`` on ``physx_cuda``.
        """
        leaders = group_leaders(self.num_envs, group_size)
        if group_size == 1:
            return self.reset(seed=seed)
        if self.task not in GROUP_COPY_TASKS:
            check_arg(self.sim_backend != "physx_cuda", "task",
                      f"{self.task!r} is not in envs/maniskill.py GROUP_COPY_TASKS: ManiSkill's state dict "
                      "holds actor and articulation states only, so copying a group leader's state on "
                      "physx_cuda cannot guarantee that a GRPO group starts alike. Use env.sim_backend="
                      "physx_cpu (equal seeds give equal scenes there), a task from GROUP_COPY_TASKS, or "
                      "add the task there once its randomisation is known to live in the state dict")
            return VectorEnv.reset_groups(self, seed=seed, group_size=group_size)
        _, info = self.reset(seed=seed)
        self._last_obs = self._with_instruction(self._sim_call("copy_starts", leaders))
        return self._last_obs, info


class _Batched(_ManiSkillHandle):
    """GPU path: one ManiSkill env with all scenes batched on the GPU (physx_cuda)."""

    def _obs(self, raw: Any) -> Obs:
        return self._contract(raw)

    def reset(self, seeds: list[int]) -> Obs:
        raw, _ = self.env.reset(seed=seeds)
        return self._obs(raw)

    def reset_rows(self, mask: np.ndarray) -> Obs:
        import torch

        idx = torch.as_tensor(np.flatnonzero(mask), device=self.base.device)
        raw, _ = self.env.reset(options={"env_idx": idx})
        return self._obs(raw)

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import torch

        raw, reward, terminated, truncated, info = self.env.step(torch.as_tensor(actions, device=self.base.device))
        n = len(actions)
        success = _to_numpy(info["success"]).astype(bool) if "success" in info else np.zeros(n, bool)
        return (self._obs(raw), _to_numpy(reward).astype(np.float64), _to_numpy(terminated).astype(bool),
                _to_numpy(truncated).astype(bool), success)

    def render(self, index: int) -> np.ndarray:
        return _to_numpy(self.env.render())[index].astype(np.uint8)

    def copy_starts(self, sources: np.ndarray) -> Obs:
        """Right after a reset, every env i restarts from env ``sources[i]``'s state; returns
        every env's new observation.

        One reset of all envs with ``reset_to_env_states``: ManiSkill writes row i of the given
        state dict into env i (through its reset mask), resets the controllers and reads the
        observations again. Sources restart from their own rows too, so every env of a group has
        gone through the same state write (see envs/sim.py).
        """
        import torch

        sources, _ = copy_sources(sources, self.base.num_envs)
        device = self.base.device
        states = _select_rows(self.base.get_state_dict(), torch.as_tensor(sources, device=device))
        raw, _ = self.env.reset(options={"env_idx": torch.arange(len(sources), device=device),
                                         "reset_to_env_states": {"env_states": states}})
        return self._obs(raw)


def _select_rows(tree: Any, rows: Any) -> Any:
    """``tree`` (nested dict of [N, ...] tensors, a ManiSkill state dict) at ``rows``."""
    if isinstance(tree, dict):
        return {key: _select_rows(value, rows) for key, value in tree.items()}
    return tree[rows]
