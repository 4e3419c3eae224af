"""The one run skeleton every loop shares, and the Collector contract that makes loops differ.

A run: place and build workers -> restore or reset -> iterate (collect a batch -> update ->
sync weights -> evaluate -> log -> checkpoint) -> report -> shutdown. What differs between an
embodied run, online image-model preference tuning and (next) offline preference data is only
how a training batch is collected and how the policy is evaluated: that is a ``Collector``.
The skeleton owns the policy worker groups (rollout and actor roles, fused when they share
devices), the update call, the weight sync, checkpoints and logging.
"""

from __future__ import annotations

import abc
import logging
import operator
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rlplat import checkpoint
from rlplat.batch import Batch
from rlplat.logging import METRICS_FILE, RunLogger, say, truncate_metrics
from rlplat.runtime.placement import Placement, PlacementSpec
from rlplat.runtime.worker_group import WorkerGroup

log = logging.getLogger(__name__)

#: Seconds since this process started (or resumed) the run, logged every iteration: what a
#: wall-clock ``trainer.stop_when`` (``perf/elapsed_s>1800``) and time curves read.
ELAPSED = "perf/elapsed_s"
_STOP_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
STOP_SYNTAX = ("'<metric><op><number>' with op one of <, <=, >, >= (several joined by ' or '), "
               "e.g. eval/fidelity<0.8 or 'eval/fidelity<0.8 or perf/elapsed_s>1800'")


@dataclass(frozen=True)
class StopCondition:
    """One ``trainer.stop_when`` condition: the run stops once ``metric op threshold`` holds."""

    metric: str
    op: str
    threshold: float

    def met(self, metrics: dict[str, Any]) -> bool:
        """Whether the metric was logged in ``metrics`` and meets the condition."""
        value = metrics.get(self.metric)
        return value is not None and bool(_STOP_OPS[self.op](float(value), self.threshold))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_stop_when(text: str | None) -> list[StopCondition]:
    """``trainer.stop_when`` as conditions (``"eval/fidelity<0.8 or perf/elapsed_s>1800"``);
    empty for null. Raises ValueError naming the key and the syntax."""
    if text is None or not str(text).strip():
        return []
    conditions = []
    for part in str(text).split(" or "):
        match = _CONDITION.match(part)
        if match is None:
            raise ValueError(f"trainer.stop_when={text!r}: {part.strip()!r} is not a condition; write {STOP_SYNTAX}")
        conditions.append(StopCondition(match.group(1), match.group(2), float(match.group(3))))
    return conditions


@dataclass
class PolicyWorkers:
    """What the skeleton builds the policy worker groups from (``Collector.policy_workers``)."""

    # The Worker class (PolicyWorker, DiffusionWorker, ...).
    worker_cls: type
    # Constructor arguments beyond policy_cfg, algo_cfg, roles, seed and torch_threads.
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    # Roles this loop knows; other roles of the placement (e.g. env) get no policy worker.
    roles: tuple[str, ...] = ("rollout", "actor")
    # Whether the rollout group also scores a frozen reference ("ref" role).
    with_ref: bool = False


class Collector(abc.ABC):
    """How a loop gets its training batches and evaluates its policy.

    The skeleton calls, in order: ``build`` (its own workers, e.g. simulators), then
    ``policy_workers`` (what the policy groups need), then ``attach`` (the built groups), and per
    iteration ``collect`` -> ``batch_metrics`` / ``has_signal`` -> (update) -> ``progress`` ->
    ``evaluate`` when due. ``state_dict`` / ``load_state_dict`` carry everything beyond the
    policy workers that a resumed run needs to continue exactly.
    """

    #: The metric that counts training data (env steps, samples): the learning curve's x axis.
    progress_key: ClassVar[str] = "samples"

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: Any) -> None:
        self.cfg, self.run_dir, self.algo = cfg, Path(run_dir), algo
        self.rng = np.random.default_rng(cfg.seed)
        self.logger: RunLogger | None = None
        self.rollout: WorkerGroup | None = None
        self.actor: WorkerGroup | None = None
        self.policy_groups: list[WorkerGroup] = []

    def build(self, placement: Placement, env_vars: dict[str, str]) -> None:
        """Builds the collector's own workers (none by default)."""

    @abc.abstractmethod
    def policy_workers(self) -> PolicyWorkers:
        """The policy worker class and the arguments it needs from this collector."""

    def attach(self, rollout: WorkerGroup, actor: WorkerGroup, policy_groups: list[WorkerGroup]) -> None:
        """Receives the policy groups once they are built."""
        self.rollout, self.actor, self.policy_groups = rollout, actor, policy_groups

    @abc.abstractmethod
    def collect(self, step: int) -> tuple[Batch, dict[str, Any]]:
        """This iteration's training batch (ready for ``algo.update``) and its metrics."""

    def batch_metrics(self, batch: Batch) -> dict[str, float]:
        """Metrics of the batch as the update will see it."""
        return {}

    def has_signal(self, batch: Batch) -> bool:
        """Whether the batch can move the policy (False: the update is skipped)."""
        return True

    @abc.abstractmethod
    def progress(self, step: int, iteration_s: float) -> dict[str, float]:
        """``progress_key`` and throughput after iteration ``step`` (which took ``iteration_s``)."""

    @abc.abstractmethod
    def evaluate(self, step: int, last: bool) -> dict[str, float]:
        """Evaluation metrics of the current policy (``last``: the final evaluation of the run)."""

    def weight_receivers(self) -> list[Any]:
        """Groups beyond the rollout group that take the actor's weights after each update."""
        return []

    def load_policy(self, folder: Path) -> None:
        """Loads a checkpoint's policy into the collector's own replicas (none by default)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores for this collector (the loop's random stream at least)."""
        return {"loop_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        """Restores ``state_dict`` (``folder``: the checkpoint, for workers that load from it)."""
        self.rng.bit_generator.state = state["loop_rng"]

    def report(self, metrics: dict[str, Any]) -> None:
        """Prints where the run's results are."""

    def shutdown(self) -> None:
        """Stops the collector's own workers."""


class StopSignals:
    """Turns SIGINT / SIGTERM (what terminals and schedulers send) into a clean stop: the first
    sets ``signum`` for the loop to finish its iteration and checkpoint; a second exits at once.
    Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signum is not None:
            # The run is stopping on a signal: the handler stays while the workers shut down (which
            # can take seconds), so a second signal there still exits at once without a traceback.
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting at once; the last periodic checkpoint is kept", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing this iteration and writing a checkpoint (send it again to exit at once)",
              file=sys.stderr, flush=True)

    def exit(self, message: str) -> None:
        """Exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), no traceback."""
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(128 + int(self.signum or 0))


class Run:
    """One training run: ``Collector`` + policy workers + algorithm, placed by ``cfg.placement``."""

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: Any, collector: Collector) -> None:
        self.cfg, self.run_dir, self.algo, self.collector = cfg, Path(run_dir), algo, collector
        # The env role is a different worker class, so it never fuses with policy roles.
        self.placement = Placement(PlacementSpec.from_config(cfg.placement), never_fuse={"env"})
        threads = cfg.trainer.torch_threads
        env_vars = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.policy_groups: list[WorkerGroup] = []
        # Times the run's workers were recreated after one died (trainer.max_restarts).
        self.restarts = 0
        # Wall time of the run before this process (from the resumed checkpoint) and the clock's
        # start for this part (``elapsed``).
        self.resumed_elapsed = 0.0
        self.run_start = time.perf_counter()
        # The checkpoint to resume, when the caller has found and verified it already
        # (``validate``); None: ``restore_or_reset`` resolves ``cfg.resume`` itself.
        self.resume_from: Path | None = None
        try:
            say(self.run_dir, self.placement.describe())
            collector.build(self.placement, env_vars)
            self._build_policy_groups(collector.policy_workers(), env_vars)
        except BaseException:
            self.shutdown()
            raise
        collector.attach(self.rollout, self.actor, self.policy_groups)
        if self.actor.world_size > 1:
            self.actor.init_distributed(self.actor.rendezvous())
        self.sync_weights(initial=True)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Trains for ``trainer.total_steps`` iterations, or until ``trainer.time_budget_s`` of wall
        time (counted across resumes) is spent; returns the last logged metrics.

        ``trainer.stop_when`` ends the run earlier, with a checkpoint and (when that step had
        none) an evaluation, once one of its conditions holds on a step's metrics.
        SIGINT / SIGTERM finish the current iteration, write a checkpoint, print the resume
        command and exit with 130 / 143 (a second signal exits at once)."""
        tc, collector = self.cfg.trainer, self.collector
        start = self.restore_or_reset()
        logger = collector.logger = RunLogger.from_config(self.cfg, self.run_dir, start)
        metrics: dict[str, Any] = {}
        conditions, unseen = parse_stop_when(tc.get("stop_when")), True
        budget = tc.get("time_budget_s")
        # perf/elapsed_s continues from the checkpoint's on resume (the budget spans both parts).
        self.run_start = time.perf_counter() - self.resumed_elapsed
        with StopSignals() as stop:
            try:
                if start == 0 and tc.eval_at_start:
                    # Step 0: the policy as loaded (e.g. an SFT checkpoint), before any update.
                    logger.log(0, {collector.progress_key: 0, **collector.evaluate(0, last=False)})
                for step in range(start + 1, tc.total_steps + 1):
                    t0 = time.perf_counter()
                    batch, metrics = collector.collect(step)
                    metrics |= self.update(batch, step)
                    self.sync_weights()
                    elapsed = time.perf_counter() - t0
                    metrics |= {**collector.progress(step, elapsed), "perf/iteration_s": elapsed,
                                ELAPSED: self.elapsed()}
                    if self.restarts:
                        metrics["faults/restarts"] = self.restarts
                    last = step == tc.total_steps or (budget is not None and metrics[ELAPSED] >= budget)
                    if last and step < tc.total_steps:
                        say(self.run_dir, f"trainer.time_budget_s={budget:g} spent after step {step} of "
                                          f"{tc.total_steps} ({metrics[ELAPSED]:.0f} s): final evaluation and checkpoint")
                    evaluated = last or bool(tc.eval_every and step % tc.eval_every == 0)
                    if evaluated:
                        metrics |= collector.evaluate(step, last)
                        if unseen and conditions:
                            unseen = self._warn_unlogged(conditions, metrics, step)
                    met = None if last else next((c for c in conditions if c.met(metrics)), None)
                    if met is not None and not evaluated:  # e.g. the wall-clock budget: end on an evaluation
                        metrics |= collector.evaluate(step, last=True)
                    logger.log(step, metrics)
                    periodic = bool(tc.checkpoint_every and step % tc.checkpoint_every == 0)
                    if last or stop.signum or met is not None or periodic:
                        self.save_checkpoint(step)
                    if met is not None:
                        say(self.run_dir, f"stopped after step {step} of {tc.total_steps}: trainer.stop_when "
                                          f"{met} holds ({met.metric}={float(metrics[met.metric]):.4g}); checkpoint "
                                          f"written, {checkpoint.resume_command(self.run_dir)}")
                        break
                    if last:
                        break
                    if stop.signum:
                        stop.exit(f"stopped after step {step} (checkpoint written); "
                                  f"{checkpoint.resume_command(self.run_dir)}")
            except Exception:
                if stop.signum:  # the signal also reached the workers: stop at the last checkpoint
                    stop.exit(f"stopped; {checkpoint.resume_command(self.run_dir)}")
                raise
            finally:
                logger.close()
        collector.report(metrics)
        return metrics

    def elapsed(self) -> float:
        """Wall seconds of the run so far (``perf/elapsed_s``), the resumed part included."""
        return time.perf_counter() - self.run_start

    @staticmethod
    def _warn_unlogged(conditions: list[StopCondition], metrics: dict[str, Any], step: int) -> bool:
        """Warns once about stop conditions whose metric the run's first evaluation did not log."""
        for condition in conditions:
            if condition.metric not in metrics:
                log.warning("trainer.stop_when watches %s, which this run did not log by step %d (logged: %s); "
                            "that condition can never stop it", condition.metric, step, ", ".join(sorted(metrics)))
        return False

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """One algorithm update on the actor group; returns its metrics averaged over ranks."""
        budget = self.cfg.trainer.get("time_budget_s")
        time_share = self.elapsed() / budget if budget else 0.0
        lr = self.algo.learning_rate(step - 1, self.cfg.trainer.total_steps, time_share)
        metrics = {"train/lr": lr, **self.collector.batch_metrics(batch)}
        if not self.collector.has_signal(batch):
            log.info("nothing in this iteration's batch carries signal: update skipped")
            return metrics
        per_rank = self.actor.update(batch, lr, step)
        per_rank = per_rank if isinstance(per_rank, list) else [per_rank]
        return metrics | {key: float(np.mean([m[key] for m in per_rank])) for key in per_rank[0]}

    def sync_weights(self, initial: bool = False) -> None:
        """Copies the actor's weights to a separate rollout group (none when they are fused) and
        to the collector's receivers; ``initial``: only the receivers (they start unset)."""
        targets = [] if initial or self.rollout is self.actor else [self.rollout]
        targets += self.collector.weight_receivers()
        if targets:
            weights = self.actor.get_weights()
            for target in targets:
                target.set_weights(weights)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Writes the policy groups (weights, optimizer, RNG) and the collector's state."""
        tmp = checkpoint.begin(self.run_dir, step)
        try:
            for group in self.policy_groups:
                group.save(str(tmp / checkpoint.POLICY))
            checkpoint.save_trainer_state(tmp, {"step": step, "controller_rng": checkpoint.capture_rng(),
                                                "elapsed_s": self.elapsed(),
                                                **self.collector.state_dict()})
            parts = {kind: str(self.cfg[kind]._target_) for kind in ("algo", "policy")}
            return checkpoint.commit(tmp, self.cfg.trainer.keep_last, parts)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays
            message = checkpoint.disk_full_message(err, tmp)
            if message:
                raise SystemExit(f"error: {message}: {checkpoint.resume_command(self.run_dir)}") from None
            raise

    def restore_or_reset(self) -> int:
        """Loads the checkpoint ``resume`` names (returning its step), else starts at 0."""
        folder = self.resume_from or checkpoint.find_resume_checkpoint(self.cfg.resume, self.run_dir)
        if folder is None:
            return 0
        state = checkpoint.load_trainer_state(folder)
        # Checkpoints written before the wall time was kept start their clock at 0.
        self.resumed_elapsed = float(state.get("elapsed_s", 0.0))
        self.load_policy(folder)
        self.collector.load_state_dict(state, folder)
        checkpoint.restore_rng(state["controller_rng"])
        truncate_metrics(folder.parent.parent / METRICS_FILE, self.run_dir / METRICS_FILE, state["step"])
        say(self.run_dir, f"resumed from {folder} (step {state['step']})")
        return state["step"]

    def load_policy(self, folder: Path) -> None:
        """Loads a checkpoint's policy (weights, optimizer, RNG) into every policy group."""
        for group in self.policy_groups:
            group.load(str(Path(folder) / checkpoint.POLICY))
        self.collector.load_policy(folder)

    # ------------------------------------------------------------------ set-up
    def _build_policy_groups(self, spec: PolicyWorkers, env_vars: dict[str, str]) -> None:
        cfg = self.cfg
        for roles in self.placement.fused_groups():
            roles = [r for r in roles if r in spec.roles]
            if not roles:
                continue
            roles += ["ref"] if "rollout" in roles and spec.with_ref else []
            group = WorkerGroup(
                spec.worker_cls, self.placement.devices(roles[0]), self.placement, self.placement.share(roles[0]),
                init_kwargs={
                    "policy_cfg": OmegaConf.to_container(cfg.policy, resolve=True),
                    "algo_cfg": OmegaConf.to_container(cfg.algo, resolve=True),
                    **spec.init_kwargs,
                    "roles": roles, "seed": cfg.seed, "torch_threads": cfg.trainer.torch_threads,
                },
                name="+".join(roles), env_vars=env_vars,
            )
            self.policy_groups.append(group)
            if "rollout" in roles:
                self.rollout = group
            if "actor" in roles:
                self.actor = group

    def shutdown(self) -> None:
        """Stops every worker group and frees the placement group."""
        self.collector.shutdown()
        for group in self.policy_groups:
            group.shutdown()
        self.placement.remove()
