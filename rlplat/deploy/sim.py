"""``SimRobot``: one of the platform's envs (toy, ManiSkill, LIBERO) driven as a robot, for dry runs.

    rlplat-deploy server=ws://127.0.0.1:8000 robot=sim sim.run=outputs/quickstart/<date>_<time>

Built from a run dir (its ``config.yaml``'s env, one sub-env, built as the run's evaluation envs
are, and the run's evaluation seeds) or from an env preset (``sim.env=toy_camera``). One
``reset(seed)`` starts the same episode the run's evaluation starts with that seed, so a dry run
through the server can be compared episode by episode with ``rlplat-eval``. ``hold()`` steps the
simulator with a zero command (the platform's envs take delta / velocity actions: zero keeps
still) except for the gripper of ManiSkill and LIBERO arms, an absolute open/close target, which
keeps its last command; time passes while the robot holds, as it would on hardware.

This module imports the simulators (and torch, through the env registry); the rest of
``rlplat.deploy`` does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rlplat.deploy.robot import Robot


class SimRobot(Robot):
    """A one-env ``VectorEnv`` as a ``Robot`` (module docstring).

    Args:
        env_cfg: the env's config (``_target_`` and settings), as in a run's ``config.yaml``.
        ignore_terminations: run episodes to the step limit even after success (the run's
            ``trainer.eval_ignore_terminations``).
        hold_keep: action dims that ``hold`` repeats from the last command instead of zeroing
            (absolute targets); None: the gripper (last dim) for ManiSkill and LIBERO envs.
    """

    def __init__(self, env_cfg: dict[str, Any] | DictConfig, ignore_terminations: bool = False,
                 hold_keep: Sequence[int] | None = None) -> None:
        from hydra.utils import instantiate

        cfg = OmegaConf.to_container(env_cfg, resolve=True) if OmegaConf.is_config(env_cfg) else dict(env_cfg)
        if hold_keep is None:
            arm = any(name in str(cfg.get("_target_", "")).lower() for name in ("maniskill", "libero"))
            hold_keep = [-1] if arm else []
        self.hold_keep = list(hold_keep)
        extra = {"ignore_terminations": True} if ignore_terminations else {}
        self.env = instantiate(cfg, num_envs=1, **extra)
        space = self.env.single_action_space
        self.action_low = np.asarray(space.low, np.float32)
        self.action_high = np.asarray(space.high, np.float32)
        self.max_episode_steps = int(self.env.max_episode_steps)
        self.sim_control_hz = self.env.control_hz
        self.homed = self.holds = 0
        self._last = np.zeros_like(self.action_low)
        self._obs: dict[str, np.ndarray] | None = None
        self._done = False
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run(cls, run_dir: str | Path, episodes: int, ignore_terminations: bool | None = None
                 ) -> tuple[SimRobot, list[int]]:
        """The robot a run's evaluation uses, and the seeds of its first ``episodes`` evaluation
        episodes (``ignore_terminations``: None keeps the run's ``trainer.eval_ignore_terminations``)."""
        from rlplat.loops.embodied import eval_seeds

        config_file = Path(run_dir) / "config.yaml"
        if not config_file.exists():
            raise FileNotFoundError(f"sim.run={run_dir}: no config.yaml there; pass a run dir written by rlplat-train")
        cfg = OmegaConf.load(config_file)
        if cfg.get("preference") is not None:
            raise ValueError(f"sim.run={run_dir} is a text-to-image run; a SimRobot needs an env run")
        if ignore_terminations is None:
            ignore_terminations = bool(cfg.trainer.get("eval_ignore_terminations", False))
        robot = cls(cfg.env, ignore_terminations=ignore_terminations)
        seeds = eval_seeds(int(cfg.seed), episodes, cfg.trainer.get("eval_seed_start"))
        return robot, [int(s) for s in seeds]

    @classmethod
    def from_preset(cls, env: str, overrides: Sequence[str] = (), ignore_terminations: bool = False) -> SimRobot:
        """The robot of an env preset (``conf/env/<env>.yaml``) with Hydra overrides of its keys."""
        from rlplat.config import compose

        cfg = compose([f"env={env}", *(f"env.{o}" for o in overrides)])
        return cls(cfg.env, ignore_terminations=ignore_terminations)

    # ------------------------------------------------------------------ Robot
    def reset(self, seed: int | None = None) -> None:
        obs, _ = self.env.reset(seed=None if seed is None else [int(seed)])
        self._obs = obs
        self._done = False
        self._last = np.zeros_like(self.action_low)
        self._info = {"success_once": False}

    def get_observation(self) -> dict[str, Any]:
        out = {}
        for key, value in self._obs.items():
            row = value[0]
            out[key] = str(row) if key == "instruction" else np.asarray(row)
        return out

    def apply_action(self, action: np.ndarray) -> None:
        if self._done:
            raise RuntimeError("SimRobot: the episode has ended; reset before acting")
        self._last = np.asarray(action, np.float32).reshape(-1)
        obs, _, _, _, info = self.env.step(self._last.reshape(1, -1))
        self._obs = obs
        self._info["success_once"] = bool(self._info["success_once"] or info["success"][0])
        if info["done"][0]:
            self._done = True
            self._info.update(success_at_end=bool(info["success"][0]),
                              episode_return=float(info["episode_return"][0]),
                              episode_length=int(info["episode_length"][0]))

    def hold(self) -> None:
        self.holds += 1
        if not self._done:
            still = np.zeros_like(self.action_low)
            still[self.hold_keep] = self._last[self.hold_keep]
            self.apply_action(still)

    def home(self) -> None:
        self.homed += 1

    def episode_done(self) -> bool:
        return self._done

    def episode_info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        self.env.close()
