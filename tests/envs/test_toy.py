"""Behaviour of ToyReachEnv and, through it, the VectorEnv contract of envs/base.py."""

from __future__ import annotations

import pickle
from typing import Any

import gymnasium
import numpy as np
import pytest

from rlplat.envs.base import VectorEnv
from rlplat.envs.toy import GRIPPER_RGB, PALETTE, ToyReachEnv


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(-1))


def _toward(env: ToyReachEnv, goal: np.ndarray) -> np.ndarray:
    """Full-speed straight-line actions from each gripper toward ``goal`` [N, 2]."""
    a = (goal - env.gripper_pos) / env.action_scale
    return a / np.maximum(np.abs(a).max(axis=1, keepdims=True), 1.0)


def _rollout(
    env: ToyReachEnv, steps: int, policy: str, action_seed: int = 0
) -> dict[str, np.ndarray]:
    """Steps ``env`` and stacks everything it returned; policy is "random" or "expert"."""
    rng = np.random.default_rng(action_seed)
    keys = ("state", "proprio", "image", "instruction")
    extra = ("reward", "terminated", "truncated", "success", "final_state")
    out: dict[str, list[Any]] = {k: [] for k in (*extra, *keys)}
    for _ in range(steps):
        if policy == "random":
            actions = rng.uniform(-1, 1, (env.num_envs, 2))
        else:
            actions = env.expert_actions(noise=0.5)
        obs, reward, terminated, truncated, info = env.step(actions)
        for key in keys:
            if key in obs:
                out[key].append(obs[key])
        out["reward"].append(reward)
        out["terminated"].append(terminated)
        out["truncated"].append(truncated)
        out["success"].append(info["success"])
        out["final_state"].append(info["final_obs"]["state"])
    return {k: np.stack(v) for k, v in out.items() if v}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------- contract: spaces, shapes, layout


@pytest.mark.parametrize("obs_mode", ["state", "rgb", "state+rgb"])
def test_obs_shapes_dtypes_and_spaces(obs_mode: str) -> None:
    env = ToyReachEnv(num_envs=5, num_objects=3, obs_mode=obs_mode, image_size=32)
    assert isinstance(env, VectorEnv) and isinstance(env, gymnasium.vector.VectorEnv)
    assert env.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.SAME_STEP
    obs, info = env.reset(seed=0)
    assert info == {}
    expected_keys = {"state", "proprio", "instruction"}
    if "rgb" in obs_mode:
        expected_keys.add("image")
    assert set(obs) == expected_keys
    # S = 2 + K * (2 + C) + C + 2 with K = 3 objects and C = 4 colours.
    assert obs["state"].shape == (5, 26) and obs["state"].dtype == np.float32
    assert obs["proprio"].shape == (5, 3) and obs["proprio"].dtype == np.float32
    assert obs["instruction"].shape == (5,) and obs["instruction"].dtype == object
    assert all(isinstance(s, str) for s in obs["instruction"])
    if "rgb" in obs_mode:
        assert obs["image"].shape == (5, 32, 32, 3) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (5, 2)

    obs, reward, terminated, truncated, info = env.step(np.zeros((5, 2), np.float32))
    assert set(obs) == expected_keys and env.observation_space.contains(obs)
    assert reward.shape == (5,) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool and terminated.shape == (5,)
    assert set(info) == {"success", "done", "episode_return", "episode_length", "final_obs"}
    assert info["success"].dtype == bool and info["done"].dtype == bool
    assert info["episode_return"].dtype == np.float32 and info["episode_length"].dtype.kind == "i"
    assert set(info["final_obs"]) == expected_keys


def test_state_vector_layout_matches_scene() -> None:
    env = ToyReachEnv(num_envs=16, num_objects=3)
    obs, _ = env.reset(seed=7)
    state, k, c = obs["state"], 3, 4
    gripper, objects = env.gripper_pos, env.object_pos
    colors, target = env.object_colors, env.target_index
    np.testing.assert_allclose(state[:, :2], gripper, atol=1e-6)
    np.testing.assert_allclose(obs["proprio"], np.c_[gripper, np.zeros(16)], atol=1e-6)
    for j in range(k):
        block = state[:, 2 + j * (2 + c) : 2 + (j + 1) * (2 + c)]
        np.testing.assert_allclose(block[:, :2], objects[:, j] - gripper, atol=1e-6)
        np.testing.assert_array_equal(block[:, 2:], np.eye(c)[colors[:, j]])
    target_color = colors[np.arange(16), target]
    np.testing.assert_array_equal(state[:, -c - 2 : -2], np.eye(c)[target_color])
    # The privileged goal: the target's xy minus the gripper xy.
    np.testing.assert_allclose(state[:, -2:], objects[np.arange(16), target] - gripper, atol=1e-6)
    for i in range(16):
        assert f" {env.colors[target_color[i]]} square" in obs["instruction"][i]
    # Scene constraints: distinct colours, objects apart and in bounds, gripper away from all.
    assert all(len(set(row)) == k for row in colors)
    pairwise = _dist(objects[:, :, None], objects[:, None, :]) + np.eye(k) * 9
    assert pairwise.min() >= 0.35 and np.abs(objects).max() <= 0.85
    assert _dist(objects, gripper[:, None]).min() >= 0.3


def test_scene_randomization_covers_choices() -> None:
    env = ToyReachEnv(num_envs=64, num_objects=3)
    obs, _ = env.reset(seed=8)
    # Every square is the target sometimes, every colour appears, every phrasing is used.
    assert set(env.target_index) == {0, 1, 2}
    assert set(env.object_colors.ravel()) == {0, 1, 2, 3}
    assert {s.split(" the ")[0] for s in obs["instruction"]} == {"reach", "move to", "touch"}


# ---------------------------------------------------------------- seeding


def test_same_seed_same_trajectory_different_seed_differs() -> None:
    a = _rollout(_reset(ToyReachEnv(num_envs=8), seed=3), 100, "random")
    b = _rollout(_reset(ToyReachEnv(num_envs=8), seed=3), 100, "random")
    c = _rollout(_reset(ToyReachEnv(num_envs=8), seed=4), 100, "random")
    _assert_same(a, b)
    # 100 steps with a 50-step limit: every env has auto-reset at least once.
    assert (a["terminated"] | a["truncated"]).any(axis=0).all()
    assert not np.array_equal(a["state"], c["state"])
    assert not np.array_equal(a["reward"], c["reward"])


def test_sharded_envs_match_one_big_env() -> None:
    # Expert actions with noise exercise both per-env generators (scenes and expert noise),
    # and successes trigger many auto-resets.
    kwargs = {"obs_mode": "state+rgb", "image_size": 16}
    big = _rollout(_reset(ToyReachEnv(num_envs=8, **kwargs), seed=100), 100, "expert")
    lo = _rollout(_reset(ToyReachEnv(num_envs=4, **kwargs), seed=100), 100, "expert")
    hi_env = _reset(ToyReachEnv(num_envs=4, **kwargs), seed=[104, 105, 106, 107])
    hi = _rollout(hi_env, 100, "expert")
    assert big["terminated"].sum() > 20
    for key in big:
        sharded = np.concatenate([lo[key], hi[key]], axis=1)
        np.testing.assert_array_equal(big[key], sharded, err_msg=key)


def test_repeated_seed_list_gives_identical_groups() -> None:
    env = ToyReachEnv(num_envs=8, obs_mode="state+rgb", image_size=16)
    obs, _ = env.reset(seed=[5, 5, 5, 5, 9, 9, 9, 9])
    for key in ("state", "image", "instruction"):
        for group in (slice(0, 4), slice(4, 8)):
            rows = obs[key][group]
            assert all(np.array_equal(rows[0], r) for r in rows), key
    assert not np.array_equal(obs["state"][0], obs["state"][4])
    # The rule "env i gets seed s + i" means seed 5 in any slot equals env 0 of reset(seed=5).
    ref, _ = ToyReachEnv(num_envs=2, obs_mode="state+rgb", image_size=16).reset(seed=5)
    np.testing.assert_array_equal(obs["state"][2], ref["state"][0])
    np.testing.assert_array_equal(obs["image"][2], ref["image"][0])


def test_reset_groups_default_gives_members_their_leaders_seed() -> None:
    # The VectorEnv default: the toy's start state is a function of the seed, so members reset
    # with their leader's seed start (and, with equal actions, stay) exactly like it.
    env = ToyReachEnv(num_envs=6, obs_mode="state+rgb", image_size=16, max_episode_steps=5)
    seeds = [20, 21, 22, 23, 24, 25]
    plain, _ = env.reset(seed=seeds)
    assert not np.array_equal(plain["state"][0], plain["state"][1])  # without groups they differ
    obs, _ = env.reset_groups(seed=seeds, group_size=3)
    for key in ("state", "image", "instruction"):
        np.testing.assert_array_equal(obs[key][[0, 3]], plain[key][[0, 3]], err_msg=key)  # leaders keep theirs
        np.testing.assert_array_equal(obs[key], obs[key][[0, 0, 0, 3, 3, 3]], err_msg=key)
    # Equal actions within a group: equal trajectories, across the auto-reset at step 5 too.
    actions = np.random.default_rng(0).uniform(-1, 1, (8, 2, 2)).repeat(3, axis=1)
    for action in actions:
        obs, reward, *_ = env.step(action)
        np.testing.assert_array_equal(obs["state"], obs["state"][[0, 0, 0, 3, 3, 3]])
        np.testing.assert_array_equal(reward, reward[[0, 0, 0, 3, 3, 3]])
    with pytest.raises(ValueError, match="group_size: must be an int >= 1 that divides num_envs=6"):
        env.reset_groups(seed=seeds, group_size=4)


def test_reset_without_seed_continues_generators() -> None:
    env = ToyReachEnv(num_envs=4)
    first, _ = env.reset(seed=1)
    second, _ = env.reset()
    again = ToyReachEnv(num_envs=4)
    again.reset(seed=1)
    np.testing.assert_array_equal(again.reset()[0]["state"], second["state"])
    assert not np.array_equal(first["state"], second["state"])


# ---------------------------------------------------------------- auto-reset and truncation


def test_partial_auto_reset_same_step() -> None:
    env = ToyReachEnv(num_envs=4, max_episode_steps=50)
    obs, _ = env.reset(seed=1)
    d0 = _dist(env.target_pos, env.gripper_pos)[0]
    for step in range(1, 50):
        prev_obs = obs
        target0 = env.target_pos[0]
        actions = np.zeros((4, 2))
        actions[0] = env.expert_actions()[0]  # only env 0 moves
        obs, reward, terminated, truncated, info = env.step(actions)
        if terminated[0]:
            break
    else:
        pytest.fail("the expert never reached the target in env 0")

    assert info["success"][0] and info["done"][0] and not truncated[0]
    final = info["final_obs"]
    # The terminal observation has the gripper on the target, at the episode's last step.
    assert _dist(final["proprio"][0, :2], target0) < env.success_radius
    assert final["proprio"][0, 2] == pytest.approx(step / 50)
    # The returned observation starts a fresh episode: step counter back to 0, new scene.
    assert obs["proprio"][0, 2] == 0 and env.elapsed_steps[0] == 0
    np.testing.assert_allclose(obs["proprio"][0, :2], env.gripper_pos[0], atol=1e-6)
    assert _dist(env.gripper_pos[0], env.target_pos[0]) >= 0.3
    assert info["episode_length"][0] == step
    # Dense return telescopes: (d0 - d_final) / action_scale * 0.1 plus the success bonus.
    d_final = _dist(final["proprio"][0, :2].astype(np.float64), target0)
    expected_return = (d0 - d_final) / env.action_scale * 0.1 + 1.0
    assert info["episode_return"][0] == pytest.approx(expected_return, abs=1e-4)
    assert reward[0] >= 1.0
    # The other envs are untouched: not done, same positions, their counters keep running.
    assert not info["done"][1:].any() and (info["episode_length"][1:] == 0).all()
    assert (info["episode_return"][1:] == 0).all()
    np.testing.assert_array_equal(obs["state"][1:], prev_obs["state"][1:])
    np.testing.assert_allclose(obs["proprio"][1:, 2], step / 50)
    for key in obs:
        np.testing.assert_array_equal(final[key][1:], obs[key][1:])


def test_truncation_at_max_episode_steps() -> None:
    env = ToyReachEnv(num_envs=3, max_episode_steps=7, reward_mode="sparse")
    env.reset(seed=2)
    zeros = np.zeros((3, 2))
    for _ in range(6):
        _, reward, terminated, truncated, _ = env.step(zeros)
        assert not terminated.any() and not truncated.any() and (reward == 0).all()
    obs, reward, terminated, truncated, info = env.step(zeros)
    assert truncated.all() and not terminated.any() and not info["success"].any()
    assert (info["episode_length"] == 7).all() and (info["episode_return"] == 0).all()
    np.testing.assert_array_equal(info["final_obs"]["proprio"][:, 2], 1.0)
    np.testing.assert_array_equal(obs["proprio"][:, 2], 0.0)
    assert not np.array_equal(obs["state"], info["final_obs"]["state"])


def test_success_on_the_last_step_terminates_not_truncates() -> None:
    env = ToyReachEnv(num_envs=2, max_episode_steps=3)
    env.reset(seed=2)
    state = env.get_state()
    # Put the grippers one step from their targets, then idle until the last allowed step.
    state["gripper"] = env.target_pos + [[0.15, 0.0], [0.0, -0.15]]
    env.set_state(state)
    env.step(np.zeros((2, 2)))
    env.step(np.zeros((2, 2)))
    _, _, terminated, truncated, info = env.step(env.expert_actions())
    assert terminated.all() and info["success"].all() and not truncated.any()
    assert (info["episode_length"] == 3).all()


# ---------------------------------------------------------------- task semantics


def test_actions_are_clipped_and_gripper_stays_in_arena() -> None:
    env = ToyReachEnv(num_envs=2, action_scale=0.1)
    env.reset(seed=0)
    state = env.get_state()
    state["gripper"] = np.array([[0.95, 0.0], [0.0, 0.0]])
    env.set_state(state)
    env.step(np.array([[5.0, 0.0], [-3.0, 0.5]]))
    # Env 0: the action clips to 1 and the gripper to the wall; env 1: only the action clips.
    np.testing.assert_allclose(env.gripper_pos, [[1.0, 0.0], [-0.1, 0.05]], atol=1e-12)


def test_reaching_a_wrong_colour_never_succeeds() -> None:
    env = ToyReachEnv(num_envs=64, max_episode_steps=50, reward_mode="sparse")
    env.reset(seed=3)
    rows = np.arange(64)
    wrong = env.object_pos[rows, (env.target_index + 1) % 3]
    target, start = env.target_pos, env.gripper_pos
    # Keep envs whose straight path to the distractor stays clear of the target's success disc
    # (the path is a segment, so its closest point to the target decides).
    seg = wrong - start
    s = np.clip(((target - start) * seg).sum(-1) / (seg**2).sum(-1), 0, 1)
    clear = _dist(start + s[:, None] * seg, target) > env.success_radius
    assert clear.sum() >= 40
    for _ in range(49):
        _, reward, terminated, _, info = env.step(_toward(env, wrong))
        assert not info["success"][clear].any() and not terminated[clear].any()
        assert (reward[clear] == 0).all()
    # The gripper did arrive on the wrong square (and stayed there).
    assert _dist(env.gripper_pos[clear], wrong[clear]).max() < 1e-9


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_expert_reaches_instructed_square(noise: float) -> None:
    env = ToyReachEnv(num_envs=64, max_episode_steps=50)
    env.reset(seed=0)
    first_done = np.zeros(64, bool)
    first_success = np.zeros(64, bool)
    for _ in range(50):
        _, _, _, _, info = env.step(env.expert_actions(noise=noise))
        new = info["done"] & ~first_done
        first_success |= new & info["success"]
        first_done |= info["done"]
    assert first_done.all()
    assert first_success.mean() >= 0.95


def test_expert_noise_is_seeded() -> None:
    def noisy(seed: int, noise: float) -> np.ndarray:
        env = ToyReachEnv(num_envs=8)
        env.reset(seed=seed)
        return env.expert_actions(noise=noise)

    np.testing.assert_array_equal(noisy(1, 0.5), noisy(1, 0.5))
    assert not np.array_equal(noisy(1, 0.5), noisy(2, 0.5))
    assert not np.array_equal(noisy(1, 0.5), noisy(1, 0.0))


def test_dense_reward_telescopes() -> None:
    env = ToyReachEnv(num_envs=32, max_episode_steps=200)
    env.reset(seed=4)
    d0 = _dist(env.target_pos, env.gripper_pos)
    rng = np.random.default_rng(0)
    total = np.zeros(32)
    ended = np.zeros(32, bool)
    for _ in range(30):
        _, reward, _, _, info = env.step(rng.uniform(-1, 1, (32, 2)))
        total += reward
        ended |= info["done"]
        # One step moves at most action_scale * sqrt(2), so progress is at most 0.1 * sqrt(2).
        assert np.abs(reward[~info["done"]]).max() <= 0.1 * np.sqrt(2) + 1e-6
    d = _dist(env.target_pos, env.gripper_pos)
    assert (~ended).sum() >= 20
    telescoped = (d0 - d) / env.action_scale * 0.1
    np.testing.assert_allclose(total[~ended], telescoped[~ended], atol=1e-5)


# ---------------------------------------------------------------- images


def test_image_shows_target_colour_and_gripper() -> None:
    env = ToyReachEnv(num_envs=16, obs_mode="rgb", image_size=64)
    obs, _ = env.reset(seed=6)
    rows = np.arange(16)
    target_color = env.object_colors[rows, env.target_index]

    def pixel(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Row 0 is y = +1 and column 0 is x = -1.
        return ((1 - xy[:, 1]) / 2 * 64).astype(int), ((xy[:, 0] + 1) / 2 * 64).astype(int)

    r, c = pixel(env.target_pos)
    expected = np.array([PALETTE[env.colors[j]] for j in target_color])
    np.testing.assert_array_equal(obs["image"][rows, r, c], expected)
    r, c = pixel(env.gripper_pos)
    np.testing.assert_array_equal(obs["image"][rows, r, c], np.tile(GRIPPER_RGB, (16, 1)))
    for i in (0, 7, 15):
        np.testing.assert_array_equal(env.render(i), obs["image"][i])


def test_image_orientation() -> None:
    env = ToyReachEnv(num_envs=1, obs_mode="state", image_size=64)
    env.reset(seed=0)
    state = env.get_state()
    # Object 0 near the top centre, object 1 on the left, object 2 on the right; gripper below.
    state["obj_pos"][0] = [[0.0, 0.8], [-0.7, -0.5], [0.7, -0.5]]
    state["gripper"][0] = [0.0, -0.8]
    env.set_state(state)
    image = env.render(0)  # render works in "state" mode too
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8

    def centroid(j: int) -> np.ndarray:
        rgb = PALETTE[env.colors[env.object_colors[0, j]]]
        rr, cc = np.nonzero((image == rgb).all(-1))
        return np.array([rr.mean(), cc.mean()])

    # y = 0.8 -> row (1 - 0.8) / 2 * 64 = 6.4 (upper half); x = 0 -> column 32.
    np.testing.assert_allclose(centroid(0), [6.4, 32.0], atol=1.0)
    assert centroid(1)[1] < 16 and centroid(2)[1] > 48


# ---------------------------------------------------------------- checkpoint state


def test_get_set_state_continues_bit_exactly() -> None:
    kwargs = {"num_envs": 6, "obs_mode": "state+rgb", "image_size": 16}
    env = _reset(ToyReachEnv(**kwargs), seed=11)
    _rollout(env, 20, "expert")
    snapshot = pickle.loads(pickle.dumps(env.get_state()))
    expected = _rollout(env, 60, "expert")

    restored = _reset(ToyReachEnv(**kwargs), seed=999)
    restored.set_state(snapshot)
    _assert_same(_rollout(restored, 60, "expert"), expected)
    assert expected["terminated"].sum() > 10  # auto-resets happened after the restore

    with pytest.raises(ValueError, match="state"):
        _reset(ToyReachEnv(num_envs=6, num_objects=2), seed=0).set_state(snapshot)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_envs": 0}, "num_envs"),
        ({"num_objects": 5}, "num_objects"),
        ({"num_objects": 0}, "num_objects"),
        ({"colors": ("red", "chartreuse")}, "colors"),
        ({"colors": ("red", "red")}, "colors"),
        ({"colors": ()}, "colors"),
        ({"obs_mode": "depth"}, "obs_mode"),
        ({"reward_mode": "shaped"}, "reward_mode"),
        ({"image_size": 4}, "image_size"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"action_scale": 0.0}, "action_scale"),
        ({"success_radius": -0.1}, "success_radius"),
    ],
)
def test_bad_constructor_args_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ToyReachEnv(**kwargs)


def test_bad_call_args_raise() -> None:
    env = ToyReachEnv(num_envs=4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=-1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="actions"):
        env.step(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="actions"):
        env.step(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="noise"):
        env.expert_actions(noise=-1.0)
    with pytest.raises(ValueError, match="index"):
        env.render(4)


def _reset(env: ToyReachEnv, seed: int | list[int]) -> ToyReachEnv:
    env.reset(seed=seed)
    return env
