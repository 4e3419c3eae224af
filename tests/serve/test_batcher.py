"""Micro-batching on its own: batch sizes, the wait, and a failing observation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rlplat.serve.batcher import Batcher


def _run(forward, requests, max_batch: int, wait_s: float):
    async def main():
        batcher = Batcher(forward, max_batch=max_batch, wait_s=wait_s)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        finally:
            await batcher.stop()
        return batcher, results

    return asyncio.run(main())


def test_requests_that_arrive_together_share_forward_passes_up_to_max_batch():
    calls = []

    def forward(observations):
        calls.append(list(observations))
        return np.array([[2.0 * o] for o in observations])

    batcher, results = _run(forward, list(range(10)), max_batch=4, wait_s=0.05)
    assert [len(c) for c in calls] == [4, 4, 2] and batcher.forward_passes == 3 and batcher.served == 10
    assert [float(a[0]) for a, _ in results] == [2.0 * i for i in range(10)]
    assert [t["batch_size"] for _, t in results] == [4] * 8 + [2, 2]


def test_without_batching_every_request_is_its_own_pass():
    batcher, results = _run(lambda obs: np.zeros((len(obs), 1)), list(range(5)), max_batch=1, wait_s=0.0)
    assert batcher.forward_passes == 5 and all(t["batch_size"] == 1 for _, t in results)


def test_a_failing_observation_fails_only_its_own_request():
    calls = []

    def forward(observations):
        calls.append(list(observations))
        if "boom" in observations:
            raise ValueError("the policy cannot act on boom")
        return np.array([[float(o)] for o in observations])

    _, results = _run(forward, [1, "boom", 3], max_batch=8, wait_s=0.1)
    assert calls[0] == [1, "boom", 3] and calls[1:] == [[1], ["boom"], [3]]  # the batch, then each alone
    assert float(results[0][0][0]) == 1.0 and float(results[2][0][0]) == 3.0
    with pytest.raises(ValueError, match="cannot act on boom"):
        raise results[1]
