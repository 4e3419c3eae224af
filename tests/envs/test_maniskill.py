"""ManiSkill3 behind the VectorEnv contract, on the CPU simulator (physx_cpu + lavapipe Vulkan)."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.simulators import require_simulator

require_simulator("mani_skill")

from rlplat.batch import Batch
from rlplat.envs.maniskill import ManiSkillEnv, task_instruction
from rlplat.workers.env import EnvWorker

# Short episodes so auto-reset happens inside a test; sync vector (no subprocesses) unless the
# test is about the async path.
SMALL = {"task": "PushCube-v1", "max_episode_steps": 6, "vector": "sync", "sim_backend": "physx_cpu"}


def _actions(n: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (steps, n, 7)).astype(np.float32)


def test_pushcube_state_reset_step_contract():
    env = ManiSkillEnv(num_envs=2, **SMALL)
    obs, _ = env.reset(seed=3)
    assert obs["state"].shape == (2, 35) and obs["state"].dtype == np.float32
    assert obs["proprio"].shape == (2, 18)  # Panda: 9 joint positions + 9 velocities
    assert list(obs["instruction"]) == ["push the cube to the red and white target"] * 2
    assert "image" not in obs
    assert env.single_action_space.shape == (7,) and env.max_episode_steps == 6
    # Different seeds, different cube positions (state holds the object pose).
    assert not np.allclose(obs["state"][0], obs["state"][1])
    returns = np.zeros(2)
    for t, action in enumerate(_actions(2, 6)):
        obs, reward, _, truncated, info = env.step(action)
        assert reward.dtype == np.float32 and np.all((reward >= 0) & (reward <= 1))  # normalized_dense
        assert info["success"].dtype == bool and not info["success"].any()  # random arms do not push
        returns += reward
    # Episode 1 ended at step 6 on both rows: truncated, stats reported, obs already reset.
    assert truncated.all() and info["done"].all()
    np.testing.assert_array_equal(info["episode_length"], [6, 6])
    np.testing.assert_allclose(info["episode_return"], returns, rtol=1e-5)
    assert not np.allclose(info["final_obs"]["state"], obs["state"])
    env.close()


def test_pushcube_rgb_images_and_render():
    env = ManiSkillEnv(num_envs=1, obs_mode="rgb", image_size=64, **SMALL)
    obs, _ = env.reset(seed=0)
    image = obs["image"]
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 10  # a rendered scene, not a blank frame
    # Row 0 is the top of the picture: the table (lower half) is brighter than the dark sky.
    assert image[0, 48:].mean() > image[0, :16].mean()
    moved = env.step(np.ones((1, 7), np.float32))[0]["image"]
    assert not np.array_equal(moved, image)  # the arm moved in view
    np.testing.assert_array_equal(env.render(0), moved[0])
    env.close()


def test_state_mode_render_uses_the_human_camera():
    env = ManiSkillEnv(num_envs=1, render_size=48, **SMALL)
    env.reset(seed=0)
    frame = env.render(0)
    assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8 and frame.std() > 5
    env.close()


def test_async_and_grouped_vectors_match_sync():
    # 3 envs: one subprocess each, or groups of 2 + 1 per subprocess; across an auto-reset
    # (episodes of 6), with the success flags, render and snapshot round trip of the groups.
    actions = _actions(3, 8)
    runs = {}
    for vector, per_process in (("sync", 1), ("async", 1), ("async", 2)):
        env = ManiSkillEnv(num_envs=3, **{**SMALL, "vector": vector, "envs_per_process": per_process})
        obs = [env.reset(seed=11)[0]]
        steps = [env.step(a) for a in actions]
        runs[vector, per_process] = {
            "state": np.stack([o["state"] for o in obs] + [s[0]["state"] for s in steps]),
            "reward": np.stack([s[1] for s in steps]), "truncated": np.stack([s[3] for s in steps]),
            "final": np.stack([s[4]["final_obs"]["state"] for s in steps]),
        }
        if per_process == 2:
            assert type(env._sim).__name__ == "GroupedProcessVector" and len(env._sim.slices) == 2
            assert env.render(2).shape == (256, 256, 3)  # env 2 lives in the second subprocess
            snapshot = env.get_state()
            after = env.step(actions[0])[0]["state"]
            env.set_state(snapshot)
            np.testing.assert_allclose(env.step(actions[0])[0]["state"], after, atol=1e-4)
        env.close()
    assert runs["sync", 1]["truncated"][5].all()  # the auto-reset happened inside the run
    for other in (("async", 1), ("async", 2)):
        for key, value in runs["sync", 1].items():
            np.testing.assert_array_equal(value, runs[other][key], err_msg=f"{other} {key}")


def _goal(env: ManiSkillEnv, index: int) -> np.ndarray:
    """The task's goal marker position in env ``index`` of a sync vector (not from the obs)."""
    base = env._sim.vec.envs[index].base
    return (base.goal_site if hasattr(base, "goal_site") else base.goal_region).pose.p.numpy()


@pytest.mark.parametrize("task", ["PushCube-v1", "PickCube-v1"])
@pytest.mark.parametrize("vector, per_process", [("sync", 1), ("async", 2)])
def test_reset_groups_copies_the_leaders_state(task, vector, per_process):
    # Different seeds per env; groups {0, 1} and {2, 3}. With two envs per subprocess env 1
    # shares its leader's process; episodes of 6 steps, so the 8 steps cross an auto-reset.
    env = ManiSkillEnv(num_envs=4, **{**SMALL, "task": task, "vector": vector, "envs_per_process": per_process})
    try:
        seeds = [30, 31, 32, 33]
        plain = env.reset(seed=seeds)[0]
        leaders = [0, 0, 2, 2]
        assert not np.array_equal(plain["state"][0], plain["state"][1])  # without the copy they differ
        assert not np.array_equal(plain["state"][2], plain["state"][3])
        obs = env.reset_groups(seed=seeds, group_size=2)[0]
        for key in ("state", "proprio"):
            # Leaders keep their own start; they too restart from their state (so the group steps
            # bit for bit alike), whose link poses PhysX recomputes to the last float32 bit.
            np.testing.assert_allclose(obs[key][[0, 2]], plain[key][[0, 2]], rtol=0, atol=1e-6, err_msg=key)
            np.testing.assert_array_equal(obs[key], obs[key][leaders], err_msg=key)
        if vector == "sync":  # the goal marker itself, not only its copy in the observation
            np.testing.assert_array_equal(_goal(env, 1), _goal(env, 0))
            assert not np.array_equal(_goal(env, 2), _goal(env, 0))
        # Equal actions within a group: equal steps, bit for bit, and equal episodes after the
        # auto-reset (the leader's RNGs were copied too).
        ends = []
        for t, action in enumerate(_actions(2, 8, seed=3).repeat(2, axis=1)):
            obs, reward, terminated, truncated, info = env.step(action)
            for name, value in (("state", obs["state"]), ("reward", reward), ("truncated", truncated),
                                ("final", info["final_obs"]["state"])):
                np.testing.assert_array_equal(value, value[leaders], err_msg=f"step {t} {name}")
            ends.append(info["done"].all())
        assert ends[5]  # the auto-reset happened inside the run
    finally:
        env.close()


def test_reset_groups_outside_the_copyable_tasks(monkeypatch):
    import rlplat.envs.maniskill as maniskill

    env = ManiSkillEnv(num_envs=4, **SMALL)
    try:
        monkeypatch.setattr(maniskill, "GROUP_COPY_TASKS", frozenset())
        # CPU: one scene per env, so members reset with their leader's seed start like it.
        obs = env.reset_groups(seed=[40, 41, 42, 43], group_size=2)[0]
        np.testing.assert_array_equal(obs["state"], env.reset(seed=[40, 40, 42, 42])[0]["state"])
        # GPU: a batched reset draws all scenes from one stream and the state copy could miss the
        # task's own randomisation, so it is refused, naming the task and what to do.
        monkeypatch.setattr(env, "sim_backend", "physx_cuda")
        with pytest.raises(ValueError, match="task: 'PushCube-v1' is not in envs/maniskill.py GROUP_COPY_TASKS.*"
                                             "env.sim_backend=physx_cpu"):
            env.reset_groups(seed=0, group_size=2)
    finally:
        env.close()


def test_gpu_path_restarts_every_env_from_its_leaders_state_rows():
    # No GPU here: a stand-in for the batched ManiSkill env checks what _Batched hands ManiSkill.
    from types import SimpleNamespace

    from rlplat.envs.maniskill import _Batched

    state = {"actors": {"cube": torch.arange(4.0)[:, None].repeat(1, 13)},
             "articulations": {"panda": 10 + torch.arange(4.0)[:, None].repeat(1, 31)}}
    calls = []

    def reset(options):
        calls.append(options)
        return options["reset_to_env_states"]["env_states"]["actors"]["cube"], {}

    agent = SimpleNamespace(get_proprioception=lambda: torch.zeros(4, 2))
    batched = object.__new__(_Batched)
    batched.base = SimpleNamespace(num_envs=4, device="cpu", get_state_dict=lambda: state, agent=agent)
    batched.env = SimpleNamespace(reset=lambda options: reset(options))
    batched.cameras, batched.depth = {}, False
    obs = batched.copy_starts(np.array([0, 0, 2, 2]))
    (options,) = calls
    assert options["env_idx"].tolist() == [0, 1, 2, 3]  # leaders restart too: one path for the group
    sent = options["reset_to_env_states"]["env_states"]
    assert sent["actors"]["cube"][:, 0].tolist() == [0, 0, 2, 2]
    assert sent["articulations"]["panda"][:, 0].tolist() == [10, 10, 12, 12]
    np.testing.assert_array_equal(obs["state"][:, 0], [0, 0, 2, 2])


def test_envs_per_process_must_be_positive():
    with pytest.raises(ValueError, match="envs_per_process: must be an int >= 1, got 0"):
        ManiSkillEnv(num_envs=2, **{**SMALL, "vector": "async", "envs_per_process": 0})


def test_envworker_shards_equal_one_worker():
    cfg = {"_target_": "rlplat.envs.maniskill.ManiSkillEnv", **SMALL}
    one = EnvWorker(0, 1, env_cfg=cfg, num_envs=4, num_eval_envs=2)
    shards = [EnvWorker(r, 2, env_cfg=cfg, num_envs=4, num_eval_envs=2) for r in range(2)]
    seeds = Batch({"seed": torch.arange(40, 44)})
    a = one.reset(seeds)
    b = Batch.concat([w.reset(s) for w, s in zip(shards, seeds.chunk(2))])
    torch.testing.assert_close(a["state"], b["state"], rtol=0, atol=0)
    # Across an auto-reset (episodes of 6): the new episodes continue each env's own RNG.
    for action in _actions(4, 9, seed=1):
        actions = Batch({"actions": torch.as_tensor(action)})
        a = one.step(actions)
        b = Batch.concat([w.step(x) for w, x in zip(shards, actions.chunk(2))])
        for key in ("state", "proprio", "rewards", "truncated", "success", "final/state"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for worker in [one, *shards]:
        for env in worker.envs.values():
            env.close()


def test_envworker_close_releases_its_semaphores_after_a_simulator_died(monkeypatch):
    # Ray kills a worker's child processes, its multiprocessing resource tracker among them;
    # semaphores the worker still held then were released to a relaunched tracker, which printed
    # a KeyError traceback for each (the killed-simulator test in CI). close() releases them first.
    import multiprocessing.resource_tracker as tracker

    held: set[str] = set()
    register, unregister = tracker.register, tracker.unregister

    def track(name: str, rtype: str) -> None:
        held.add(name)
        register(name, rtype)

    def untrack(name: str, rtype: str) -> None:
        held.discard(name)
        unregister(name, rtype)

    monkeypatch.setattr(tracker, "register", track)
    monkeypatch.setattr(tracker, "unregister", untrack)
    cfg = {"_target_": "rlplat.envs.maniskill.ManiSkillEnv", **SMALL, "vector": "async", "envs_per_process": 2}
    worker = EnvWorker(0, 1, env_cfg=cfg, num_envs=4, num_eval_envs=2)
    assert held  # each vector's error queue holds two locks and a semaphore (gymnasium's AsyncVectorEnv)
    worker.reset(Batch({"seed": torch.arange(4)}))
    worker.envs["train"]._sim.vec.processes[0].kill()
    try:
        worker.step(Batch({"actions": torch.zeros(4, 7)}))
    except Exception as err:  # not pytest.raises: its traceback would keep the env alive
        assert "lost its simulator process 0" in str(err), err
    else:
        raise AssertionError("stepping with a killed simulator raised nothing")
    worker.close()
    assert held == set() and worker.envs == {}
    worker.close()  # idempotent


def test_state_round_trip_continues():
    env = ManiSkillEnv(num_envs=2, **SMALL)
    env.reset(seed=5)
    actions = _actions(2, 12, seed=2)
    env.step(actions[0])
    snapshot = pickle.loads(pickle.dumps(env.get_state()))  # checkpoints pickle it
    first = [env.step(a)[0]["state"] for a in actions[1:]]
    env.set_state(snapshot)
    again = [env.step(a)[0]["state"] for a in actions[1:]]
    # Restoring replays the episode from its start (PhysX's solver caches are not part of the
    # state): exactly equal within the episode and after the auto-reset (the RNGs are restored).
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    env.close()


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="task: 'PushKube-v1' is not a registered"):
        ManiSkillEnv(num_envs=1, task="PushKube-v1")
    with pytest.raises(ValueError, match="obs_mode"):
        ManiSkillEnv(num_envs=1, obs_mode="pointcloud")
    with pytest.raises(ValueError, match="actions: expected shape"):
        env = ManiSkillEnv(num_envs=1, **SMALL)
        env.reset(seed=0)
        env.step(np.zeros((1, 8), np.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_physx_cuda_without_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="sim_backend: physx_cuda needs an NVIDIA GPU"):
        ManiSkillEnv(num_envs=2, task="PushCube-v1", sim_backend="physx_cuda")


def test_missing_vulkan_points_to_the_setup_script(tmp_path):
    icd = tmp_path / "none.json"
    icd.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "/nonexistent.so", "api_version": "1.3.0"}}')
    code = ("from rlplat.envs.maniskill import ManiSkillEnv\n"
            "ManiSkillEnv(num_envs=1, task='PushCube-v1', sim_backend='physx_cpu', vector='sync')\n")
    env = {**os.environ, "VK_ICD_FILENAMES": str(icd), "VK_DRIVER_FILES": str(icd)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "scripts/setup_system.sh" in result.stderr


def test_instruction_falls_back_to_the_task_docstring():
    assert task_instruction("PushCube-v1") == "push the cube to the red and white target"
    # Not in the table: the first sentence of the task's "Task Description", lower-cased.
    assert task_instruction("OpenCabinetDrawer-v1").startswith("use the fetch mobile manipulation robot")


def test_task_episode_limit_is_checked_once_known(ray_local, tmp_path):
    # env.max_episode_steps unset: GRPO's rollout is PushCube's own 50 steps, known only once the
    # env is built; 2 envs x 50 rows do not split into 3 minibatches.
    from rlplat.algos.base import BatchArithmeticError
    from rlplat.config import compose
    from rlplat.train import run

    cfg = compose(["policy=mlp", "env=maniskill_pushcube", "algo=grpo", "algo.group_size=2", "algo.num_minibatches=3",
                   "env.num_envs=2", "env.vector=sync", "trainer.eval_episodes=2", "logger.progress_bar=false"])
    assert cfg.env.max_episode_steps is None
    with pytest.raises(BatchArithmeticError, match=r"rollout_steps=50 = 100 rows.*num_minibatches=3"):
        run(cfg, tmp_path)


@pytest.mark.parametrize("policy,obs_mode", [("mlp", "state"), ("cnn", "rgb")])
def test_ppo_runs_through_the_platform(ray_local, tmp_path, policy, obs_mode):
    from rlplat.config import compose
    from rlplat.logging import read_metrics
    from rlplat.train import run

    cfg = compose([
        f"policy={policy}", "env=maniskill_pushcube", "algo=ppo", f"env.obs_mode={obs_mode}", "env.image_size=64",
        "env.num_envs=2", "env.max_episode_steps=8", "env.vector=sync", "algo.rollout_steps=8",
        "algo.num_minibatches=2", "trainer.total_steps=2", "trainer.eval_every=2", "trainer.eval_episodes=2",
        "trainer.checkpoint_every=2", "logger.progress_bar=false",
    ])
    final = run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["env_steps"] for r in rows if r["step"] > 0] == [16, 32]
    assert 0.0 <= final["eval/success_rate"] <= 1.0 and np.isfinite(rows[-1]["train/loss"])
    assert (tmp_path / "checkpoints/step_2/policy/model.safetensors").exists()
    assert (tmp_path / "media/episode.gif").stat().st_size > 0


@pytest.mark.parametrize("preset, task", [("maniskill_pushcube_ppo_mlp", "PushCube-v1"),
                                          ("maniskill_pickcube_ppo_mlp", "PickCube-v1")])
def test_ppo_presets_run_their_rollouts_in_the_env_worker(ray_local, tmp_path, preset, task):
    # The PPO presets (placement.rollout_in_env=true), cut to 2 iterations.
    from rlplat.config import compose
    from rlplat.logging import read_metrics
    from rlplat.train import run

    cfg = compose([
        f"experiment={preset}", "env.num_envs=4", "env.envs_per_process=2", "env.max_episode_steps=8",
        "algo.rollout_steps=8", "algo.num_minibatches=2", "trainer.total_steps=2", "trainer.eval_every=2",
        "trainer.eval_episodes=2", "trainer.checkpoint_every=2", "trainer.save_video=false", "logger.progress_bar=false",
    ])
    # PickCube takes PushCube's PPO settings; only the task (with state observations) differs.
    assert cfg.env.task == task and cfg.env.obs_mode == "state" and cfg.algo.bootstrap_at_done == "always"
    assert cfg.placement.rollout_in_env and cfg.trainer.eval_ignore_terminations
    run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["env_steps"] for r in rows] == [32, 64]
    assert all(r["perf/rollout_act_s"] > 0 and np.isfinite(r["train/value_loss"]) for r in rows)
    # Evaluation episodes run to the limit: 8 steps each, and success at the end never exceeds success at any step.
    assert rows[-1]["eval/episode_length"] == 8.0
    assert 0.0 <= rows[-1]["eval/success_at_end"] <= rows[-1]["eval/success_once"] <= 1.0
    assert all(r["train/explained_variance"] <= 1.0 or np.isnan(r["train/explained_variance"]) for r in rows)
    assert (tmp_path / "checkpoints/step_2/trainer_state.pt").exists()


# The PushCube PPO preset, small: checkpoints fall mid-episode (12-step episodes, 8-step rollouts),
# so resumed simulators must continue their episodes exactly; async, two scenes per subprocess.
FAULT_ARGS = ["experiment=maniskill_pushcube_ppo_mlp", "env.num_envs=4", "env.envs_per_process=2",
              "env.max_episode_steps=12", "algo.rollout_steps=8", "algo.num_minibatches=2", "trainer.total_steps=16",
              "trainer.eval_every=8", "trainer.eval_episodes=2", "trainer.checkpoint_every=2",
              "trainer.save_video=false", "logger.progress_bar=false", "logger.log_every=1000"]


def _train(run_dir, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlplat.train", *FAULT_ARGS, f"hydra.run.dir={run_dir}", *extra],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _deterministic(path) -> list[dict]:
    from rlplat.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "faults/"))} for r in read_metrics(path)]


def _wait_for(proc: subprocess.Popen, path, timeout: float = 300) -> None:
    import time

    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("pushcube") / "ref"
    ref = _train(run_dir)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    return _deterministic(run_dir / "metrics.jsonl")


def test_kill_9_mid_episode_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    import signal

    from rlplat.logging import read_metrics

    victim = _train(tmp_path / "run", start_new_session=True)
    _wait_for(victim, tmp_path / "run/checkpoints/step_2")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert read_metrics(tmp_path / "run/metrics.jsonl")[-1]["step"] < 16, "the run finished before it could be killed"
    resumed = _train(tmp_path / "run", "resume=true")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in out, out
    assert _deterministic(tmp_path / "run/metrics.jsonl") == uninterrupted


def test_a_killed_simulator_process_is_named_and_the_run_restarts_exactly(tmp_path, uninterrupted):
    import psutil

    victim = _train(tmp_path / "run", "trainer.max_restarts=1")
    _wait_for(victim, tmp_path / "run/checkpoints/step_4")
    env_worker = next(p for p in psutil.Process(victim.pid).children(recursive=True)
                      if "EnvWorker" in " ".join(p.cmdline()))
    # The scenes' subprocesses start from the EnvWorker's forkserver (env.context=forkserver).
    forkservers = [p for p in env_worker.children() if "forkserver" in " ".join(p.cmdline())]
    simulators = sorted((c for f in forkservers for c in f.children()), key=lambda p: (p.create_time(), p.pid))
    assert len(simulators) >= 2, env_worker.children(recursive=True)  # training (and eval) scenes
    simulators[0].kill()
    out, _ = victim.communicate(timeout=600)
    assert victim.returncode == 0, out
    assert re.search(r"EnvWorker rank 0 of 1 \(group 'env', device 0, pid \d+, training envs 0-3\) lost its simulator process "
                     r"[01] \(this shard's envs \d-\d; killed by SIGKILL\)", out), out
    assert "restart 1 of trainer.max_restarts=1" in out and "Traceback" not in out, out
    assert _deterministic(tmp_path / "run/metrics.jsonl") == uninterrupted
