"""Micro-batching: requests that arrive together share one forward pass.

The first request of a batch waits at most ``wait_s`` for others (up to ``max_batch``); the batch
then runs in the one forward thread, so the event loop keeps taking connections and health checks
while the model computes. Requests that queue during a forward pass form the next batch at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Request:
    obs: Any
    future: asyncio.Future
    arrived: float


class Batcher:
    """Runs ``forward(observations) -> actions [B, ...]`` on batches of queued observations.

    Args:
        forward: the batched forward pass; called in a dedicated thread.
        max_batch: most observations per call.
        wait_s: longest wait for companions after a batch's first request.
    """

    def __init__(self, forward: Callable[[Sequence[Any]], np.ndarray], max_batch: int, wait_s: float) -> None:
        self.forward = forward
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_s)
        #: Forward passes run and observations served (the batching test and /healthz read them).
        self.forward_passes = 0
        self.served = 0
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlplat-serve-forward")

    def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops the batching task and the forward thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, obs: Any) -> tuple[np.ndarray, dict[str, float]]:
        """The actions for one observation and the request's timing (ms: queue, infer; batch_size)."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        request = _Request(obs, asyncio.get_running_loop().create_future(), time.perf_counter())
        await self._queue.put(request)
        return await request.future

    async def _next_batch(self) -> list[_Request]:
        queue = self._queue
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=remaining)
            if getter in done:
                batch.append(getter.result())
                continue
            getter.cancel()
            try:
                batch.append(await getter)  # it may have completed while being cancelled
            except asyncio.CancelledError:
                pass
            break
        return [r for r in batch if not r.future.done()]  # a client that left took its future with it

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch and not await self._serve(batch) and len(batch) > 1:
                # One observation broke the batch: serve each alone, so only its sender hears the
                # error and the others get their actions.
                for request in batch:
                    await self._serve([request])

    async def _serve(self, batch: list[_Request]) -> bool:
        """One forward pass for ``batch``, setting each future; False if it raised (then a lone
        request's future holds the error)."""
        start = time.perf_counter()
        try:
            actions = await asyncio.get_running_loop().run_in_executor(self._executor, self.forward,
                                                                       [r.obs for r in batch])
        except Exception as err:  # noqa: BLE001 - reported to its client; the server goes on
            if len(batch) == 1 and not batch[0].future.done():
                batch[0].future.set_exception(err)
            return False
        finally:
            self.forward_passes += 1
        infer_ms = (time.perf_counter() - start) * 1e3
        for i, r in enumerate(batch):
            if not r.future.done():
                r.future.set_result((actions[i], {"queue_ms": (start - r.arrived) * 1e3, "infer_ms": infer_ms,
                                                  "batch_size": len(batch)}))
        self.served += len(batch)
        return True
