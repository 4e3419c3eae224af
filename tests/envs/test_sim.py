"""The CPU process vectors of envs/sim.py on a tiny in-process env (no simulator needed)."""

import functools

import gymnasium
import numpy as np
import pytest

from rlplat.envs.sim import GroupedProcessVector, ProcessVector


class CounterEnv(gymnasium.Env):
    """obs = [index, steps]; reset(seed) starts the count at the seed; render draws the index;
    render of index ``broken`` fails."""

    max_episode_steps = 5

    def __init__(self, index: int, broken: int = -1) -> None:
        self.index, self.broken, self.steps = index, broken, 0
        self.observation_space = gymnasium.spaces.Dict({"state": gymnasium.spaces.Box(-1e9, 1e9, (2,))})
        self.action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def _obs(self):
        return {"state": np.array([self.index, self.steps], np.float32)}

    def reset(self, *, seed=None, options=None):
        self.steps = int(seed or 0)
        return self._obs(), {}

    def step(self, action):
        self.steps += 1
        return self._obs(), float(action[0]), False, self.steps >= self.max_episode_steps, {}

    def render(self):
        if self.index == self.broken:
            raise ValueError(f"env {self.index} cannot render")
        return np.full((2, 2, 3), self.index, np.uint8)

    def snapshot(self):
        return {"steps": self.steps}

    def restore(self, snap):
        self.steps = snap["steps"]

    def start_from(self, snap):
        self.restore(snap)
        return self._obs()


def fns(n, broken=-1):
    return [functools.partial(CounterEnv, i, broken) for i in range(n)]


@pytest.mark.parametrize("grouped", [False, True])
def test_per_env_calls_reach_their_own_env(grouped):
    vec = GroupedProcessVector(fns(3), 2, "fork") if grouped else ProcessVector(fns(3), "async", "fork")
    try:
        vec.reset([0, 1, 2])
        vec.step(np.zeros((3, 1), np.float32))
        # Each env gets its own snapshot back (gymnasium's call() would give all the same one).
        vec.restore([{"steps": 7}, {"steps": 8}, {"steps": 9}])
        assert [s["steps"] for s in vec.snapshot()] == [7, 8, 9]
        obs = vec.step(np.zeros((3, 1), np.float32))[0]
        np.testing.assert_array_equal(obs["state"], [[0, 8], [1, 9], [2, 10]])
        assert int(vec.render(2)[0, 0, 0]) == 2
    finally:
        vec.close()


def test_a_failing_env_in_one_group_raises_its_error():
    vec = GroupedProcessVector(fns(3, broken=2), 2, "fork")
    try:
        vec.reset([0, 1, 2])
        assert int(vec.render(1)[0, 0, 0]) == 1
        # Only env 2's group is asked; its error comes back instead of a hang or a wrong frame.
        with pytest.raises(ValueError, match="env 2 cannot render"):
            vec.render(2)
    finally:
        vec.close()


@pytest.mark.parametrize("kind", ["sync", "async", "grouped"])
def test_copy_starts_gives_every_env_its_sources_state(kind):
    # Groups of the vector: [0, 1] and [2, 3] per subprocess when grouped; env 2 copies env 0,
    # which lives in the other subprocess.
    vec = {"sync": lambda: ProcessVector(fns(4), "sync", None), "async": lambda: ProcessVector(fns(4), "async", "fork"),
           "grouped": lambda: GroupedProcessVector(fns(4), 2, "fork")}[kind]()
    try:
        vec.reset([10, 11, 12, 13])
        obs = vec.copy_starts([0, 0, 0, 3])
        np.testing.assert_array_equal(obs["state"], [[0, 10], [1, 10], [2, 10], [3, 13]])
        obs = vec.step(np.zeros((4, 1), np.float32))[0]
        np.testing.assert_array_equal(obs["state"][:, 1], [11, 11, 11, 14])
        with pytest.raises(ValueError, match=r"sources: envs \[1\] are copied from but take another env's state"):
            vec.copy_starts([1, 2, 2, 3])
        with pytest.raises(ValueError, match="sources: need one env index in"):
            vec.copy_starts([0, 0, 4, 3])
    finally:
        vec.close()
