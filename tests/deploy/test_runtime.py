"""The robot-side runtime without a network: safety filter, chunk broker, rate limiter, watchdog,
e-stop, homing and recording, driven by a scripted client and a robot that logs every call."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.simulators import require_optional

for _module in ("websockets", "msgpack"):
    require_optional(_module, "pip install -e '.[deploy]'")

from rlplat.deploy.client import ModelChanged, ServerError, ServerUnavailable, wire_observation
from rlplat.deploy.record import Recorder
from rlplat.deploy.robot import Robot
from rlplat.deploy.runtime import ActionChunkBroker, RateLimiter, Runtime
from rlplat.deploy.safety import SafetyFilter

META = {"action_dim": 2, "action_horizon": 1, "model_id": "m", "schema_version": 1, "norm_stats_hash": None,
        "action_low": [-1.0, -1.0], "action_high": [1.0, 1.0],
        "observation": {"observation/state": {"policy_key": "state"}, "prompt": {"policy_key": "instruction"}}}


class ScriptedClient:
    """Answers each request with ``script(k, observation)`` (an array [H, D], or an exception to raise)."""

    def __init__(self, script, metadata=META) -> None:
        self.script, self.metadata = script, dict(metadata)
        self.requests: list[dict] = []
        self.connects = 1
        self.last_timing = {"round_trip_ms": 1.0}

    def connect(self):
        return self.metadata

    def infer(self, observation):
        self.requests.append(observation)
        out = self.script(len(self.requests) - 1, observation)
        if isinstance(out, BaseException):
            raise out
        return np.asarray(out, np.float32)


class LogRobot(Robot):
    """A 2-D point robot that logs every call; ``position`` is the point, actions move it by 0.1 * a."""

    action_low = np.array([-1.0, -1.0], np.float32)
    action_high = np.array([1.0, 1.0], np.float32)

    def __init__(self, steps_per_episode: int = 10) -> None:
        self.calls: list[tuple] = []
        self.steps_per_episode = steps_per_episode
        self.pos = np.zeros(2)
        self.t = 0

    def reset(self, seed=None):
        self.calls.append(("reset", seed))
        self.t = 0

    def get_observation(self):
        return {"state": self.pos.astype(np.float32).copy(), "instruction": "reach"}

    def apply_action(self, action):
        self.calls.append(("apply", np.asarray(action).copy()))
        self.pos = self.pos + 0.1 * np.asarray(action)
        self.t += 1

    def hold(self):
        self.calls.append(("hold",))
        self.t += 1

    def home(self):
        self.calls.append(("home",))

    def estop(self):
        self.calls.append(("estop",))

    def episode_done(self):
        return self.t >= self.steps_per_episode

    def position(self):
        return self.pos

    def applied(self):
        return [c[1] for c in self.calls if c[0] == "apply"]

    def kinds(self):
        return [c[0] for c in self.calls]


def runtime(robot, client, **kw):
    kw.setdefault("log", lambda line: None)
    return Runtime(robot, client, **kw)


# ---------------------------------------------------------------------------- safety filter
def test_safety_filter_clips_clamps_and_refuses_non_finite_actions():
    f = SafetyFilter(2, low=-1.0, high=[1.0, 0.5], max_delta=0.25)
    out = f.filter(np.array([2.0, 0.9]))
    assert out.action.tolist() == [1.0, 0.5] and out.events == ("clipped",)
    # Clamped to within 0.25 of the previous applied action, per component.
    out = f.filter(np.array([0.9, -0.9]), previous=np.array([0.0, 0.0]))
    assert out.action.tolist() == [0.25, -0.25] and out.events == ("rate_limited",)
    out = f.filter(np.array([0.1, 0.2]), previous=np.array([0.0, 0.1]))
    assert np.allclose(out.action, [0.1, 0.2]) and out.events == ()
    for bad in ([np.nan, 0.0], [0.0, np.inf]):
        assert f.filter(np.array(bad)).action is None and f.filter(np.array(bad)).events == ("nonfinite",)
    with pytest.raises(ValueError, match="3 values; the robot takes 2"):
        f.filter(np.zeros(3))


def test_safety_filter_keeps_the_predicted_position_inside_the_workspace():
    f = SafetyFilter(3, workspace_low=[-1, -1], workspace_high=[1, 0.5], step_scale=0.1)
    # At x=0.95 an action of +1 would reach 1.05: shortened to reach 1.0 exactly; dim 2 untouched.
    out = f.filter(np.array([1.0, 0.0, 0.7]), position=np.array([0.95, 0.0]))
    assert np.allclose(out.action, [0.5, 0.0, 0.7]) and out.events == ("workspace",)
    out = f.filter(np.array([-1.0, 1.0, 0.0]), position=np.array([0.0, 0.0]))
    assert np.allclose(out.action, [-1.0, 1.0, 0.0]) and out.events == ()
    with pytest.raises(ValueError, match="workspace_low and safety.workspace_high go together"):
        SafetyFilter(2, workspace_low=[0, 0])
    with pytest.raises(ValueError, match="max_delta must be > 0"):
        SafetyFilter(2, max_delta=0)


# ---------------------------------------------------------------------------- broker, rate
def test_chunk_broker_replans_every_k_actions_and_runs_out_at_the_horizon():
    b = ActionChunkBroker(replan_every=2)
    assert b.needs_plan() and b.next_action() is None
    b.set_chunk(np.arange(8).reshape(4, 2), received_at=0.0)
    assert not b.needs_plan()
    assert b.next_action().tolist() == [0, 1] and b.next_action().tolist() == [2, 3]
    assert b.needs_plan() and b.has_action()  # ask for the next chunk, the old one still has 2 actions
    b.set_chunk(np.full((4, 2), 9), received_at=1.0)
    assert b.next_action().tolist() == [9, 9]
    whole = ActionChunkBroker()
    whole.set_chunk(np.zeros((3, 2)), 0.0)
    for _ in range(3):
        assert not whole.needs_plan() and whole.next_action() is not None
    assert whole.needs_plan() and whole.next_action() is None
    with pytest.raises(ValueError, match="replan_every=0"):
        ActionChunkBroker(0)


def test_rate_limiter_sleeps_to_the_schedule_and_does_not_burst_after_an_overrun():
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(round(s, 6))
        now[0] += s

    r = RateLimiter(10.0, clock=lambda: now[0], sleep=sleep)
    r.start()
    now[0] += 0.03  # 30 ms of work
    r.wait()
    assert sleeps == [0.07] and now[0] == pytest.approx(0.1)
    now[0] += 0.35  # a long tick: counted, and the schedule restarts instead of sleeping 0 three times
    r.wait()
    assert r.overruns == 1
    now[0] += 0.02
    r.wait()
    assert sleeps[-1] == pytest.approx(0.08) and r.overruns == 1


def test_rate_limiter_holds_the_rate_on_the_real_clock():
    # 25 ticks at 50 Hz with a little work each: the whole loop takes 0.5 s (+-20%).
    r = RateLimiter(50.0)
    r.start()
    start = time.monotonic()
    for _ in range(25):
        sum(range(2000))
        r.wait()
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed <= 0.6, elapsed


# ---------------------------------------------------------------------------- the loop
def test_runtime_applies_the_servers_actions_through_the_filter_and_homes_at_the_end(tmp_path):
    robot = LogRobot(steps_per_episode=5)
    client = ScriptedClient(lambda k, obs: [[0.5, 3.0]])
    rt = runtime(robot, client, recorder=Recorder(tmp_path))
    results = rt.run(2, seeds=[7, 8])
    assert [r.steps for r in results] == [5, 5] and [r.holds for r in results] == [0, 0]
    assert robot.kinds().count("reset") == 2 and robot.kinds()[-1] == "home"
    assert [c for c in robot.calls if c[0] == "reset"] == [("reset", 7), ("reset", 8)]
    # Clipped to the robot's bounds: [0.5, 1.0], every step.
    assert all(a.tolist() == [0.5, 1.0] for a in robot.applied()) and results[0].events == {"clipped": 5}
    # The observation went out under the server's client keys.
    assert set(client.requests[0]) == {"observation/state", "prompt"} and client.requests[0]["prompt"] == "reach"
    z = np.load(tmp_path / "episode_0001.npz")
    assert z["action"].tolist() == [[0.5, 1.0]] * 5 and z["server_action"].tolist() == [[0.5, 3.0]] * 5
    assert z["obs/state"].shape == (5, 2) and not z["held"].any() and list(z["events"]) == ["clipped"] * 5
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in lines] == [7, 8] and lines[0]["steps"] == 5


def test_a_non_finite_action_holds_the_robot_for_that_step():
    robot = LogRobot(steps_per_episode=4)
    client = ScriptedClient(lambda k, obs: [[np.nan, 0.0]] if k == 1 else [[0.1, 0.1]])
    logs = []
    result = runtime(robot, client, log=logs.append).run_episode()
    assert robot.kinds() == ["reset", "apply", "hold", "apply", "apply"]
    assert result.holds == 1 and result.events == {"nonfinite": 1}
    assert any("non-finite" in line for line in logs)


def test_action_chunks_are_requested_every_replan_every_steps():
    robot = LogRobot(steps_per_episode=8)
    client = ScriptedClient(lambda k, obs: np.full((4, 2), k / 10))
    client.metadata = {**META, "action_horizon": 4}
    result = runtime(robot, client, replan_every=2).run_episode()
    assert result.steps == 8 and result.holds == 0
    # Synchronous replies: 4 requests, each chunk's first 2 actions used.
    assert len(client.requests) == 4
    assert [round(float(a[0]), 1) for a in robot.applied()] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]


def test_watchdog_holds_when_the_server_stalls_and_resumes_when_it_answers():
    release = threading.Event()

    def script(k, obs):
        if k == 2:  # the third request stalls until released
            release.wait(timeout=10)
        return [[0.2, 0.0]]

    robot = LogRobot(steps_per_episode=10_000)
    logs = []
    rt = runtime(robot, ScriptedClient(script), watchdog_s=0.2, max_hz=50, log=logs.append)
    timer = threading.Timer(0.8, release.set)
    timer.start()
    result = rt.run_episode(max_steps=80)
    timer.cancel()
    kinds = [k for k in robot.kinds() if k != "reset"]
    first_hold = kinds.index("hold")
    assert kinds[:2] == ["apply", "apply"] and first_hold == 2
    held = kinds[first_hold:kinds.index("apply", first_hold)]
    # Holding from the stall until the release (~0.6 s at 50 Hz = ~30 ticks), then moving again.
    assert set(held) == {"hold"} and 15 <= len(held) <= 45, len(held)
    assert "apply" in kinds[first_hold + len(held):]
    # The robot did not move while held.
    assert np.allclose(robot.pos[0], 0.1 * 0.2 * kinds.count("apply"))
    assert result.events.get("watchdog", 0) >= 1
    assert sum("watchdog" in line for line in logs) == 1  # logged once per stall
    assert any("answers again" not in line and "actions again" in line for line in logs)


def test_unreachable_server_holds_and_retries_then_a_changed_model_stops_the_run():
    calls = []

    def script(k, obs):
        calls.append(k)
        if k < 3:
            return ServerUnavailable("cannot reach ws://x")
        if k == 3:
            return [[0.3, 0.3]]
        return ModelChanged("the server came back with another model")

    robot = LogRobot(steps_per_episode=10_000)
    logs = []
    rt = runtime(robot, ScriptedClient(script), watchdog_s=5.0, retry_s=0.0, log=logs.append)
    with pytest.raises(ModelChanged):
        rt.run(1)
    kinds = robot.kinds()
    assert kinds[:5] == ["reset", "hold", "hold", "hold", "apply"]
    assert kinds[-1] == "home"  # an error still homes the robot
    assert any("cannot reach" in line for line in logs) and any("answers again" in line for line in logs)


def test_repeated_server_errors_stop_the_run_naming_the_servers_answer():
    robot = LogRobot(steps_per_episode=10_000)
    client = ScriptedClient(lambda k, obs: ServerError("error: missing key 'prompt'"))
    with pytest.raises(RuntimeError, match="refused 3 observations in a row.*missing key 'prompt'"):
        runtime(robot, client, max_server_errors=3, retry_s=0.0).run(1)
    assert robot.kinds()[-1] == "home" and robot.kinds().count("hold") == 2


def test_estop_stops_the_robot_without_homing():
    robot = LogRobot(steps_per_episode=100)
    rt = runtime(robot, ScriptedClient(lambda k, obs: [[0.1, 0.1]]), estop=lambda: robot.t >= 3)
    results = rt.run(3)
    assert len(results) == 1 and results[0].stopped == "estop" and rt.stopped == "estop"
    assert robot.kinds() == ["reset", "apply", "apply", "apply", "estop"]


def test_ctrl_c_holds_then_homes():
    class Interrupting(LogRobot):
        def apply_action(self, action):
            super().apply_action(action)
            if self.t == 2:
                raise KeyboardInterrupt

    robot = Interrupting()
    rt = runtime(robot, ScriptedClient(lambda k, obs: [[0.1, 0.1]]))
    rt.run(1)
    assert robot.kinds()[-2:] == ["hold", "home"] and rt.stopped == "interrupted"


def test_runtime_refuses_a_server_whose_action_dim_differs_from_the_robots():
    client = ScriptedClient(lambda k, obs: [[0.0]], metadata={**META, "action_dim": 7})
    with pytest.raises(ValueError, match="acts in 7 dimensions but the robot takes 2"):
        runtime(LogRobot(), client)


def test_observation_keys_map_robot_names_to_the_servers_keys():
    expected = META["observation"]
    msg = wire_observation({"state": np.zeros(2), "instruction": "go"}, expected)
    assert set(msg) == {"observation/state", "prompt"}
    msg = wire_observation({"joints": np.ones(2), "task": "go"}, expected,
                           {"observation/state": "joints", "prompt": "task"})
    assert msg["observation/state"].tolist() == [1.0, 1.0] and msg["prompt"] == "go"
    with pytest.raises(KeyError, match="needs 'prompt'.*observation_keys.prompt=<robot key>"):
        wire_observation({"state": np.zeros(2)}, expected)


def test_the_runtime_imports_without_torch():
    # The robot's computer may have no torch: every module but sim.py must import without it.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import rlplat.deploy.client, rlplat.deploy.runtime, rlplat.deploy.safety, rlplat.deploy.record, "
            "rlplat.deploy.robot, rlplat.deploy.cli\n"
            "assert 'transformers' not in sys.modules and 'ray' not in sys.modules\n"
            "from rlplat.deploy.cli import main; assert main(['--help']) == 0\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "watchdog_s: 1.0" in out.stdout


@pytest.mark.parametrize("argv, expected", [
    (["watchdog=0.5"], "watchdog is not a setting of rlplat-deploy; did you mean watchdog_s?"),
    (["robot=sim"], "robot=sim needs one of sim.run=RUN_DIR"),
    (["robot=arm", "server=http://x:8000"], "robot=arm: give robot=sim or robot=package.module:Class"),
    (["robot=sim", "sim.env=toy", "server=http://x:8000"], "server=http://x:8000: give the policy server's websocket"),
    (["robot=sim", "sim.env=toy", "watchdog_s=0"], "watchdog_s=0.0: must be > 0"),
    (["robot=sim", "sim.env=toy", "episodes=3", "seeds=[1,2]"], "seeds has 2 values for episodes=3"),
    (["robot=sim", "sim.env=toy", "sim.nope=1"], "Key 'nope' not in 'SimSettings'"),
    (["robot=tests.deploy.test_runtime:ScriptedClient"], "is not a subclass of rlplat.deploy.robot.Robot"),
])
def test_deploy_cli_refuses_bad_settings_by_name(capsys, argv, expected):
    from rlplat.deploy.cli import main

    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_deploy_cli_says_when_the_server_cannot_be_reached(capsys):
    from rlplat.deploy.cli import main

    assert main(["robot=sim", "sim.env=toy", "server=ws://127.0.0.1:9", "connect_timeout_s=2"]) == 2
    assert "cannot reach ws://127.0.0.1:9" in capsys.readouterr().err


def test_estop_is_heard_while_waiting_for_a_stalled_server():
    release = threading.Event()
    robot = LogRobot(steps_per_episode=100)
    pressed = threading.Event()
    client = ScriptedClient(lambda k, obs: release.wait(timeout=10) and [[0.1, 0.1]] if k == 1 else [[0.1, 0.1]])
    rt = runtime(robot, client, watchdog_s=5.0, estop=pressed.is_set)
    timer = threading.Timer(0.3, pressed.set)
    timer.start()
    start = time.monotonic()
    rt.run(1)
    waited = time.monotonic() - start
    release.set()
    # Stopped ~0.3 s in (not after the 5 s watchdog), without homing.
    assert waited < 2.0 and rt.stopped == "estop"
    assert robot.kinds() == ["reset", "apply", "estop"]
