"""Dispatch modes: the pure split/merge functions, then WorkerGroups on a local Ray."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
import torch

from rlplat.batch import Batch
from rlplat.runtime.dispatch import (
    Dispatch,
    collect_results,
    dispatch_args,
    register,
    registered_methods,
)
from rlplat.runtime.placement import Placement, PlacementSpec
from rlplat.runtime.worker import Worker
from rlplat.runtime.worker_group import WorkerGroup

# Ray workers cannot import test modules (pytest puts their folder on the driver's sys.path
# only), so the worker classes below travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(Worker):
    """A worker with one method per dispatch mode, each revealing which rank ran it."""

    def __init__(self, rank: int = 0, world_size: int = 1, offset: int = 0) -> None:
        super().__init__(rank, world_size)
        self.offset = offset

    @register(Dispatch.SHARD_BY_BATCH)
    def tag(self, batch: Batch, scale: int = 1) -> Batch:
        out = batch.select("x", "instruction")
        out["x"] = batch["x"] * scale + self.offset
        out["rank"] = torch.full((len(batch),), self.rank)
        out["worker"] = [f"r{self.rank}"] * len(batch)
        return out

    @register(Dispatch.ONE_TO_ALL)
    def rank_plus(self, k: int) -> int:
        return self.rank + k

    @register(Dispatch.ONE_TO_ALL)
    def total(self, batch: Batch) -> float:
        return float(batch["x"].sum())

    @register(Dispatch.RANK_ZERO)
    def leader(self) -> str:
        return f"rank{self.rank}"

    @register
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @register(Dispatch.ONE_TO_ALL)
    def bundle(self) -> tuple[str | None, set[str]]:
        """Placement group id and the bundle resources Ray reserved for this actor."""
        # resource_ids() is private: the public get_assigned_resources() strips bundle indices.
        raw = ray._private.worker.global_worker.core_worker.resource_ids()
        bundles = {k for k in raw if k.startswith("CPU_group_")}
        return ray.get_runtime_context().get_placement_group_id(), bundles

    def not_registered(self) -> None:
        pass


class BrokenWorker(Worker):
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        raise RuntimeError("no simulator here")


class ClosingWorker(Worker):
    """Leaves a file per rank when asked to close (what a simulator-holding worker releases)."""

    def __init__(self, rank: int = 0, world_size: int = 1, folder: str = "") -> None:
        super().__init__(rank, world_size)
        self.folder = folder

    @register(Dispatch.ONE_TO_ALL)
    def close(self) -> None:
        with open(f"{self.folder}/closed_{self.rank}", "w") as f:
            f.write(str(os.getpid()))


def make_batch(n: int) -> Batch:
    instructions = [f"t{i}" for i in range(n)]
    return Batch({"x": torch.arange(n)}, extras={"instruction": instructions}, meta={"step": 7})


# ------------------------------------------------------------------ pure functions


def test_register_marks_methods_including_inherited_ones() -> None:
    assert registered_methods(EchoWorker) == {
        "bundle": Dispatch.ONE_TO_ALL,
        "close": Dispatch.ONE_TO_ALL,
        "fail": Dispatch.ONE_TO_ALL,
        "leader": Dispatch.RANK_ZERO,
        "pid": Dispatch.ONE_TO_ALL,
        "ping": Dispatch.ONE_TO_ALL,
        "rank_plus": Dispatch.ONE_TO_ALL,
        "tag": Dispatch.SHARD_BY_BATCH,
        "total": Dispatch.ONE_TO_ALL,
    }
    with pytest.raises(TypeError, match="Dispatch mode"):
        register("shard")


def test_dispatch_one_to_all_and_rank_zero() -> None:
    assert dispatch_args(Dispatch.ONE_TO_ALL, 3, (1,), {"k": 2}) == [((1,), {"k": 2})] * 3
    assert dispatch_args(Dispatch.RANK_ZERO, 3, (1,), {}) == [((1,), {})]


def test_dispatch_shards_every_batch_argument_and_broadcasts_the_rest() -> None:
    args, kwargs = (make_batch(5), "same"), {"other": make_batch(4), "n": 3}
    calls = dispatch_args(Dispatch.SHARD_BY_BATCH, 2, args, kwargs)
    assert len(calls) == 2
    (a0, k0), (a1, k1) = calls
    assert a0[0]["x"].tolist() == [0, 1, 2] and a1[0]["x"].tolist() == [3, 4]
    assert a0[1] == a1[1] == "same"
    assert k0["other"]["x"].tolist() == [0, 1] and k1["other"]["x"].tolist() == [2, 3]
    assert k0["n"] == k1["n"] == 3
    with pytest.raises(ValueError, match="argument #0 has 1 rows, fewer than the 2 workers"):
        dispatch_args(Dispatch.SHARD_BY_BATCH, 2, (make_batch(1),), {})


def test_collect_results() -> None:
    merged = collect_results(Dispatch.SHARD_BY_BATCH, [make_batch(2), make_batch(1)])
    assert merged["x"].tolist() == [0, 1, 0]
    assert merged["instruction"].tolist() == ["t0", "t1", "t0"]
    assert collect_results(Dispatch.SHARD_BY_BATCH, [1, 2]) == [1, 2]
    assert collect_results(Dispatch.ONE_TO_ALL, [make_batch(1)] * 2)[1]["x"].tolist() == [0]
    assert collect_results(Dispatch.RANK_ZERO, ["rank0"]) == "rank0"


def test_worker_runs_without_ray() -> None:
    worker = EchoWorker(rank=1, world_size=2, offset=10)
    assert worker.ping() == 1
    assert worker.tag(make_batch(2))["x"].tolist() == [10, 11]
    with pytest.raises(ValueError, match="rank 2 is outside a group of world_size 2"):
        Worker(rank=2, world_size=2)


# ------------------------------------------------------------------ on Ray


def check_group(group: WorkerGroup, offset: int) -> None:
    """Every dispatch mode gives exact, rank-ordered results on a 2-worker group."""
    assert group.world_size == 2
    assert group.ping() == [0, 1]

    out = group.tag(make_batch(5), scale=2)
    assert out["rank"].tolist() == [0, 0, 0, 1, 1]
    assert out["x"].tolist() == [offset + 2 * i for i in range(5)]
    assert out["instruction"].tolist() == ["t0", "t1", "t2", "t3", "t4"]
    assert out["worker"].tolist() == ["r0", "r0", "r0", "r1", "r1"]
    assert out.meta == {"step": 7}

    assert group.rank_plus(10) == [10, 11]
    assert group.total(make_batch(4)) == [6.0, 6.0]
    assert group.leader() == "rank0"

    pending = group.call_async("tag", make_batch(5), scale=2)
    again = pending.get(timeout=60)
    assert pending.done()
    assert again["x"].tolist() == out["x"].tolist()
    assert again["rank"].tolist() == out["rank"].tolist()

    with pytest.raises(ValueError, match="^bad shard 3$"):
        group.fail("bad shard 3")
    with pytest.raises(AttributeError, match="no registered method 'not_registered'"):
        group.call_async("not_registered")


def test_group_of_plain_actors_with_fractional_cpus(ray_local: None) -> None:
    group = WorkerGroup(
        EchoWorker, devices=[0, 1], share=0.5, init_kwargs={"offset": 100}, name="echo"
    )
    try:
        check_group(group, offset=100)
        assert len(set(group.pid())) == 2
    finally:
        group.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        group.ping()


def test_colocated_groups_share_placement_bundles(ray_local: None) -> None:
    roles = {"env": "0-1", "rollout": "0-1", "actor": "0-1"}
    spec = PlacementSpec(num_devices=2, cpus_per_device=1.0, roles=roles)
    placement = Placement(spec, never_fuse={"env"})
    groups = []
    try:
        assert placement.fused_groups() == [("env",), ("rollout", "actor")]
        for fused in placement.fused_groups():
            role = fused[0]
            assert placement.share(role) == 0.5
            devices, share = placement.devices(role), placement.share(role)
            groups.append(WorkerGroup(EchoWorker, devices, placement, share, name="+".join(fused)))
        # Four actors at 0.5 CPU fill the two 1-CPU bundles; rank i sits in bundle i.
        for group in groups:
            check_group(group, offset=0)
            pg_id = placement.placement_group.id.hex()
            # Sets, not sorted lists: a pg id starting with a digit sorts "CPU_group_0<id>" first.
            assert group.bundle() == [
                (pg_id, {f"CPU_group_0_{pg_id}", f"CPU_group_{pg_id}"}),
                (pg_id, {f"CPU_group_1_{pg_id}", f"CPU_group_{pg_id}"}),
            ]
        # Calls on two groups overlap.
        env_call, policy_call = (g.call_async("rank_plus", 1) for g in groups)
        assert env_call.get() == policy_call.get() == [1, 2]
    finally:
        for group in groups:
            group.shutdown()
        placement.remove()


def test_shutdown_lets_live_workers_close_before_killing_them(ray_local: None, tmp_path) -> None:
    group = WorkerGroup(ClosingWorker, devices=[0, 1, 2], share=0.5, init_kwargs={"folder": str(tmp_path)})
    pids = group.pid()
    ray.kill(group.workers[1])  # a dead rank neither blocks nor fails the shutdown
    for _ in range(300):  # the kill is asynchronous: wait until the actor is gone
        try:
            ray.get(group.workers[1].ping.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the killed actor still answers after 60 s")
    group.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed_0", "closed_2"]
    assert (tmp_path / "closed_2").read_text() == str(pids[2])
    group.shutdown()  # idempotent


def test_constructor_errors_surface_when_the_group_is_built(ray_local: None) -> None:
    with pytest.raises(ray.exceptions.ActorDiedError, match="no simulator here"):
        WorkerGroup(BrokenWorker, devices=[0], share=0.5)
