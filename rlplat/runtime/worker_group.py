"""WorkerGroup: one Ray actor per device, with the worker's registered methods as group calls."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlplat.envs.base import SimulatorDied
from rlplat.runtime.dispatch import Dispatch, collect_results, dispatch_args, registered_methods
from rlplat.runtime.placement import Placement
from rlplat.runtime.worker import Worker

# After a worker fails, how long to wait for the others before raising: long enough to collect
# their results (so their errors are not reported again as unhandled), short enough not to
# hang on ranks that the failed one blocks (e.g. in a collective).
ERROR_GRACE_S = 5.0
# How long ``shutdown`` lets the workers close what they hold before killing them.
CLOSE_GRACE_S = 15.0


class WorkerDied(RuntimeError):
    """A worker process of a group, or a simulator process it drives, died (killed, crashed, out
    of memory) while the run used it.

    Attributes:
        group: the group's name; rank: the dead worker's rank; detail: Ray's account of the exit.
    """

    def __init__(self, group: WorkerGroup, rank: int, detail: str) -> None:
        self.group, self.rank, self.detail = group.name, rank, detail
        label = group.labels[rank] if rank < len(group.labels) else ""
        super().__init__(f"{group.worker_cls.__name__} rank {rank} of {group.world_size} (group {group.name!r}, "
                         f"device {group.devices[rank]}, pid {group.pids[rank]}{', ' + label if label else ''}) {detail}")


def _exit_detail(err: RayActorError) -> str:
    """The informative part of Ray's message about a dead actor (its exit type and detail)."""
    text = str(err)
    found = re.search(r"Worker exit type: (\S+)\s+Worker exit detail: (.+?)(?: There are some potential|$)", text, re.DOTALL)
    if found:
        return f"{found.group(1)}: {' '.join(found.group(2).split())}"
    return " ".join(text.split())[:300]


def _cause_of(ref: ray.ObjectRef) -> BaseException | None:
    """The exception a finished call raised (None: it returned, or has not finished)."""
    try:
        ray.get(ref, timeout=0)
    except RayTaskError as err:
        return err.cause
    except Exception:  # noqa: BLE001 (not finished, or the actor died: no task error)
        return None
    return None


def _raise_cause(err: RayTaskError) -> None:
    """Re-raise a worker's exception as itself, the remote traceback chained as its cause."""
    cause = err.cause
    if isinstance(cause, Exception) and not isinstance(cause, RayError):
        raise cause from err
    raise err


def _get(refs: list[ray.ObjectRef], timeout: float | None = None) -> list[Any]:
    """``ray.get`` that raises the lowest failed rank's exception as its own type."""
    try:
        return ray.get(refs, timeout=timeout)
    except RayTaskError:
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=ERROR_GRACE_S)[0])
        errors = []
        for ref in [r for r in refs if r in ready]:
            try:
                ray.get(ref)
            except RayTaskError as err:
                errors.append(err)
        _raise_cause(errors[0])
        raise  # unreachable: errors holds at least the error caught above


class GroupCall:
    """A group call in flight; ``get()`` waits and returns the merged result."""

    def __init__(self, refs: list[ray.ObjectRef], collect: Callable[[list[Any]], Any],
                 group: WorkerGroup | None = None) -> None:
        self.refs = refs
        self._collect = collect
        self._group = group

    def done(self) -> bool:
        """True when every worker has finished (without waiting)."""
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def get(self, timeout: float | None = None) -> Any:
        """Wait for every worker and return the merged result; raises a worker's exception, or
        ``WorkerDied`` naming the rank whose process died."""
        try:
            return self._collect(_get(self.refs, timeout))
        except SimulatorDied as err:  # a worker's simulator process exited: name the worker too
            if self._group is None:
                raise
            rank = next((r for r, ref in enumerate(self.refs) if _cause_of(ref) is not None), 0)
            raise WorkerDied(self._group, rank, str(err)) from err
        except RayActorError as err:
            if self._group is None:
                raise
            for rank, ref in enumerate(self.refs):
                try:
                    ray.get(ref, timeout=ERROR_GRACE_S)
                except RayActorError as dead:
                    raise WorkerDied(self._group, rank, f"died: {_exit_detail(dead)}") from err
                except Exception:  # noqa: BLE001, S112 (another rank's error or a slow rank: not the dead one)
                    continue
            raise


class WorkerGroup:
    """Ray actors running ``worker_cls``, one per device, called as one object.

    Every method of ``worker_cls`` marked with ``@register(mode)`` is bound onto the group
    under the same name: it splits the arguments by ``mode``, calls the actors, waits and
    merges the results. ``call_async`` does the same without waiting.

    Args:
        worker_cls: A ``Worker`` subclass; rank i is built as
            ``worker_cls(rank=i, world_size=len(devices), **init_kwargs)``.
        devices: Device (bundle) index of each rank.
        placement: The placement group to run in; None runs plain actors (tests).
        share: Fraction of a device each actor reserves (``Placement.share(role)``); without a
            placement, the number of CPUs per actor.
        init_kwargs: Extra constructor arguments, the same for every rank.
        name: Shown in errors and in ``repr``.
        env_vars: Environment variables of the actor processes (Ray ``runtime_env``).

    Raises:
        ActorDiedError: a worker's constructor raised (its traceback is in the message).
    """

    def __init__(
        self,
        worker_cls: type[Worker],
        devices: list[int],
        placement: Placement | None = None,
        share: float = 1.0,
        init_kwargs: dict[str, Any] | None = None,
        name: str = "",
        env_vars: dict[str, str] | None = None,
    ) -> None:
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError(f"worker_cls must be a Worker subclass, got {worker_cls!r}")
        if not devices:
            raise ValueError(
                f"worker group {name or worker_cls.__name__!r} needs at least one device"
            )
        if not 0 < share <= 1 and placement is not None:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.name = name or worker_cls.__name__
        self.worker_cls = worker_cls
        self.devices = list(devices)
        # What each rank serves, for messages (e.g. "envs 0-31"); set by the group's owner.
        self.labels: list[str] = []
        self._methods = registered_methods(worker_cls)
        clashes = sorted(m for m in self._methods if hasattr(WorkerGroup, m))
        if clashes:
            raise ValueError(
                f"{worker_cls.__name__} registers {clashes}, which WorkerGroup uses itself; "
                "rename them"
            )

        if placement is not None and placement.placement_group is None:
            raise ValueError("the placement has been removed")
        actor_cls = ray.remote(worker_cls)
        self.workers = []
        for rank, device in enumerate(self.devices):
            options: dict[str, Any] = {"num_cpus": share}
            if placement is not None:
                options = placement.actor_resources(device, share)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement.placement_group, placement_group_bundle_index=device
                )
            if env_vars:
                options["runtime_env"] = {"env_vars": {k: str(v) for k, v in env_vars.items()}}
            self.workers.append(
                actor_cls.options(**options).remote(
                    rank=rank, world_size=len(self.devices), **(init_kwargs or {})
                )
            )
        # Wait until every constructor has run, so its errors surface here; the process ids name
        # a worker that dies later.
        try:
            self.pids: list[int] = _get([w.pid.remote() for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

        for method_name in self._methods:
            setattr(self, method_name, self._bind(method_name))

    def _bind(self, method_name: str) -> Callable[..., Any]:
        @functools.wraps(getattr(self.worker_cls, method_name))
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call_async(method_name, *args, **kwargs).get()

        return call

    @property
    def world_size(self) -> int:
        """Number of workers."""
        return len(self.workers)

    def call_async(self, method_name: str, *args: Any, **kwargs: Any) -> GroupCall:
        """Start a registered method on the workers; ``.get()`` on the result waits and merges."""
        mode = self._methods.get(method_name)
        if mode is None:
            raise AttributeError(
                f"{self.worker_cls.__name__} has no registered method {method_name!r}; "
                f"registered: {sorted(self._methods)}"
            )
        if not self.workers:
            raise RuntimeError(f"worker group {self.name!r} has been shut down")
        calls = dispatch_args(mode, self.world_size, args, kwargs)
        if mode is Dispatch.ONE_TO_ALL and self.world_size > 1:
            # Serialize each large argument once instead of once per worker; Ray resolves
            # object refs passed as top-level arguments.
            args, kwargs = calls[0]
            args = tuple(_share(a) for a in args)
            kwargs = {k: _share(v) for k, v in kwargs.items()}
            calls = [(args, kwargs)] * self.world_size
        refs = [
            getattr(worker, method_name).remote(*a, **kw)
            for worker, (a, kw) in zip(self.workers, calls)
        ]
        return GroupCall(refs, functools.partial(collect_results, mode), self)

    def shutdown(self) -> None:
        """Let the live actors close what they hold (simulator subprocesses: killing their parent
        would orphan them), at most ``CLOSE_GRACE_S``, then kill the actors (idempotent)."""
        if self.workers:
            refs = [worker.close.remote() for worker in self.workers]
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_GRACE_S)  # dead ones answer at once, with their error
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def __repr__(self) -> str:
        return (
            f"WorkerGroup({self.name!r}, {self.worker_cls.__name__} x {self.world_size}, "
            f"devices={self.devices})"
        )


def _share(value: Any) -> Any:
    """Put anything but small scalars (and existing refs) into the object store once."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, ray.ObjectRef)):
        return value
    return ray.put(value)
