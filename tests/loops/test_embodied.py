"""End-to-end runs of the controller loop on a local CPU Ray, at small sizes."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlplat.batch import Batch
from rlplat.config import compose
from rlplat.logging import read_metrics
from rlplat.loops.embodied import EnvCollector, embodied_run
from rlplat.train import run
from rlplat.validate import ConfigError, validate

# 8 envs x 10 steps per iteration, 2 minibatches, 4 eval episodes.
SMALL = [
    "experiment=toy_mlp", "env.num_envs=8", "algo.rollout_steps=10", "algo.num_minibatches=2", "trainer.eval_episodes=4",
    "logger.progress_bar=false", "policy.hidden_sizes=[32,32]",
]

# Metrics that measure time, not learning: they differ between any two runs.
def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


def test_colocated_run_writes_metrics_checkpoints_and_media(ray_local, tmp_path):
    cfg = compose([*SMALL, "trainer.total_steps=3", "trainer.eval_every=2", "trainer.checkpoint_every=2"])
    final = run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["env_steps"] for r in rows] == [80, 160, 240]
    assert "eval/success_rate" in rows[1] and "eval/success_rate" not in rows[0]
    assert 0.0 <= final["eval/success_rate"] <= 1.0 and final["train/minibatches"] > 0
    assert (tmp_path / "config.yaml").exists()
    # keep_last=2 keeps steps 2 and 3.
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_2", "step_3"]
    assert (tmp_path / "checkpoints/step_3/policy/model.safetensors").exists()
    assert (tmp_path / "media/learning_curve.png").stat().st_size > 1000
    assert (tmp_path / "media/episode.gif").stat().st_size > 0
    # The final evaluation keeps a failed and/or a successful episode, as GIF and MP4.
    kept = sorted(p.name for p in (tmp_path / "media").glob("episode_*"))
    assert kept and all(f"{p.rsplit('.', 1)[0]}.mp4" in kept for p in kept), kept


def test_disaggregated_placement_with_separate_rollout_group_syncs_weights(ray_local, tmp_path):
    # Env on device 0, rollout on device 0, actor on device 1: rollout and actor are two groups.
    cfg = compose([*SMALL, "placement=disaggregated", "placement.roles.rollout=0", "trainer.total_steps=2",
                   "trainer.eval_every=0", "trainer.save_video=false", "name=t"])
    loop = embodied_run(cfg, tmp_path)
    try:
        assert loop.rollout is not loop.actor
        before = loop.rollout.get_weights()
        loop.run()
        actor_w, rollout_w = loop.actor.get_weights(), loop.rollout.get_weights()
        assert all(torch.equal(actor_w[k], rollout_w[k]) for k in actor_w)
        assert any(not torch.equal(before[k], rollout_w[k]) for k in before)
    finally:
        loop.shutdown()


def test_disaggregated_preset_runs(ray_local, tmp_path):
    cfg = compose([*SMALL, "placement=disaggregated", "trainer.total_steps=2", "trainer.save_video=false"])
    final = run(cfg, tmp_path)
    assert final["env_steps"] == 160


def test_two_env_workers_and_two_actor_workers_match_one_of_each_for_rollouts(ray_local, tmp_path):
    # Env sharding must not change the data: same seeds -> same first-iteration episodes.
    base = [*SMALL, "trainer.total_steps=1", "trainer.save_video=false", "algo.update_epochs=1"]
    one = run(compose(base), tmp_path / "one")
    two = run(compose([*base, "placement.num_devices=2", "placement.roles.env=0-1",
                       "placement.cpus_per_device=0.5"]), tmp_path / "two")
    for key in ("train/episode_return", "train/success_rate", "eval/success_rate"):
        assert one.get(key) == pytest.approx(two.get(key)), key


def test_data_parallel_actor_workers_train(ray_local, tmp_path):
    cfg = compose([*SMALL, "placement.num_devices=2", "placement.cpus_per_device=0.5",
                   "placement.roles.env=0", "placement.roles.rollout=0-1", "placement.roles.actor=0-1",
                   "trainer.total_steps=2", "trainer.save_video=false"])
    loop = embodied_run(cfg, tmp_path)
    try:
        assert loop.actor.world_size == 2
        loop.run()
        # Averaged gradients keep the replicas identical.
        w = [loop.actor.workers[i].get_weights.remote() for i in range(2)]
        import ray

        w0, w1 = ray.get(w)
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    finally:
        loop.shutdown()


def test_grpo_runs_and_reports_groups(ray_local, tmp_path):
    small = [o for o in SMALL if not o.startswith("algo.rollout_steps")]
    cfg = compose([*small, "algo=grpo", "algo.group_size=4", "env.max_episode_steps=10",
                   "trainer.total_steps=2", "trainer.save_video=false", "algo.kl_coef=0.1"])
    final = run(cfg, tmp_path)
    assert final["env_steps"] == 2 * 8 * 10
    assert 0 <= final["train/kept_groups"] <= 2


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlplat.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# 30 iterations, a checkpoint every 3: the run the interrupted ones must reproduce.
STOP_ARGS = [*SMALL, "trainer.total_steps=30", "trainer.checkpoint_every=3", "trainer.eval_every=5",
             "trainer.save_video=false", "logger.log_every=1000"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """Deterministic metrics of STOP_ARGS run to the end without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    ref = _cli([*STOP_ARGS, f"hydra.run.dir={folder / 'ref'}"], folder)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    return [_deterministic(r) for r in read_metrics(folder / "ref/metrics.jsonl")]


def _resume_matches(run_dir: Path, cwd: Path, want: list[dict]) -> str:
    resumed = _cli([*STOP_ARGS, f"hydra.run.dir={run_dir}", "resume=true"], cwd)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    got = [_deterministic(r) for r in read_metrics(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in got] == list(range(1, 31))
    assert got == want
    return out


def _wait_for(victim: subprocess.Popen, done, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not done() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def _assert_group_gone(pid: int, timeout: float = 60) -> None:
    """The process group ``pid`` led (the driver and the Ray processes it started) ends within
    ``timeout`` seconds: Ray shut down with the run (its processes may take seconds to exit under load)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the run's group {pid} still alive {timeout:.0f} s after it exited")


def test_kill_9_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    victim = _cli([*STOP_ARGS, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, start_new_session=True)
    ckpt = tmp_path / "run/checkpoints/step_6"
    _wait_for(victim, ckpt.exists)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    victim.wait()
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert ckpt.exists() and rows[-1]["step"] < 30, "the run finished before it could be killed"
    out = _resume_matches(tmp_path / "run", tmp_path, uninterrupted)
    assert "resumed from" in out


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-driver", "sigint-process-group"])
def test_stop_signal_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted, sig, to_group):
    # SIGTERM to the driver (what a scheduler sends); SIGINT to the whole group (Ctrl-C in a terminal).
    run_dir = tmp_path / "run"
    victim = _cli([*STOP_ARGS, f"hydra.run.dir={run_dir}"], tmp_path, start_new_session=True)
    _wait_for(victim, lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir / "metrics.jsonl")) >= 4)
    (os.killpg if to_group else os.kill)(victim.pid, sig)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 128 + sig, out
    assert "Traceback" not in out, out
    stopped_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert 4 <= stopped_at < 30, out
    # A checkpoint of the step it stopped after (not only the last periodic one), and the command to resume.
    assert (run_dir / f"checkpoints/step_{stopped_at}").is_dir(), out
    assert f"stopped after step {stopped_at}" in out
    assert f"resume with: rlplat-train {shlex.join(STOP_ARGS)} hydra.run.dir={run_dir} resume=true" in out, out
    _assert_group_gone(victim.pid)  # Ray shut down: nothing of the run's process group is left
    if sig == signal.SIGTERM:  # the same checkpoint path for both signals: one exact-resume check
        _resume_matches(run_dir, tmp_path, uninterrupted)


def test_a_second_signal_exits_at_once_without_traceback(tmp_path):
    run_dir = tmp_path / "run"
    victim = _cli([*STOP_ARGS, f"hydra.run.dir={run_dir}"], tmp_path, start_new_session=True)
    _wait_for(victim, lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir / "metrics.jsonl")) >= 2)
    os.kill(victim.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(victim.pid, signal.SIGINT)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 130, out
    assert "SIGINT again: exiting at once" in out and "Traceback" not in out, out
    _assert_group_gone(victim.pid)  # Ray shut down here too


# STOP_ARGS on two env workers (envs 0-3 and 4-7).
TWO_ENV_WORKERS = ["placement.num_devices=2", "placement.roles.env=0-1", "placement.cpus_per_device=0.5"]


@pytest.fixture(scope="module")
def uninterrupted_two_env_workers(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("uninterrupted2")
    ref = _cli([*STOP_ARGS, *TWO_ENV_WORKERS, f"hydra.run.dir={folder / 'ref'}"], folder)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    return [_deterministic(r) for r in read_metrics(folder / "ref/metrics.jsonl")]


def _kill_an_env_worker(victim: subprocess.Popen) -> int:
    """SIGKILL one of the run's two EnvWorker processes; returns its pid."""
    import psutil

    workers = [p for p in psutil.Process(victim.pid).children(recursive=True)
               if "EnvWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[-1].kill()
    return workers[-1].pid


def test_without_restarts_a_dead_worker_stops_the_run_with_the_resume_command(tmp_path):
    from types import SimpleNamespace

    from rlplat.runtime.worker_group import WorkerDied
    from rlplat.train import run_restarting

    group = SimpleNamespace(name="env", worker_cls=SimpleNamespace(__name__="EnvWorker"), world_size=2,
                            devices=[0, 1], pids=[11, 12], labels=["training envs 0-3", "training envs 4-7"])
    builds = []

    def build(cfg, run_dir, algo):
        builds.append(run_dir)
        raise WorkerDied(group, 1, "died: SYSTEM_ERROR: killed")

    cfg = compose([*SMALL, "trainer.max_restarts=0"])
    with pytest.raises(SystemExit) as exit_info:
        run_restarting(cfg, tmp_path, build, SimpleNamespace(algo=None, resume_from=None))
    message = str(exit_info.value.code)
    assert message.startswith("error: EnvWorker rank 1 of 2 (group 'env', device 1, pid 12, training envs 4-7) "
                              "died: SYSTEM_ERROR: killed"), message
    assert f"hydra.run.dir={tmp_path.resolve()} resume=true" in message and "trainer.max_restarts=N" in message
    assert len(builds) == 1


def test_a_dead_env_worker_is_named_and_restarted_from_the_last_checkpoint(tmp_path, uninterrupted_two_env_workers):
    max_restarts = 1
    run_dir = tmp_path / "run"
    victim = _cli([*STOP_ARGS, *TWO_ENV_WORKERS, f"trainer.max_restarts={max_restarts}", f"hydra.run.dir={run_dir}"],
                  tmp_path, start_new_session=True)
    _wait_for(victim, (run_dir / "checkpoints/step_6").exists)
    pid = _kill_an_env_worker(victim)
    out, _ = victim.communicate(timeout=400)
    # The message names the worker that was killed: its rank, device, pid and envs.
    named = re.search(rf"EnvWorker rank (\d) of 2 \(group 'env', device (\d), pid {pid}, training envs (\d)-(\d)\) "
                      rf"died: ", out)
    assert named, out
    rank = int(named.group(1))
    assert int(named.group(2)) == rank and named.group(3, 4) == (("0", "3"), ("4", "7"))[rank]
    assert "Traceback" not in out, out
    assert victim.returncode == 0, out
    assert "restart 1 of trainer.max_restarts=1" in out, out
    rows = read_metrics(run_dir / "metrics.jsonl")
    # From the restored checkpoint on, the run is the uninterrupted one; the restart is counted.
    assert [r["step"] for r in rows] == list(range(1, 31))
    restored = next(r["step"] for r in rows if "faults/restarts" in r) - 1
    assert restored >= 6 and all(r["faults/restarts"] == 1 for r in rows[restored:])
    got = [{k: v for k, v in _deterministic(r).items() if k != "faults/restarts"} for r in rows]
    assert got == uninterrupted_two_env_workers


# Tiny OpenVLA on the toy env's camera: 4 envs x 5 steps per iteration, 2 eval episodes.
VLA_SMALL = [
    "experiment=vla_toy_sft", "algo=ppo", "policy.value_head=true", "env.num_envs=4",
    "algo.rollout_steps=5", "algo.num_minibatches=2", "trainer.eval_episodes=2", "trainer.save_video=false",
    "logger.progress_bar=false",
]


def test_openvla_sft_warm_start_then_ppo_from_it(ray_local, tmp_path):
    from rlplat.policies.openvla import load

    cfg = compose([*VLA_SMALL, f"policy.cache_dir={tmp_path / 'cache'}", "trainer.total_steps=2",
                   "algo.critic_warmup_steps=1", "warm_start.steps=2", "warm_start.algo.rollout_steps=5",
                   "warm_start.algo.num_minibatches=2"])
    final = run(cfg, tmp_path / "run")
    warm = read_metrics(tmp_path / "run/warm_start/metrics.jsonl")
    assert [r["step"] for r in warm] == [1, 2]
    assert all(r["train/nll_per_token"] > 0 and r["train/success_rate"] >= 0 for r in warm)
    assert "eval/success_rate" in warm[-1]
    # The SFT export carries the demo statistics in OpenVLA's format; PPO started from it.
    pretrained = tmp_path / "run/warm_start/checkpoints/step_2/policy/pretrained"
    stats = json.loads((pretrained / "dataset_statistics.json").read_text())
    (key,) = stats
    assert len(stats[key]["action"]["q01"]) == 2 and stats[key]["action"]["mask"] == [True, True]
    saved = OmegaConf.load(tmp_path / "run/config.yaml")
    assert saved.policy.init_from is None  # the user's config; the warm start fills it at run time
    ppo = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in ppo] == [1, 2] and "train/value_loss" in ppo[0]
    assert 0.0 <= final["eval/success_rate"] <= 1.0
    # The final PPO checkpoint loads with the public loader and keeps the SFT statistics.
    model, processor, tokenizer, loaded = load(tmp_path / "run")
    assert loaded == stats and tokenizer.n_bins == 256
    inputs = processor(np.zeros((1, 32, 32, 3), np.uint8), ["reach the red square"])
    tokens, _ = model.generate_actions(**inputs, action_tokenizer=tokenizer)
    low, high = tokenizer.action_token_range
    assert tokens.shape == (1, 2) and bool(((tokens >= low) & (tokens <= high)).all())


def test_ppo_without_a_value_head_fails_before_ray_starts(tmp_path):
    cfg = compose([*VLA_SMALL, "policy.value_head=false", "trainer.total_steps=1"])
    with pytest.raises(SystemExit, match="policy.value_head=false.*algo=grpo"):
        run(cfg, tmp_path)
    no_rollout_steps = [o for o in VLA_SMALL if not o.startswith("algo.rollout_steps")]
    grpo = compose([*no_rollout_steps, "algo=grpo", "policy.value_head=false", "algo.group_size=2",
                    "env.max_episode_steps=5"])
    from rlplat.loops.embodied import check_config

    assert not check_config(grpo).needs_value
    with pytest.raises(ConfigError, match=r"trainer.eval_num_envs=0 must be >= 1"):
        validate(compose([*SMALL, "trainer.eval_num_envs=0"]), tmp_path)


def test_eval_at_start_logs_the_loaded_policy_as_step_0(ray_local, tmp_path):
    cfg = compose([*SMALL, "trainer.total_steps=1", "trainer.eval_at_start=true", "trainer.save_video=false"])
    run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["env_steps"] == 0 and 0.0 <= rows[0]["eval/success_rate"] <= 1.0
    assert "train/loss" not in rows[0] and "eval/success_rate" in rows[1]


def test_evaluation_in_rounds_equals_one_round(ray_local, tmp_path):
    # 7 episodes on 3 eval envs (rounds of 3, 3, 1) give the same per-episode results as 7 envs at
    # once: every episode is fixed by its seed. The policy is untrained (deterministic actions).
    # The default (null) is min(eval_episodes, env.num_envs) = min(7, 8).
    results = {}
    for eval_envs, expected in (("null", 7), ("3", 3)):
        cfg = compose([*SMALL, "trainer.eval_episodes=7", f"trainer.eval_num_envs={eval_envs}",
                       "trainer.eval_seed_start=100", "trainer.save_video=false"])
        loop = embodied_run(cfg, tmp_path / eval_envs)
        try:
            assert loop.collector.num_eval_envs == expected
            results[expected] = loop.collector.evaluate(video_path=tmp_path / f"{expected}.gif")
        finally:
            loop.shutdown()
    assert results[3] == pytest.approx(results[7], abs=1e-5)
    assert results[7]["eval/episode_return"] != 0  # not a comparison of two empty evaluations
    assert (tmp_path / "3.gif").stat().st_size > 0


def test_pipelined_rollout_keeps_rows_aligned(ray_local, tmp_path):
    # Two env stages on device 0, the policy on device 1: stage k simulates while the policy acts
    # for the other stage. The interleaving must not mix rows: in the toy task the gripper moves
    # by exactly 0.1 * clip(action) per step, so obs[t+1] follows from obs[t] and action[t].
    cfg = compose([*SMALL, "placement=pipelined", "trainer.total_steps=1", "trainer.save_video=false"])
    loop = embodied_run(cfg, tmp_path)
    try:
        assert loop.collector.pipelined and loop.collector.envs.stages == 2
        batch, _ = loop.collector.collect_rollout()
        t, n = loop.collector.num_steps, loop.collector.num_envs
        state = batch["state"].reshape(t, n, -1)[..., :2]
        actions = batch["actions"].reshape(t, n, -1)
        done = (batch["terminated"] | batch["truncated"]).reshape(t, n)
        expected = (state[:-1] + 0.1 * actions[:-1].clamp(-1, 1)).clamp(-1, 1)
        torch.testing.assert_close(state[1:][~done[:-1]], expected[~done[:-1]], rtol=0, atol=1e-5)
        # The next rollout starts where this one stopped, on every stage.
        assert loop.collector.obs["state"].shape == (n, batch["state"].shape[-1])
        second, _ = loop.collector.collect_rollout()
        last = (state[-1] + 0.1 * actions[-1].clamp(-1, 1)).clamp(-1, 1)
        first_next = second["state"].reshape(t, n, -1)[0, :, :2]
        torch.testing.assert_close(first_next[~done[-1]], last[~done[-1]], rtol=0, atol=1e-5)
    finally:
        loop.shutdown()


def test_env_stages_equal_one_env_group(ray_local):
    from rlplat.runtime.worker_group import WorkerGroup
    from rlplat.workers.env import EnvStages, EnvWorker

    env_cfg = {"_target_": "rlplat.envs.toy.ToyReachEnv", "obs_mode": "state", "max_episode_steps": 7}

    def make(stages: int) -> EnvStages:
        return EnvStages(lambda sizes, name: WorkerGroup(EnvWorker, [0], share=0.25, name=name,
                                                         init_kwargs={"env_cfg": env_cfg, **sizes}),
                         stages, num_envs=6, num_eval_envs=2)

    one, two = make(1), make(2)
    try:
        seeds = Batch({"seed": torch.arange(50, 56)})
        torch.testing.assert_close(one.reset(seeds)["state"], two.reset(seeds)["state"])
        rng = np.random.default_rng(0)
        for _ in range(10):
            actions = Batch({"actions": torch.as_tensor(rng.uniform(-1, 1, (6, 2)), dtype=torch.float32)})
            a = one.step(actions)
            calls = [two.step_async(k, piece) for k, piece in enumerate(two.stage_rows(actions))]
            b = Batch.concat([c.get() for c in calls])
            for key in ("state", "rewards", "truncated", "final/state"):
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        assert len(two.get_state()) == 2
        with pytest.raises(ValueError, match="pipeline_stages=3"):
            make(3)  # num_eval_envs=2 < 3 stages
    finally:
        one.shutdown()
        two.shutdown()


def _local_policy(loop):
    """The actor's current policy, rebuilt in this process."""
    from hydra.utils import instantiate

    spec = loop.collector.envs.spec()
    policy = instantiate(OmegaConf.to_container(loop.cfg.policy, resolve=True),
                         observation_space=spec["observation_space"], action_space=spec["action_space"])
    policy.load_trainable_state_dict(loop.actor.get_weights())
    return policy.eval()


def test_rollout_in_env_acts_with_the_actors_weights_and_keeps_rows_aligned(ray_local, tmp_path):
    # The env workers' replicas act; what they record must be the actor's policy (log-probs and
    # values of the recorded actions under the actor's weights), before and after an update.
    cfg = compose([*SMALL, "placement.rollout_in_env=true", "placement.num_devices=2", "placement.roles.env=0-1",
                   "placement.cpus_per_device=0.5", "trainer.total_steps=1", "trainer.save_video=false"])
    loop = embodied_run(cfg, tmp_path)
    try:
        assert loop.collector.rollout_in_env and loop.collector.envs.groups[0].world_size == 2
        for iteration in (1, 2):
            batch, metrics = loop.collector.collect_rollout()
            assert len(batch) == loop.collector.num_steps * loop.collector.num_envs
            assert metrics["perf/rollout_act_s"] > 0 and metrics["perf/rollout_env_s"] > 0
            with torch.no_grad():
                ev = _local_policy(loop).evaluate_actions(batch, batch["actions"], {})
            torch.testing.assert_close(ev.logprobs, batch["logprobs"], rtol=0, atol=1e-4)
            torch.testing.assert_close(ev.values, batch["values"], rtol=0, atol=1e-4)
            # Bootstrap values only where an episode ended (the toy truncates at 50 steps).
            ended = batch["terminated"] | batch["truncated"]
            assert bool((batch["final_values"][~ended] == 0).all())
            t, n = loop.collector.num_steps, loop.collector.num_envs
            state, actions = batch["state"].reshape(t, n, -1)[..., :2], batch["actions"].reshape(t, n, -1)
            done = (batch["terminated"] | batch["truncated"]).reshape(t, n)
            expected = (state[:-1] + 0.1 * actions[:-1].clamp(-1, 1)).clamp(-1, 1)
            torch.testing.assert_close(state[1:][~done[:-1]], expected[~done[:-1]], rtol=0, atol=1e-5)
            if iteration == 1:
                before = loop.actor.get_weights()
                loop.update(loop.algo.compute_advantages(batch, t, n), 1)
                loop.sync_weights()
                assert any(not torch.equal(before[k], w) for k, w in loop.actor.get_weights().items())
    finally:
        loop.shutdown()


def test_rollout_in_env_resumes_exactly(ray_local, tmp_path):
    # The replicas' sampling RNG travels with the env states: a run resumed from step 2 draws the
    # same actions as the uninterrupted one.
    args = [*SMALL, "placement.rollout_in_env=true", "trainer.total_steps=4", "trainer.checkpoint_every=2",
            "trainer.eval_every=0", "trainer.save_video=false"]
    run(compose(args), tmp_path / "ref")
    run(compose([*args, f"resume={tmp_path / 'ref/checkpoints/step_2'}"]), tmp_path / "resumed")
    want = [_deterministic(r) for r in read_metrics(tmp_path / "ref/metrics.jsonl")]
    got = [_deterministic(r) for r in read_metrics(tmp_path / "resumed/metrics.jsonl")]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == want
    # Resuming with the other setting is refused: the states do not carry the same parts.
    with pytest.raises(ValueError, match="rollout_in_env=True; resume with the same setting"):
        run(compose([*args, "placement.rollout_in_env=false", f"resume={tmp_path / 'ref/checkpoints/step_2'}"]),
            tmp_path / "other")


def test_rollout_in_env_refuses_pipelines_and_expert_rollouts():
    from rlplat.loops.embodied import check_config

    with pytest.raises(ValueError, match="set placement.pipeline_stages=1 or placement.rollout_in_env=false"):
        check_config(compose([*SMALL, "placement=pipelined", "placement.rollout_in_env=true"]))
    with pytest.raises(ValueError, match="scripted expert, not the policy: set placement.rollout_in_env=false"):
        check_config(compose(["experiment=vla_toy_sft", "placement.rollout_in_env=true"]))


def test_rollout_in_env_with_one_env_worker_equals_the_controller_path(ray_local, tmp_path):
    # One env worker's replica is seeded like the colocated rollout worker (rank 0) and an MLP
    # update draws nothing from the global RNG, so the two paths sample the same actions.
    args = [*SMALL, "trainer.total_steps=3", "trainer.eval_every=3", "trainer.save_video=false"]
    run(compose(args), tmp_path / "controller")
    run(compose([*args, "placement.rollout_in_env=true"]), tmp_path / "in_env")
    want = [_deterministic(r) for r in read_metrics(tmp_path / "controller/metrics.jsonl")]
    got = [_deterministic(r) for r in read_metrics(tmp_path / "in_env/metrics.jsonl")]
    assert got == want and "train/pg_loss" in got[-1]


class _ReachThenLeave:
    """Greedy scripted policy on the toy task: heads for the target, and from step ``leave_at`` on
    the rows in ``leave`` head away from it again (towards and past the arena's centre)."""

    def __init__(self, leave: list[int], leave_at: int) -> None:
        self.leave, self.leave_at, self.t = leave, leave_at, 0

    def act(self, obs: Batch, deterministic: bool = True) -> Batch:
        state, gripper = obs["state"].double(), obs["proprio"][:, :2].double()
        offset = state[:, -2:]  # target - gripper (the toy state's last two columns)
        actions = offset / 0.1 / (offset.abs().amax(dim=1, keepdim=True) / 0.1).clamp(min=1.0)
        if self.t >= self.leave_at:
            target = gripper + offset
            away = -target / target.norm(dim=1, keepdim=True).clamp(min=1e-6)
            actions[self.leave] = away[self.leave]
        self.t += 1
        return Batch({"actions": actions.float()})


@pytest.mark.parametrize("ignore_terminations", [True, False])
def test_success_once_and_success_at_end_on_scripted_episodes(ignore_terminations):
    # No Ray: the evaluation round runs on an EnvWorker object and a scripted policy directly.
    from rlplat.workers.env import EnvWorker

    worker = EnvWorker(env_cfg={"_target_": "rlplat.envs.toy.ToyReachEnv", "num_objects": 1, "max_episode_steps": 40},
                       num_envs=1, num_eval_envs=2, include_final_obs=False,
                       eval_ignore_terminations=ignore_terminations)
    loop = EnvCollector.__new__(EnvCollector)
    loop.envs, loop.rollout = worker, _ReachThenLeave(leave=[0], leave_at=25)
    loop.num_eval_envs, loop.max_episode_steps, loop.obs_keys = 2, 40, worker.obs_keys
    once, at_end, returns, lengths, tasks = loop._eval_round(np.array([3, 4]), None)
    assert tasks is None
    if ignore_terminations:
        # Both reach the target; env 0 then leaves it, env 1 stays: only env 1 succeeds at the end.
        assert once.tolist() == [1.0, 1.0] and at_end.tolist() == [0.0, 1.0]
        assert lengths.tolist() == [40.0, 40.0]
    else:
        # Success ends the episode before anyone leaves: at any step and at the end agree.
        assert once.tolist() == [1.0, 1.0] and at_end.tolist() == [1.0, 1.0]
        assert bool((lengths < 25).all())
