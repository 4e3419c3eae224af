"""PolicyWorker's data-parallel update (rlplat/workers/policy.py), two gloo ranks without Ray."""

import multiprocessing as mp
import socket
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import torch

from rlplat.algos.ppo import PPOConfig
from rlplat.batch import Batch

OBS_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (3,), np.float32)})
ACTION_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, nan_rank: int, results: mp.Queue) -> None:
    from rlplat.workers.policy import PolicyWorker

    algo_cfg = {"_target_": "rlplat.algos.ppo.PPO", **asdict(PPOConfig()), "num_minibatches": 2, "update_epochs": 1, "target_kl": None}
    worker = PolicyWorker(rank, 2, policy_cfg={"_target_": "rlplat.policies.mlp.ActorCritic", "hidden_sizes": [8],
                                                      "normalize_obs": True},
                          algo_cfg=algo_cfg, observation_space=OBS_SPACE, action_space=ACTION_SPACE,
                          roles=["rollout", "actor"], seed=0)
    worker.init_distributed(f"tcp://127.0.0.1:{port}")
    g = torch.Generator().manual_seed(rank)
    shard = Batch({"state": torch.rand(16, 3, generator=g)})
    out = worker.act(shard)
    for key in ("actions", "logprobs", "values"):
        shard[key] = out[key]
    shard["advantages"], shard["returns"] = torch.randn(16, generator=g), torch.randn(16, generator=g)
    if rank == nan_rank:
        shard["advantages"][3] = float("nan")  # one minibatch of this rank only is non-finite
    metrics = worker.update(shard, lr=1e-2)
    # numpy, not tensors: torch would share tensor memory with the parent, gone once this exits.
    results.put((rank, metrics, {k: v.numpy().copy() for k, v in worker.policy.state_dict().items()}))
    torch.distributed.destroy_process_group()


def test_a_non_finite_minibatch_on_one_rank_is_skipped_by_every_rank():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, 1, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        # A rank that stepped alone would wait forever in the gradient all-reduce: bound the wait.
        got = dict((rank, (m, w)) for rank, m, w in (results.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        metrics = got[rank][0]
        assert metrics["train/skipped_nonfinite"] == 1.0, (rank, metrics)
        assert metrics["train/minibatches"] == 1.0, (rank, metrics)
    # Both ranks stepped the same (averaged) gradients and merged the same (averaged) observation
    # statistics of their different shards, so the replicas stay equal.
    w0, w1 = got[0][1], got[1][1]
    assert w0["obs_norm.state.count"] == 16.0  # rows per rank (the weight of a batch, equal on every rank)
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert all(np.isfinite(v).all() for v in w0.values())
