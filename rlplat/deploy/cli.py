"""``rlplat-deploy``: drive a robot with a policy server's actions (``python -m rlplat.deploy``).

    rlplat-deploy server=ws://127.0.0.1:8000 robot=sim sim.run=RUN_DIR episodes=64      # dry run
    rlplat-deploy server=ws://127.0.0.1:8000 robot=sim sim.env=toy_camera episodes=8
    rlplat-deploy server=ws://10.0.0.5:8000 robot=my_robots.arm:Arm robot_args.port=/dev/ttyUSB0 \\
        max_hz=10 watchdog_s=0.5 safety.max_delta=0.2 record=sessions/today estop_file=/tmp/STOP

Arguments are ``key=value`` settings of ``DeployConfig`` (below; ``--help`` prints them). The API
key is ``api_key=`` or ``$RLPLAT_API_KEY``. Prints one line per episode and a summary (success
rate, holds, watchdog events, latency); with ``record=DIR`` also every step (``Recorder``) and
``DIR/deploy.json``. Exit code 2 for a bad setting, 1 when the run stopped on an error.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlplat.deploy.robot import Robot

#: The environment variable read when ``api_key`` is not set (the server reads the same one).
API_KEY_ENV = "RLPLAT_API_KEY"


@dataclass
class SimSettings:
    """``robot=sim``: which simulator env to drive."""

    # A run dir: its env (built like its evaluation envs) and its evaluation seeds.
    run: str | None = None
    # Or an env preset (conf/env/<name>.yaml), with overrides of its keys (e.g. ["max_episode_steps=100"]).
    env: str | None = None
    env_overrides: list[str] = field(default_factory=list)
    # Run episodes to the step limit even after success (a run dir's own setting when null).
    ignore_terminations: bool | None = None


@dataclass
class SafetySettings:
    """The safety filter (``rlplat.deploy.safety``); null bounds: the robot's, else the server's."""

    low: list[float] | None = None
    high: list[float] | None = None
    # Largest change per action component between consecutive steps (null: off).
    max_delta: float | None = None
    # A box the robot's position (Robot.position) must stay in, for delta commands scaled by step_scale.
    workspace_low: list[float] | None = None
    workspace_high: list[float] | None = None
    workspace_dims: list[int] | None = None
    step_scale: float = 1.0


@dataclass
class DeployConfig:
    """Settings of rlplat-deploy."""

    # The policy server's websocket address.
    server: str = "ws://127.0.0.1:8000"
    # API key (null: $RLPLAT_API_KEY; none needed for a server on loopback without one).
    api_key: str | None = None
    # "sim" (SimRobot, settings under sim.*) or "package.module:Class" of your Robot subclass.
    robot: str = "sim"
    # Keyword arguments of your Robot class.
    robot_args: dict[str, Any] = field(default_factory=dict)
    sim: SimSettings = field(default_factory=SimSettings)
    # Episodes to run.
    episodes: int = 1
    # Seed of each episode (null: a run dir's evaluation seeds, else 0, 1, 2, ...).
    seeds: list[int] | None = None
    # Step limit per episode (null: the robot ends episodes; SimRobot at the env's limit).
    max_steps: int | None = None
    # Loop rate limit in Hz (null: the robot's control_hz; SimRobot: none, as fast as possible).
    max_hz: float | None = None
    # Actions of each chunk executed before a new chunk is requested (null: the whole chunk).
    replan_every: int | None = None
    # No fresh action for this long -> the robot holds (seconds).
    watchdog_s: float = 1.0
    # Waits for the connection and for one reply (seconds); a reply later than that drops the connection.
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    # Pause before retrying after a failed request (seconds).
    retry_s: float = 0.2
    safety: SafetySettings = field(default_factory=SafetySettings)
    # Client key -> key in the robot's observation, when the robot names a value differently.
    observation_keys: dict[str, str] = field(default_factory=dict)
    # Record every step and the summary here (null: no recording).
    record: str | None = None
    # The robot stops (e-stop, no homing) as soon as this file exists.
    estop_file: str | None = None


class DeployConfigError(ValueError):
    """A setting rlplat-deploy cannot run with; the message names it and the fix."""


def parse(args: Sequence[str]) -> Any:
    """``DeployConfig`` from ``key=value`` arguments, checked; raises ``DeployConfigError``."""
    schema = OmegaConf.structured(DeployConfig)
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+")
        if "=" not in arg:
            raise DeployConfigError(f"{arg!r}: settings are key=value (see rlplat-deploy --help)")
        top = key.split(".", 1)[0]
        known = [f.name for f in fields(DeployConfig)]
        if top not in known:
            near = difflib.get_close_matches(top, known, n=1, cutoff=0.5)
            raise DeployConfigError(f"{key} is not a setting of rlplat-deploy{f'; did you mean {near[0]}?' if near else ''} "
                                    f"(settings: {', '.join(known)})")
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist([a.lstrip("+") for a in args]))
    except OmegaConfBaseException as err:
        raise DeployConfigError(str(err).splitlines()[0]) from None
    problems = []
    if cfg.episodes < 1:
        problems.append(f"episodes={cfg.episodes}: must be >= 1")
    for name in ("watchdog_s", "connect_timeout_s", "request_timeout_s"):
        if cfg[name] <= 0:
            problems.append(f"{name}={cfg[name]}: must be > 0 (seconds)")
    if cfg.retry_s < 0:
        problems.append(f"retry_s={cfg.retry_s}: must be >= 0")
    if cfg.max_hz is not None and cfg.max_hz <= 0:
        problems.append(f"max_hz={cfg.max_hz}: must be > 0, or null for no limit")
    if cfg.replan_every is not None and cfg.replan_every < 1:
        problems.append(f"replan_every={cfg.replan_every}: must be >= 1, or null for the whole chunk")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"max_steps={cfg.max_steps}: must be >= 1")
    if cfg.seeds is not None and len(cfg.seeds) < cfg.episodes:
        problems.append(f"seeds has {len(cfg.seeds)} values for episodes={cfg.episodes}: give one per episode")
    if cfg.robot == "sim" and (cfg.sim.run is None) == (cfg.sim.env is None):
        problems.append("robot=sim needs one of sim.run=RUN_DIR (the run's env and evaluation seeds) or "
                        "sim.env=NAME (an env preset, e.g. sim.env=toy_camera)")
    if cfg.robot != "sim" and ":" not in cfg.robot:
        problems.append(f"robot={cfg.robot}: give robot=sim or robot=package.module:Class (a Robot subclass)")
    if not str(cfg.server).startswith(("ws://", "wss://")):
        problems.append(f"server={cfg.server}: give the policy server's websocket address, ws://HOST:PORT")
    if problems:
        raise DeployConfigError("\n  ".join(problems))
    return cfg


def build_robot(cfg: Any) -> tuple[Robot, list[int] | None]:
    """The robot ``cfg`` names and the seeds its episodes use (None: the robot's own)."""
    if cfg.robot == "sim":
        from rlplat.deploy.sim import SimRobot

        if cfg.sim.run is not None:
            robot, seeds = SimRobot.from_run(cfg.sim.run, cfg.episodes, cfg.sim.ignore_terminations)
        else:
            robot = SimRobot.from_preset(cfg.sim.env, list(cfg.sim.env_overrides),
                                         ignore_terminations=bool(cfg.sim.ignore_terminations))
            seeds = list(range(cfg.episodes))
        return robot, (list(cfg.seeds) if cfg.seeds is not None else seeds)
    module_name, _, class_name = cfg.robot.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise DeployConfigError(f"robot={cfg.robot}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Robot)):
        raise DeployConfigError(f"robot={cfg.robot} is not a subclass of rlplat.deploy.robot.Robot")
    robot = cls(**OmegaConf.to_container(cfg.robot_args, resolve=True))
    return robot, (list(cfg.seeds) if cfg.seeds is not None else None)


def build_runtime(cfg: Any, robot: Robot, log=print):
    """The client, safety filter, recorder and ``Runtime`` for ``cfg`` (connects to the server)."""
    from rlplat.deploy.client import PolicyClient
    from rlplat.deploy.record import Recorder
    from rlplat.deploy.runtime import Runtime
    from rlplat.deploy.safety import SafetyFilter

    client = PolicyClient(cfg.server, api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None,
                          connect_timeout=cfg.connect_timeout_s, request_timeout=cfg.request_timeout_s)
    metadata = client.connect()
    dim = int(metadata["action_dim"])
    s = cfg.safety

    def bound(mine, robots, servers):
        return mine if mine is not None else robots if robots is not None else servers

    safety = SafetyFilter(dim, low=bound(s.low, robot.action_low, metadata.get("action_low")),
                          high=bound(s.high, robot.action_high, metadata.get("action_high")),
                          max_delta=s.max_delta, workspace_low=s.workspace_low, workspace_high=s.workspace_high,
                          workspace_dims=s.workspace_dims, step_scale=s.step_scale)
    max_hz = cfg.max_hz if cfg.max_hz is not None else robot.control_hz
    estop = None
    if cfg.estop_file is not None:
        stop_file = Path(cfg.estop_file)
        estop = stop_file.exists
    return Runtime(robot, client, safety=safety, replan_every=cfg.replan_every, max_hz=max_hz,
                   watchdog_s=cfg.watchdog_s, retry_s=cfg.retry_s,
                   recorder=Recorder(cfg.record) if cfg.record is not None else None, estop=estop,
                   observation_keys=OmegaConf.to_container(cfg.observation_keys), log=log)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (module docstring); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__)
        print("settings (defaults; comments in rlplat/deploy/cli.py):")
        print(OmegaConf.to_yaml(OmegaConf.structured(DeployConfig)), end="")
        return 0
    try:
        cfg = parse(args)
        robot, seeds = build_robot(cfg)
    except (DeployConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from rlplat.deploy.client import ServerUnavailable

    try:
        try:
            runtime = build_runtime(cfg, robot)
        except (ServerUnavailable, ValueError) as err:
            print(f"deploy: {err}", file=sys.stderr)
            return 2
        meta = runtime.metadata
        print(f"deploy: {meta.get('model_id')} at {cfg.server}: actions [{meta['action_horizon']}, "
              f"{meta['action_dim']}], {len(seeds) if seeds else cfg.episodes} episode(s), "
              f"max_hz={runtime.rate.period and round(1 / runtime.rate.period, 2)}, watchdog {cfg.watchdog_s} s",
              flush=True)

        def report(k: int, result) -> None:
            info = " ".join(f"{key}={value}" for key, value in result.info.items())
            print(f"episode {k} seed {result.seed}: {info} steps={result.steps} holds={result.holds}", flush=True)

        try:
            results = runtime.run(cfg.episodes, seeds=seeds, max_steps=cfg.max_steps, on_episode=report)
        except Exception as err:  # noqa: BLE001 - the run ends on any error, after homing (Runtime.run)
            print(f"deploy: stopped: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        summary = summarize(results)
        print("deploy: " + " ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, list)), flush=True)
        if cfg.record is not None:
            out = Path(cfg.record) / "deploy.json"
            out.write_text(json.dumps({"config": OmegaConf.to_container(cfg), "summary": summary,
                                       "episodes": [r.summary() for r in results]}, indent=2, default=str))
        return 0
    finally:
        robot.close()


def summarize(results: list) -> dict[str, Any]:
    """Success rate (when the robot reports success), steps, holds, watchdog events, latency."""
    out: dict[str, Any] = {"episodes": len(results), "steps": sum(r.steps for r in results),
                           "holds": sum(r.holds for r in results),
                           "watchdog_fired": sum(r.events.get("watchdog", 0) > 0 for r in results)}
    once = [r.info["success_once"] for r in results if "success_once" in r.info]
    if once:
        out["success_rate"] = float(np.mean(once))
    latencies = [ms for r in results for ms in r.round_trip_ms]
    if latencies:
        out["round_trip_ms_p50"] = round(float(np.percentile(latencies, 50)), 2)
        out["round_trip_ms_p99"] = round(float(np.percentile(latencies, 99)), 2)
    stopped = next((r.stopped for r in results if r.stopped), None)
    if stopped:
        out["stopped"] = stopped
    return out
