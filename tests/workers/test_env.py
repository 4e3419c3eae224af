import numpy as np
import pytest
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


def test_reset_with_group_size_starts_each_group_like_its_leader():
    # Distinct seeds per env, as a controller might send; two shards of 4 hold two groups of 2 each.
    seeds = Batch({"seed": torch.arange(200, 208)})
    shards = [_worker(r, 2) for r in range(2)]
    plain = Batch.concat([w.reset(s) for w, s in zip(shards, seeds.chunk(2))])
    assert not torch.equal(plain["state"][0], plain["state"][1])
    grouped = Batch.concat([w.reset(s, group_size=2) for w, s in zip(shards, seeds.chunk(2))])
    leaders = torch.tensor([0, 0, 2, 2, 4, 4, 6, 6])
    torch.testing.assert_close(grouped["state"], plain["state"][leaders], rtol=0, atol=0)
    assert list(grouped["instruction"]) == [plain["instruction"][i] for i in leaders.tolist()]
    # One worker over all 8 envs gives the same groups: a group never depends on the sharding.
    torch.testing.assert_close(_worker(0, 1).reset(seeds, group_size=2)["state"], grouped["state"], rtol=0, atol=0)
    # Equal actions within each group keep the group together.
    rng = np.random.default_rng(1)
    for _ in range(25):
        per_group = torch.as_tensor(rng.uniform(-1, 1, (4, 2)), dtype=torch.float32)
        actions = Batch({"actions": per_group.repeat_interleave(2, 0)})
        out = Batch.concat([w.step(a) for w, a in zip(shards, actions.chunk(2))])
        torch.testing.assert_close(out["state"], out["state"][leaders], rtol=0, atol=0)


def test_reset_with_a_group_spanning_the_shard_names_group_size():
    with pytest.raises(ValueError, match="group_size: must be an int >= 1 that divides num_envs=4"):
        _worker(0, 2).reset(Batch({"seed": torch.arange(4)}), group_size=3)
