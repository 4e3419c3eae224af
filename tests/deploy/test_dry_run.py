"""Dry runs robot <-> server on this machine: ``rlplat-deploy`` with a ``SimRobot`` through a real
``rlplat-serve`` reproduces the run's own (in-process) evaluation on the same seeds, on the toy env
and on ManiSkill PushCube; a server killed mid-episode makes the robot hold, and it moves again
when the server is back; keys and model changes are refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serve.helpers import require_serve_packages

require_serve_packages()

TOY = ["experiment=toy_mlp", "env.num_envs=8", "algo.rollout_steps=10", "algo.num_minibatches=2",
       "trainer.eval_episodes=16", "trainer.total_steps=40", "trainer.eval_every=40", "trainer.save_video=false",
       "logger.progress_bar=false", "logger.log_every=1000", "policy.hidden_sizes=[32,32]"]
PUSHCUBE = ["experiment=maniskill_pushcube_ppo_mlp", "env.num_envs=4", "env.envs_per_process=2",
            "env.max_episode_steps=20", "algo.rollout_steps=8", "algo.num_minibatches=2", "trainer.total_steps=2",
            "trainer.eval_every=2", "trainer.eval_episodes=4", "trainer.save_video=false",
            "logger.progress_bar=false"]


def _train(overrides: list[str], run_dir: Path) -> dict:
    from rlplat.config import compose
    from rlplat.train import run

    return run(compose(overrides), run_dir)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, ray_local) -> tuple[Path, dict]:
    """A toy_mlp run trained a little (its final evaluation succeeds on some of its 16 episodes)."""
    run_dir = tmp_path_factory.mktemp("deploy") / "toy"
    return run_dir, _train(TOY, run_dir)


@contextlib.contextmanager
def _serve(checkpoint: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """``rlplat-serve checkpoint=...`` in its own process (as on a robot's network; a server thread
    inside this Ray-hosting test process is not what users run); yields its websocket address."""
    port = port or _free_port()
    proc = _start_server_process(checkpoint, port, *extra)
    try:
        _wait_healthy(port, proc)
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def _deploy(server_url: str, run_dir: Path, episodes: int, record: Path) -> dict:
    from rlplat.deploy.cli import main

    assert main([f"server={server_url}", "robot=sim", f"sim.run={run_dir}", f"episodes={episodes}",
                 f"record={record}"]) == 0
    return json.loads((record / "deploy.json").read_text())


def _same_as_in_process(final: dict, report: dict) -> None:
    episodes = report["episodes"]
    # Greedy actions, the same seeds, the same env: equal outcomes (the returns are float32 sums).
    assert report["summary"]["success_rate"] == final["eval/success_once"]
    assert np.mean([e["success_at_end"] for e in episodes]) == final["eval/success_at_end"]
    assert np.mean([e["episode_length"] for e in episodes]) == final["eval/episode_length"]
    assert np.mean([e["episode_return"] for e in episodes]) == pytest.approx(final["eval/episode_return"], rel=1e-6)
    assert report["summary"]["holds"] == 0 and report["summary"]["watchdog_fired"] == 0


def test_toy_dry_run_through_the_server_equals_the_runs_evaluation(toy_run, tmp_path):
    from rlplat.checkpoint import read_env_spec
    from rlplat.deploy.sim import SimRobot

    run_dir, final = toy_run
    assert 0 < final["eval/success_once"] < 1  # a policy that sometimes succeeds: the comparison can tell
    # The run saved its env's spaces (the server rebuilds the policy from them, no simulator needed).
    robot, _ = SimRobot.from_run(run_dir, 1)
    spec = read_env_spec(run_dir)
    assert spec["observation_space"] == robot.env.single_observation_space
    assert spec["action_space"] == robot.env.single_action_space and spec["max_episode_steps"] == 50
    robot.close()
    with _serve(run_dir) as url:
        report = _deploy(url, run_dir, 16, tmp_path / "rec")
    _same_as_in_process(final, report)
    # Every step recorded: observation, the server's action and the applied one.
    z = np.load(tmp_path / "rec/episode_0000.npz")
    assert z["obs/state"].shape == (report["episodes"][0]["steps"], 26)
    assert np.array_equal(z["action"], z["server_action"])  # inside the bounds: the filter changed nothing


def test_pushcube_dry_run_through_the_server_equals_the_runs_evaluation(ray_local, tmp_path):
    from tests.simulators import require_simulator

    require_simulator("mani_skill")
    final = _train(PUSHCUBE, tmp_path / "run")
    with _serve(tmp_path / "run") as url:
        report = _deploy(url, tmp_path / "run", 4, tmp_path / "rec")
    # Episodes run to the limit (the preset's eval_ignore_terminations): 20 steps each.
    assert [e["steps"] for e in report["episodes"]] == [20] * 4
    _same_as_in_process(final, report)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server_process(run_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlplat.serve", f"checkpoint={run_dir}", f"port={port}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server process exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


def test_killed_server_mid_episode_the_robot_holds_then_resumes(toy_run, tmp_path):
    from omegaconf import OmegaConf

    from rlplat.deploy.client import PolicyClient
    from rlplat.deploy.record import Recorder
    from rlplat.deploy.runtime import Runtime
    from rlplat.deploy.sim import SimRobot

    run_dir, _ = toy_run
    port = _free_port()
    procs = [_start_server_process(run_dir, port)]
    _wait_healthy(port, procs[0])
    env_cfg = OmegaConf.load(run_dir / "config.yaml").env
    env_cfg.max_episode_steps = 100_000

    class KillingRobot(SimRobot):
        """Kills the server (SIGKILL) after the 10th action and starts a new one; ends the episode
        after 15 more actions (holds are not actions)."""

        moves = 0

        def apply_action(self, action):
            super().apply_action(action)
            if self.holding:
                return
            self.moves += 1
            if self.moves == 10:
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait()
                procs.append(_start_server_process(run_dir, port))

        def hold(self):
            self.holding = True
            try:
                super().hold()
            finally:
                self.holding = False

        def episode_done(self):
            return self.moves >= 25

    KillingRobot.holding = False

    robot = KillingRobot(env_cfg, ignore_terminations=True)
    logs: list[str] = []
    try:
        client = PolicyClient(f"ws://127.0.0.1:{port}", request_timeout=2.0, connect_timeout=2.0)
        rt = Runtime(robot, client, max_hz=20, watchdog_s=0.3, retry_s=0.2, recorder=Recorder(tmp_path / "rec"),
                     log=logs.append)
        result = rt.run_episode(seed=3, max_steps=4000)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        robot.close()
    z = np.load(tmp_path / "rec/episode_0000.npz")
    held = z["held"]
    # 10 actions, then a stretch of holds while the new server starts, then actions again.
    assert not held[:10].any() and held[10]
    back = 10 + int(np.argmin(held[10:]))
    assert back > 10 and not held[back:].any() and result.steps - back == 15
    # Holding: the state did not change while the server was down (zero command on the toy reach).
    assert np.array_equal(z["obs/state"][11], z["obs/state"][back])
    assert z["t"][back] - z["t"][10] > 0.3  # longer than the watchdog
    assert result.events["watchdog"] >= 1 and client.connects == 2
    assert sum("watchdog" in line for line in logs) == 1 and any("answers again" in line for line in logs)
    assert any("actions again" in line for line in logs)


def test_client_is_refused_without_the_key_and_after_a_model_change(toy_run):
    from rlplat.deploy.client import ModelChanged, PolicyClient, ServerUnavailable

    run_dir, _ = toy_run
    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    obs = {"observation/state": np.zeros(26, np.float32)}
    with _serve(run_dir, "host=0.0.0.0", "api_key=secret-key-1", port=port):
        for key in (None, "wrong-key-123"):
            with pytest.raises(ServerUnavailable, match="HTTP 401.*api_key"):
                PolicyClient(url, api_key=key).connect()
        client = PolicyClient(url, api_key="secret-key-1")
        assert client.connect()["action_dim"] == 2
        assert client.infer(obs).shape == (1, 2)
    # Another model on the same address: the client refuses it instead of acting on it.
    with _serve(run_dir, "host=0.0.0.0", "api_key=secret-key-1", "model_id=another/model", port=port):
        with pytest.raises(ServerUnavailable, match="was lost"):  # the old connection died with its server
            client.infer(obs)
        with pytest.raises(ModelChanged, match="changed: model_id"):
            client.infer(obs)
