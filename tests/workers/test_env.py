import numpy as np
import torch

from rlplat.batch import Batch
from rlplat.workers.env import EnvWorker, shard_size

ENV = {"_target_": "rlplat.envs.toy.ToyReachEnv", "obs_mode": "state", "max_episode_steps": 20}


def _worker(rank: int, world: int, n: int = 8) -> EnvWorker:
    return EnvWorker(rank, world, env_cfg=ENV, num_envs=n, num_eval_envs=3)


def test_shard_sizes_match_batch_chunk():
    for total, world in [(8, 2), (7, 3), (3, 2), (64, 1)]:
        sizes = [shard_size(total, r, world) for r in range(world)]
        assert sizes == [len(c) for c in Batch({"x": torch.arange(total)}).chunk(world)]


def test_two_shards_equal_one_worker():
    seeds = Batch({"seed": torch.arange(100, 108)})
    one = _worker(0, 1)
    shards = [_worker(r, 2) for r in range(2)]
    obs_one = one.reset(seeds)
    obs_two = Batch.concat([w.reset(s) for w, s in zip(shards, seeds.chunk(2))])
    torch.testing.assert_close(obs_one["state"], obs_two["state"])
    rng = np.random.default_rng(0)
    for _ in range(30):
        actions = Batch({"actions": torch.as_tensor(rng.uniform(-1, 1, (8, 2)), dtype=torch.float32)})
        a = one.step(actions)
        b = Batch.concat([w.step(x) for w, x in zip(shards, actions.chunk(2))])
        for key in ("state", "rewards", "terminated", "truncated", "final/state"):
            torch.testing.assert_close(a[key], b[key])
        assert list(a["instruction"]) == list(b["instruction"])


def test_state_round_trip_continues_exactly():
    w = _worker(0, 1)
    w.reset(Batch({"seed": torch.arange(8)}))
    state = w.get_state()
    actions = Batch({"actions": torch.full((8, 2), 0.5)})
    first = [w.step(actions)["state"] for _ in range(25)]
    w.set_state([state])
    again = [w.step(actions)["state"] for _ in range(25)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_eval_split_is_separate_and_sized():
    w = _worker(0, 1)
    obs = w.reset(Batch({"seed": torch.arange(3)}), split="eval")
    assert len(obs) == 3
    assert w.spec()["max_episode_steps"] == 20
    assert w.render("eval", 0).shape[-1] == 3
