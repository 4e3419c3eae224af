"""LIBERO behind the VectorEnv contract (real MuJoCo, headless EGL), one suite, two tasks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.simulators import require_simulator

require_simulator("libero")

from rlplat.envs.libero import LiberoEnv, evaluation_seeds, quat_to_axis_angle

SPATIAL_0 = "pick up the black bowl between the plate and the ramekin and place it on the plate"
SPATIAL_1 = "pick up the black bowl next to the ramekin and place it on the plate"


@pytest.fixture(scope="module")
def env():
    # In-process (sync) so tests can reach the scenes; 4-step episodes so auto-reset happens.
    env = LiberoEnv(num_envs=2, task_ids=[0, 1], image_size=64, vector="sync", max_episode_steps=4, settle_steps=2)
    yield env
    env.close()


def test_reset_step_render_and_orientation(env):
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (2, 64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["wrist_image"].shape == (2, 64, 64, 3)
    assert obs["proprio"].shape == (2, 8) and obs["proprio"].dtype == np.float32
    assert list(obs["instruction"]) == [SPATIAL_0, SPATIAL_1] and list(obs["task_index"]) == [0, 1]
    # Upright: the wooden floor in front of the table is at the bottom of the agent view, the
    # robot and the far side at the top (MuJoCo renders it the other way up).
    image = obs["image"][0].astype(float)
    brown = image[..., 0] - image[..., 2]
    assert brown[-10:].mean() > brown[:10].mean() + 10
    obs, reward, terminated, _, info = env.step(np.zeros((2, 7), np.float32))
    assert not info["success"].any() and not terminated.any() and (reward == 0).all()
    np.testing.assert_array_equal(env.render(1), obs["image"][1])


def test_success_flag_is_read_and_ends_the_episode(env):
    env.reset(seed=0)
    scene = env._sim.vec.envs[0].env
    scene.check_success = lambda: True  # the bddl goal holds
    try:
        _, reward, terminated, _, info = env.step(np.zeros((2, 7), np.float32))
    finally:
        del scene.check_success
    assert info["success"].tolist() == [True, False] and terminated.tolist() == [True, False]
    assert reward.tolist() == [1.0, 0.0] and info["episode_length"].tolist() == [1, 0]


def test_seeds_index_task_and_init_state(env):
    a, _ = env.reset(seed=[0, 3])  # task 0 init 0; task 1 init 1
    b, _ = env.reset(seed=[2, 1])  # task 0 init 1; task 1 init 0
    assert list(a["task_index"]) == [0, 1] and list(b["task_index"]) == [0, 1]
    assert not np.array_equal(a["image"][0], b["image"][0])  # another start of the same task
    again, _ = env.reset(seed=[0, 3])
    np.testing.assert_array_equal(again["image"], a["image"])  # same seed, same start
    # Truncation after 4 steps; the auto-reset continues with the same task's next init state,
    # i.e. the start of seed + 2 (two tasks): seed 0 -> seed 2.
    for _ in range(4):
        obs, _, _, truncated, _ = env.step(np.zeros((2, 7), np.float32))
    assert truncated.all() and list(obs["task_index"]) == [0, 1]
    np.testing.assert_array_equal(obs["image"][0], b["image"][0])
    assert evaluation_seeds(10, 3) == list(range(30))


def test_state_round_trip(env):
    env.reset(seed=5)
    env.step(np.full((2, 7), 0.2, np.float32))
    snapshot = pickle.loads(pickle.dumps(env.get_state()))
    actions = np.random.default_rng(0).uniform(-1, 1, (2, 2, 7)).astype(np.float32)
    first = [env.step(a)[0]["proprio"] for a in actions]
    env.set_state(snapshot)
    again = [env.step(a)[0]["proprio"] for a in actions]
    # MuJoCo's positions and velocities are restored; robosuite's controller internals are rebuilt,
    # so the continuation agrees to about a centimetre, not bit for bit.
    np.testing.assert_allclose(np.stack(first), np.stack(again), atol=0.03)


def test_axis_angle_and_bad_arguments():
    half = np.sqrt(0.5)
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0, 0, half, half])), [0, 0, np.pi / 2], atol=1e-6)
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0, 0, 0, 1.0])), [0, 0, 0])
    with pytest.raises(ValueError, match="suite"):
        LiberoEnv(num_envs=1, suite="libero_42")
    with pytest.raises(ValueError, match="task_ids"):
        LiberoEnv(num_envs=1, task_ids=[12])


def test_tiny_vla_grpo_runs_through_the_platform(ray_local, tmp_path):
    from rlplat.config import compose
    from rlplat.logging import read_metrics
    from rlplat.train import run

    cfg = compose(["experiment=libero_spatial_vla_tiny", "env.vector=sync", "env.max_episode_steps=3",
                   "env.settle_steps=1", "trainer.total_steps=1", "trainer.eval_every=1", "algo.num_minibatches=1",
                   "trainer.checkpoint_every=1", "logger.progress_bar=false"])
    final = run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["env_steps"] == 2 * 3
    # Evaluation seeds 0 and 1: task 0 and task 1 from their first init state, reported per task.
    assert {"eval/success_task_0", "eval/success_task_1"} <= set(final)
    assert (tmp_path / "media/episode.gif").stat().st_size > 0
