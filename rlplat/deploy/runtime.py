"""The robot-side control loop: ``Runtime``, with ``ActionChunkBroker``, ``RateLimiter`` and a watchdog.

Each tick of ``Runtime.run_episode``:

1. stop if the robot says the episode ended, or the e-stop hook fires (``robot.estop()``, no
   homing afterwards);
2. read the observation; when the broker needs a new chunk (every ``replan_every`` actions) and
   no request is in flight, send it to the server from a worker thread;
3. take the next action of the current chunk. When a new chunk was requested, wait for it (with
   ``max_hz`` set and actions of the old chunk left, at most half a tick: a late reply does not stop
   the robot), but never past the **watchdog**: ``watchdog_s`` after the last fresh chunk arrived, the robot holds
   (``robot.hold()``), logged once per stall, and keeps holding at the loop's rate until a reply
   arrives (the client reconnects by itself when the server comes back); an action older than
   ``watchdog_s`` is never executed;
4. pass the action through the ``SafetyFilter`` (non-finite -> hold; clip; rate and workspace
   limits) and apply it, or hold;
5. record the step (``Recorder``) and sleep to the next tick (``RateLimiter``, ``max_hz``; none:
   as fast as the robot and the server allow, which is what a simulator dry run wants).

``Runtime.run`` runs episodes and moves the robot home when it leaves (normally, on Ctrl-C or on
an error), but not after an e-stop. With ``max_hz`` unset and ``replan_every`` = 1 the loop is
synchronous: each action is computed from the observation it is applied to, so a dry run in a
simulator reproduces in-process evaluation exactly.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlplat.deploy.client import ModelChanged, PolicyClient, ServerError, ServerUnavailable, wire_observation
from rlplat.deploy.record import Recorder
from rlplat.deploy.robot import Robot
from rlplat.deploy.safety import SafetyFilter

#: Longest time the loop waits for the server without asking the e-stop hook again (seconds).
ESTOP_POLL_S = 0.05


class ActionChunkBroker:
    """Hands out a server's action chunk one action per tick, and says when to ask for the next.

    Args:
        replan_every: actions executed from a chunk before a new one is requested (None: the whole
            chunk). While the new chunk is on its way, the rest of the old one keeps the robot moving.
    """

    def __init__(self, replan_every: int | None = None) -> None:
        if replan_every is not None and replan_every < 1:
            raise ValueError(f"replan_every={replan_every}: must be >= 1 (or null: the whole chunk)")
        self.replan_every = replan_every
        self.chunk: np.ndarray | None = None
        self.used = 0
        self.received_at = -np.inf

    def set_chunk(self, chunk: np.ndarray, received_at: float) -> None:
        """A fresh chunk [H, D] replaces whatever is left of the old one."""
        self.chunk = np.asarray(chunk, np.float32).reshape(len(chunk), -1)
        self.used = 0
        self.received_at = received_at

    def clear(self) -> None:
        self.chunk, self.used, self.received_at = None, 0, -np.inf

    def needs_plan(self) -> bool:
        """Whether a new chunk should be requested now."""
        if self.chunk is None:
            return True
        horizon = len(self.chunk)
        return self.used >= min(self.replan_every or horizon, horizon)

    def has_action(self) -> bool:
        return self.chunk is not None and self.used < len(self.chunk)

    def next_action(self) -> np.ndarray | None:
        """The next action of the chunk (None when it is used up)."""
        if not self.has_action():
            return None
        action = self.chunk[self.used]
        self.used += 1
        return action


class RateLimiter:
    """Sleeps so ticks come at most ``max_hz`` times a second (None: no limit).

    A tick that overruns its period is counted (``overruns``); the schedule then restarts from
    now rather than bursting to catch up.
    """

    def __init__(self, max_hz: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_hz is not None and max_hz <= 0:
            raise ValueError(f"max_hz={max_hz}: must be > 0 (or null: no limit)")
        self.period = None if max_hz is None else 1.0 / float(max_hz)
        self.clock, self.sleep = clock, sleep
        self.overruns = 0
        self._next = None

    def start(self) -> None:
        self._next = self.clock()

    def wait(self) -> None:
        """Returns at the next tick."""
        if self.period is None:
            return
        if self._next is None:
            self.start()
        self._next += self.period
        delay = self._next - self.clock()
        if delay > 0:
            self.sleep(delay)
        else:
            self.overruns += 1
            if delay < -self.period:
                self._next = self.clock()


@dataclass
class EpisodeResult:
    """What one episode did (``info``: the robot's ``episode_info``, e.g. success)."""

    seed: int | None
    steps: int
    holds: int
    duration_s: float
    events: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    round_trip_ms: list[float] = field(default_factory=list)
    stopped: str | None = None

    def summary(self) -> dict[str, Any]:
        latency = np.asarray(self.round_trip_ms) if self.round_trip_ms else None
        return {"seed": self.seed, "steps": self.steps, "holds": self.holds, "duration_s": round(self.duration_s, 3),
                "hz": round(self.steps / self.duration_s, 2) if self.duration_s > 0 else None,
                "round_trip_ms_p50": None if latency is None else round(float(np.percentile(latency, 50)), 2),
                "round_trip_ms_p99": None if latency is None else round(float(np.percentile(latency, 99)), 2),
                "events": self.events, "stopped": self.stopped, **self.info}


class Runtime:
    """Drives ``robot`` with actions from ``client`` (module docstring).

    Args:
        robot: the robot (or ``SimRobot``).
        client: a ``PolicyClient``; connected here, so a wrong address or key fails at once.
        safety: the filter every action passes (default: clip to the robot's bounds, else the
            server's announced bounds).
        replan_every: see ``ActionChunkBroker``.
        max_hz: loop rate limit (None: none).
        watchdog_s: longest time without a fresh chunk before the robot holds.
        retry_s: pause between requests after a failed one.
        max_server_errors: consecutive error replies (the server refusing the observation) after
            which the run stops; single ones hold the robot for a tick.
        recorder: where steps are recorded (None: not recorded).
        estop: polled every tick; True stops the robot (``robot.estop()``) and ends the run.
        observation_keys: client key -> robot observation key, for robots whose names differ.
        log: where events are reported (one line each).
        clock: time source (tests pass a fake one).
    """

    def __init__(self, robot: Robot, client: PolicyClient, *, safety: SafetyFilter | None = None,
                 replan_every: int | None = None, max_hz: float | None = None, watchdog_s: float = 1.0,
                 retry_s: float = 0.2, max_server_errors: int = 20, recorder: Recorder | None = None,
                 estop: Callable[[], bool] | None = None, observation_keys: Mapping[str, str] | None = None,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> None:
        if watchdog_s <= 0:
            raise ValueError(f"watchdog_s={watchdog_s}: must be > 0")
        self.robot, self.client = robot, client
        self.metadata = client.connect()
        dim = int(self.metadata["action_dim"])
        robot_dim = None if robot.action_low is None else int(np.size(robot.action_low))
        if robot_dim is not None and robot_dim != dim:
            raise ValueError(f"the server's policy acts in {dim} dimensions but the robot takes {robot_dim}: "
                             f"serve a policy trained for this robot")
        if safety is None:
            low = robot.action_low if robot.action_low is not None else self.metadata.get("action_low")
            high = robot.action_high if robot.action_high is not None else self.metadata.get("action_high")
            safety = SafetyFilter(dim, low=low, high=high)
        self.safety = safety
        self.broker = ActionChunkBroker(replan_every)
        self.rate = RateLimiter(max_hz, clock=clock)
        self.watchdog_s, self.retry_s = float(watchdog_s), float(retry_s)
        self.max_server_errors = int(max_server_errors)
        self.recorder, self.estop, self.log, self.clock = recorder, estop, log, clock
        self.observation_keys = dict(observation_keys or {})
        self.stopped: str | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlplat-infer")
        self._pending: futures.Future | None = None
        self._retry_at = -np.inf
        self._last_fresh = 0.0
        self._failure: str | None = None
        self._problem = ""
        self._server_errors = 0
        self._latencies: list[float] = []
        self._estop_fired = False

    # ------------------------------------------------------------------ episodes
    def run(self, episodes: int, seeds: list[int | None] | None = None, max_steps: int | None = None,
            on_episode: Callable[[int, EpisodeResult], None] | None = None) -> list[EpisodeResult]:
        """Runs ``episodes`` episodes (``seeds[k]`` for the k-th), then homes the robot.

        Stops early after an e-stop (no homing) or on an error (homing first, then re-raised).
        """
        results = []
        try:
            for k in range(episodes):
                result = self.run_episode(None if seeds is None else seeds[k], max_steps=max_steps)
                results.append(result)
                if on_episode is not None:
                    on_episode(k, result)
                if self.stopped is not None:
                    break
        except KeyboardInterrupt:
            self.robot.hold()
            self.stopped = "interrupted"
            self.log("deploy: interrupted (Ctrl-C): holding, then homing")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self.stopped != "estop":
                self.robot.home()
        return results

    def run_episode(self, seed: int | None = None, max_steps: int | None = None) -> EpisodeResult:
        """One episode: ticks until the robot says it ended, ``max_steps``, or an e-stop."""
        self.robot.reset(seed)
        self.broker.clear()
        self._pending, self._failure, self._retry_at = None, None, -np.inf
        self._latencies = []
        start = self.clock()
        self._last_fresh = start
        events: Counter[str] = Counter()
        holds = steps = 0
        stall_since: float | None = None
        previous: np.ndarray | None = None
        self.rate.start()
        while max_steps is None or steps < max_steps:
            if self.robot.episode_done():
                break
            if self._estopped():
                self.robot.estop()
                self.stopped = "estop"
                events["estop"] += 1
                self.log("deploy: e-stop: the robot stopped; the run ends without homing")
                break
            observation = self.robot.get_observation()
            server_action, reason = self._acquire(observation)
            if reason == "estop":
                continue  # the e-stop fired while waiting for the server: stop at the top of the loop
            step_events: tuple[str, ...] = ()
            applied = None
            if server_action is not None:
                result = self.safety.filter(server_action, previous, self.robot.position())
                applied, step_events = result.action, result.events
                if applied is None:
                    reason = "nonfinite"
                    self.log(f"deploy: step {steps}: the server sent a non-finite action: holding")
            if applied is None:
                self.robot.hold()
                holds += 1
                if (reason or "hold") not in step_events:
                    step_events = (*step_events, reason or "hold")
                if stall_since is None:
                    stall_since = self.clock()
            else:
                self.robot.apply_action(applied)
                previous = applied
                if stall_since is not None:
                    self.log(f"deploy: step {steps}: actions again after {self.clock() - stall_since:.2f} s of holding")
                    stall_since = None
            events.update(step_events)
            if self.recorder is not None:
                self.recorder.add(observation, server_action, applied, applied is None, self.clock() - start,
                                  step_events)
            steps += 1
            self.rate.wait()
        result = EpisodeResult(seed=seed, steps=steps, holds=holds, duration_s=self.clock() - start,
                               events=dict(events), info=self.robot.episode_info(),
                               round_trip_ms=list(self._latencies), stopped=self.stopped)
        if self.recorder is not None:
            self.recorder.end_episode(result.summary())
        return result

    # ------------------------------------------------------------------ actions
    def _acquire(self, observation: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
        """The next action to apply (or None) and, when None, why: ``watchdog`` (no fresh chunk for
        ``watchdog_s``), ``unavailable`` / ``server_error`` (the last request failed; retrying),
        ``waiting`` (a request in flight, within the watchdog's time)."""
        now = self.clock()
        if self._pending is None and self.broker.needs_plan() and now >= self._retry_at:
            message = wire_observation(observation, self.metadata["observation"], self.observation_keys)
            self._pending = self._pool.submit(self.client.infer, message)
        if self._pending is not None:
            if self._failure == "watchdog":
                timeout = self.rate.period or self.retry_s  # already holding: one tick's wait
            else:
                timeout = max(0.0, self._last_fresh + self.watchdog_s - now)
                if self.broker.has_action() and self.rate.period is not None:
                    # Real time: a late reply does not stall the loop while the old chunk has actions left.
                    timeout = min(timeout, 0.5 * self.rate.period)
            # Waited in slices, so the e-stop hook is heard within ESTOP_POLL_S even while waiting.
            deadline = self.clock() + timeout
            while not self._pending.done():
                left = deadline - self.clock()
                if left <= 0:
                    break
                futures.wait([self._pending], timeout=min(left, ESTOP_POLL_S))
                if self._estopped():
                    return None, "estop"
            if self._pending.done():
                self._collect(self._pending)
                self._pending = None
        now = self.clock()
        if self.broker.has_action() and self._fresh(now):
            return self.broker.next_action(), None
        if not self._fresh(now):
            if self._failure != "watchdog":
                self.log(f"deploy: watchdog: no fresh action for {now - self._last_fresh:.2f} s (watchdog_s="
                         f"{self.watchdog_s}){f'; last problem: {self._problem}' if self._failure else ''}: holding")
                self._failure = "watchdog"
            return None, "watchdog"
        return None, self._failure or "waiting"

    def _estopped(self) -> bool:
        if self.estop is None or self._estop_fired:
            return self._estop_fired
        self._estop_fired = bool(self.estop())
        return self._estop_fired

    def _fresh(self, now: float) -> bool:
        return now - self._last_fresh <= self.watchdog_s

    def _collect(self, done: futures.Future) -> None:
        """Takes a finished request's chunk, or notes why it failed."""
        try:
            chunk = done.result()
        except ServerUnavailable as err:
            self._fail("unavailable", str(err))
        except ServerError as err:
            self._server_errors += 1
            self._fail("server_error", str(err))
            if self._server_errors >= self.max_server_errors:
                raise RuntimeError(f"the server refused {self._server_errors} observations in a row; the last "
                                   f"answer: {err}") from None
        except ModelChanged:
            self.robot.hold()
            raise
        else:
            if self._failure is not None:
                self.log(f"deploy: the server answers again ({self.client.connects} connection(s) so far)")
            self._failure, self._server_errors = None, 0
            self._last_fresh = self.clock()
            self.broker.set_chunk(chunk, self._last_fresh)
            self._latencies.append(float(self.client.last_timing.get("round_trip_ms", np.nan)))

    def _fail(self, kind: str, problem: str) -> None:
        if self._failure is None or (self._failure != "watchdog" and problem != self._problem):
            self.log(f"deploy: {problem}")
        self._problem = problem
        if self._failure != "watchdog":
            self._failure = kind
        self._retry_at = self.clock() + self.retry_s
