"""How a call on a worker group is split across ranks and how the results are merged.

A worker method marked with ``@register(Dispatch.X)`` becomes a method of its
``WorkerGroup``. The split (``dispatch_args``) and the merge (``collect_results``) are pure
functions so they can be tested without Ray.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from rlplat.batch import Batch

F = TypeVar("F", bound=Callable[..., Any])

# Attribute set on a registered method; its value is the method's Dispatch mode.
DISPATCH_ATTR = "__rlplat_dispatch__"


class Dispatch(enum.Enum):
    """How a group call reaches the workers."""

    # Same arguments to every worker; returns the list of results in rank order.
    ONE_TO_ALL = "one_to_all"
    # Every Batch argument is chunked into world_size contiguous pieces (worker i gets piece
    # i); other arguments go to every worker. Batch results are concatenated in rank order,
    # other results are returned as a list.
    SHARD_BY_BATCH = "shard_by_batch"
    # Only rank 0 is called; returns its result.
    RANK_ZERO = "rank_zero"


def register(dispatch_mode: Dispatch | F = Dispatch.ONE_TO_ALL) -> Callable[[F], F] | F:
    """Mark a Worker method as callable on its WorkerGroup with ``dispatch_mode``.

    Use as ``@register(Dispatch.SHARD_BY_BATCH)``, or bare ``@register`` for ONE_TO_ALL.
    """
    if callable(dispatch_mode) and not isinstance(dispatch_mode, Dispatch):
        return register(Dispatch.ONE_TO_ALL)(dispatch_mode)
    if not isinstance(dispatch_mode, Dispatch):
        raise TypeError(f"register expects a Dispatch mode, got {dispatch_mode!r}")

    def mark(fn: F) -> F:
        setattr(fn, DISPATCH_ATTR, dispatch_mode)
        return fn

    return mark


def registered_methods(cls: type) -> dict[str, Dispatch]:
    """Names of the registered methods of ``cls`` (inherited ones included) -> their modes."""
    methods = {}
    for name in dir(cls):
        mode = getattr(getattr(cls, name, None), DISPATCH_ATTR, None)
        if isinstance(mode, Dispatch):
            methods[name] = mode
    return methods


def dispatch_args(
    mode: Dispatch, world_size: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The (args, kwargs) each called worker receives, in rank order.

    RANK_ZERO gives one entry (for rank 0); the other modes give ``world_size`` entries.

    Raises:
        ValueError: SHARD_BY_BATCH with a Batch shorter than ``world_size``.
    """
    if mode is Dispatch.RANK_ZERO:
        return [(args, kwargs)]
    if mode is Dispatch.ONE_TO_ALL:
        return [(args, kwargs)] * world_size
    if mode is not Dispatch.SHARD_BY_BATCH:
        raise ValueError(f"unknown dispatch mode {mode!r}")

    def pieces(name: str, value: Any) -> list[Any]:
        if not isinstance(value, Batch):
            return [value] * world_size
        if len(value) < world_size:
            raise ValueError(
                f"SHARD_BY_BATCH: argument {name} has {len(value)} rows, fewer than the "
                f"{world_size} workers; every worker needs at least one row"
            )
        return value.chunk(world_size)

    arg_pieces = [pieces(f"#{i}", a) for i, a in enumerate(args)]
    kwarg_pieces = {k: pieces(repr(k), v) for k, v in kwargs.items()}
    return [
        (tuple(p[rank] for p in arg_pieces), {k: p[rank] for k, p in kwarg_pieces.items()})
        for rank in range(world_size)
    ]


def collect_results(mode: Dispatch, results: list[Any]) -> Any:
    """Merge the per-worker results (in rank order) of one group call."""
    if mode is Dispatch.RANK_ZERO:
        return results[0]
    if mode is Dispatch.SHARD_BY_BATCH and results and all(isinstance(r, Batch) for r in results):
        return Batch.concat(results)
    return list(results)
