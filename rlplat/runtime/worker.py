"""Worker: the plain base class of everything a WorkerGroup runs as Ray actors."""

from __future__ import annotations

import os

from rlplat.runtime.dispatch import Dispatch, register


class Worker:
    """A plain class holding heavy state (simulators, a model) on one rank.

    Subclasses add methods marked with ``@register(Dispatch.X)``; a ``WorkerGroup`` turns
    them into group calls. Nothing here needs Ray, so a worker can be built and tested
    directly: ``MyWorker(rank=0, world_size=1).method(...)``.

    Args:
        rank: Position of this worker in its group (0-based).
        world_size: Number of workers in the group.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
        self.rank = rank
        self.world_size = world_size

    @register(Dispatch.ONE_TO_ALL)
    def ping(self) -> int:
        """Return this worker's rank (answers once the worker is up)."""
        return self.rank

    @register(Dispatch.ONE_TO_ALL)
    def pid(self) -> int:
        """Return the id of the process this worker runs in."""
        return os.getpid()

    @register(Dispatch.ONE_TO_ALL)
    def close(self) -> None:
        """Release what the worker holds outside its own process (subprocesses, files) before
        the group kills it; the default holds nothing."""
