"""Embodied RL: the collector of env <-> policy rollouts (with advantages) and its evaluation.

The run itself (update, weight sync, checkpoints, logging) is the shared skeleton
(``rlplat.loops.skeleton.Run``); this module says how an iteration's batch comes from simulator
shards and the rollout policy, and how the policy is evaluated on fixed-seed episodes. The heavy
state lives in Ray worker groups (env shards, the policy for rollout, the policy for training).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rlplat import checkpoint, registry
from rlplat.algos.base import Algorithm
from rlplat.batch import Batch
from rlplat.logging import METRICS_FILE, annotate_episode, plot_learning_curve, save_video, say
from rlplat.loops.skeleton import Collector, PolicyWorkers, Run
from rlplat.policies.base import compute_stats
from rlplat.runtime.placement import Placement, parse_devices
from rlplat.runtime.worker_group import WorkerGroup
from rlplat.workers.env import EPISODE_KEYS, EnvStages, EnvWorker, final_values
from rlplat.workers.policy import PolicyWorker

log = logging.getLogger(__name__)


#: Episodes of the first evaluation round recorded for the final videos (one success and one
#: failure among them are kept).
VIDEO_EPISODES = 4


def _instruction(obs: Batch, i: int) -> str | None:
    """Env ``i``'s instruction in a batch of observations (None: the env gives none)."""
    if "instruction" not in obs:
        return None
    value = obs["instruction"]
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    return str(items[i])


def check_config(cfg: DictConfig, max_episode_steps: int | None = None) -> Algorithm:
    """Builds the algorithm and checks the batch arithmetic before anything starts.

    With ``env.max_episode_steps=null`` (the simulator's own limit) the arithmetic that depends
    on the episode length waits for ``max_episode_steps``, which the loop passes once the env
    reports it.
    """
    algo: Algorithm = instantiate(cfg.algo, _convert_="all")
    roles = cfg.placement.roles
    for role in ("env", "rollout", "actor"):
        if role not in roles:
            raise ValueError(f"placement.roles has no {role!r}: add placement.roles.{role}=<devices>")
    part = registry.part_for("policy", cfg.policy._target_)
    if part is not None and part.contract == "DiffusionPolicy":
        raise ValueError(f"policy={part.name} makes images; env runs need an action policy (policy=mlp, cnn, "
                         f"openvla_tiny, ...), or run it with a preference source instead of an env")
    registry.preflight("policy", cfg.policy)
    if algo.needs_value and OmegaConf.select(cfg, "policy.value_head") is False:
        raise ValueError(
            f"{type(algo).__name__} trains a critic but policy.value_head=false; set policy.value_head=true "
            f"or pick an algorithm without one (algo=grpo)"
        )
    if cfg.placement.get("rollout_in_env"):
        if int(cfg.placement.get("pipeline_stages", 1)) > 1:
            raise ValueError("placement.rollout_in_env=true runs the policy inside the env workers, so there is "
                             "no inference to overlap with simulation: set placement.pipeline_stages=1 or "
                             "placement.rollout_in_env=false")
        if algo.uses_expert:
            raise ValueError(f"{type(algo).__name__} rolls out the env's scripted expert, not the policy: "
                             "set placement.rollout_in_env=false")
    check_batch(algo, cfg, max_episode_steps)
    return algo


def check_batch(algo: Algorithm, cfg: DictConfig, max_episode_steps: int | None) -> None:
    """The algorithm's batch arithmetic for ``cfg``'s envs and workers (``max_episode_steps``:
    the env's own limit when ``env.max_episode_steps`` is null, None while unknown)."""
    roles = cfg.placement.roles
    algo.check(
        num_envs=cfg.env.num_envs,
        max_episode_steps=cfg.env.max_episode_steps if cfg.env.max_episode_steps is not None else max_episode_steps,
        num_env_workers=len(parse_devices(roles.env)) * int(cfg.placement.get("pipeline_stages", 1)),
        num_actor_workers=len(parse_devices(roles.actor)),
    )


def eval_seeds(seed: int, episodes: int, start: int | None = None) -> np.ndarray:
    """The seeds of a run's evaluation episodes: ``start, start + 1, ...`` when
    ``trainer.eval_seed_start`` is set, else drawn from the run's ``seed`` (the same every
    evaluation). ``rlplat-deploy``'s simulator dry runs use the same rule, so they play the same
    episodes."""
    if start is None:
        return np.random.default_rng([seed, 1]).integers(0, 2**31 - 1, size=episodes)
    return np.arange(int(start), int(start) + episodes)


class EnvCollector(Collector):
    """Rollouts of an ActionPolicy on VectorEnv shards, advantages by the Algorithm."""

    progress_key = "env_steps"

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: Algorithm) -> None:
        super().__init__(cfg, run_dir, algo)
        self.num_envs = cfg.env.num_envs
        # The env workers hold policy replicas and run rollouts themselves (no expert rollouts).
        self.rollout_in_env = bool(cfg.placement.get("rollout_in_env", False))
        self.envs: EnvStages | None = None
        self.obs: Batch | None = None
        # Seconds the controller waited for actions and for env steps in the last rollout.
        self._waits = {"act": 0.0, "env": 0.0}
        self._rollout_s = float("nan")
        # Action statistics computed from demonstrations (SFT), once per run.
        self.action_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the collector contract
    def collect(self, step: int) -> tuple[Batch, dict[str, Any]]:
        t0 = time.perf_counter()
        batch, metrics = self.collect_rollout()
        self._rollout_s = time.perf_counter() - t0
        return self.algo.compute_advantages(batch, self.num_steps, self.num_envs), metrics

    def batch_metrics(self, batch: Batch) -> dict[str, float]:
        metrics = {f"train/{key}": float(batch.meta[key]) for key in ("valid_rows", "kept_groups", "outcome_mean")
                   if key in batch.meta}
        # The algorithm's view of the rollout before the update (e.g. PPO's explained variance).
        return metrics | {f"train/{key}": float(value) for key, value in batch.meta.get("diagnostics", {}).items()}

    def has_signal(self, batch: Batch) -> bool:
        # GRPO drops groups whose outcomes are all equal; none left means nothing to learn from.
        return batch.meta.get("valid_rows", 1) != 0

    def progress(self, step: int, iteration_s: float) -> dict[str, float]:
        return {"env_steps": step * self.num_envs * self.num_steps,
                "perf/env_steps_per_s": self.num_envs * self.num_steps / self._rollout_s}

    def weight_receivers(self) -> list[Any]:
        return [self.envs] if self.rollout_in_env else []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "env_states": self.envs.get_state(), "obs": self.obs,
                "action_stats": self.action_stats}

    def load_policy(self, folder: Path) -> None:
        if self.rollout_in_env:
            self.envs.load_policy(str(Path(folder) / checkpoint.POLICY))

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        self.envs.set_state(state["env_states"])
        self.obs = state["obs"]
        self.action_stats = state.get("action_stats")
        super().load_state_dict(state, folder)

    # ------------------------------------------------------------------ rollouts
    def collect_rollout(self) -> tuple[Batch, dict[str, float]]:
        """Runs ``num_steps`` env steps on every env; returns the time-major rollout batch."""
        if self.algo.episodic or self.obs is None:
            seeds = self.algo.reset_seeds(self.num_envs, self.rng) or self._fresh_seeds()
            # Episodic algorithms with groups (GRPO) need each group to start from one state.
            group_size = self.algo.cfg.get("group_size") if self.algo.episodic else None
            self.obs = self.envs.reset(Batch({"seed": torch.tensor(seeds)}), group_size=group_size)
        records, ended = [], torch.zeros(self.num_envs, dtype=torch.bool)
        returns, lengths, successes = [], [], []
        self._waits = {"act": 0.0, "env": 0.0}
        if self.rollout_in_env:
            transitions = self._steps_in_env()
        else:
            transitions = self._pipelined_steps() if self.pipelined else self._steps()
        for obs, out, result in transitions:
            record = obs.select(*self.obs_keys)
            record.update(out)
            record.update(result.select(*EPISODE_KEYS))
            done = result["terminated"] | result["truncated"]
            if self.algo.needs_final_values:
                # The env workers' replicas computed them already under rollout_in_env.
                record["final_values"] = (result["final_values"] if "final_values" in result
                                          else final_values(result, self.obs_keys, self.rollout.value))
            # Episodic algorithms score each env's first episode only.
            counted = done & ~ended if self.algo.episodic else done
            returns.append(result["episode_return"][counted])
            lengths.append(result["episode_length"][counted].float())
            successes.append(result["success"][counted].float())
            ended |= done
            records.append(record)
        batch = Batch.concat(records)
        if self.algo.uses_expert and self.algo.cfg.get("compute_action_stats") and self.action_stats is None:
            self.set_action_stats(batch["actions"].numpy())
        if self.algo.needs_value:
            batch.meta["last_values"] = self.rollout.value(self.obs)["values"]
        stats = {k: torch.cat(v) for k, v in (("return", returns), ("length", lengths), ("success", successes))}
        metrics = {"train/episodes": float(len(stats["return"])),
                   "perf/rollout_act_s": self._waits["act"], "perf/rollout_env_s": self._waits["env"]}
        if len(stats["return"]):
            metrics |= {
                "train/episode_return": float(stats["return"].mean()),
                "train/episode_length": float(stats["length"].mean()),
                "train/success_rate": float(stats["success"].mean()),
            }
        return batch, metrics

    def _steps(self) -> Iterator[tuple[Batch, Batch, Batch]]:
        """``num_steps`` times: act on every env, step every env; yields (obs, policy out, result).

        ``self._waits`` adds up the controller's time waiting for actions and for env steps."""
        for _ in range(self.num_steps):
            t0 = time.perf_counter()
            if self.algo.uses_expert:
                out, executed = self._expert_step()
            else:
                out = self.rollout.act(self.obs, deterministic=False)
                executed = out.select("actions")
            t1 = time.perf_counter()
            result = self.envs.step(executed)
            self._waits["act"] += t1 - t0
            self._waits["env"] += time.perf_counter() - t1
            yield self.obs, out, result
            self.obs = result.select(*self.obs_keys)

    def _steps_in_env(self) -> Iterator[tuple[Batch, Batch, Batch]]:
        """Like ``_steps``, with the policy replicas in the env workers acting
        (placement.rollout_in_env): one call per rollout instead of two per step. ``act`` counts
        the slowest worker's time in its replica, ``env`` the rest of the call."""
        t0 = time.perf_counter()
        steps, obs, act_s = self.envs.rollout(self.obs, self.num_steps)
        self._waits["act"] += act_s
        self._waits["env"] += time.perf_counter() - t0 - act_s
        yield from steps
        self.obs = obs

    def _pipelined_steps(self) -> Iterator[tuple[Batch, Batch, Batch]]:
        """Like ``_steps``, with the envs in K stages: while stage k simulates, the policy acts for
        stage k+1, so simulation and inference overlap (placement.pipeline_stages). ``env`` waits
        count only the time no action was being computed."""
        stages = self.envs.stages
        obs = self.envs.stage_rows(self.obs)
        outs: list[Batch | None] = [None] * stages
        calls: list[Any] = [None] * stages
        for t in range(self.num_steps + 1):
            done_step = []
            for k in range(stages):
                if t > 0:
                    t0 = time.perf_counter()
                    result = calls[k].get()
                    self._waits["env"] += time.perf_counter() - t0
                    done_step.append((obs[k], outs[k], result))
                    obs[k] = result.select(*self.obs_keys)
                if t < self.num_steps:
                    t0 = time.perf_counter()
                    outs[k] = self.rollout.act(obs[k], deterministic=False)
                    self._waits["act"] += time.perf_counter() - t0
                    calls[k] = self.envs.step_async(k, outs[k].select("actions"))
            if t > 0:
                yield tuple(Batch.concat(list(parts)) for parts in zip(*done_step))
        self.obs = Batch.concat(obs)

    def _expert_step(self) -> tuple[Batch, Batch]:
        """The expert's clean actions (the labels) and the noisy ones the envs execute."""
        label = Batch.concat(self.envs.expert_actions(noise=0.0))
        noise = float(self.algo.cfg.get("expert_noise", 0.0))
        executed = Batch.concat(self.envs.expert_actions(noise=noise)) if noise > 0 else label
        return label, executed

    def set_action_stats(self, actions: np.ndarray) -> None:
        """Computes q01/q99 statistics of demonstrated actions and hands them to every policy group."""
        key = self.algo.cfg.get("stats_key") or self.cfg.env._target_.rsplit(".", 1)[-1].lower()
        self.action_stats = {"key": key, "stats": compute_stats(actions)}
        for group in self.policy_groups:
            group.set_action_stats(self.action_stats["stats"], key)
        if self.rollout_in_env:
            self.envs.set_action_stats(self.action_stats["stats"], key)

    def evaluate(self, step: int = 0, last: bool = False, video_path: Path | None = None) -> dict[str, float]:
        """Deterministic policy on ``trainer.eval_episodes`` fixed-seed episodes.

        The final evaluation (``last``) saves episode videos unless ``trainer.save_video=false``
        (``video_path`` asks for them at any evaluation): the first round's first
        ``VIDEO_EPISODES`` episodes are recorded, and one that succeeded and one that failed are
        kept when both exist (``episode_success`` / ``episode_failure``, GIF and MP4, playing at
        the env's control rate), the successful one also as ``episode.gif``.

        The episodes run in rounds of ``eval_num_envs`` (one episode per eval env per round);
        every episode is fixed by its seed, so the result does not depend on the round size.
        ``eval/success_once`` counts episodes that succeeded at any step, ``eval/success_at_end``
        those that were successful at their last step (with ``trainer.eval_ignore_terminations``
        the episodes run to the limit, so this asks whether the policy *stays* at the goal);
        ``eval/success_rate``, the headline, is ``success_once``.
        """
        if video_path is None and last and self.cfg.trainer.save_video:
            video_path = self._media("episode.gif")
        n = self.cfg.trainer.eval_episodes
        seeds = eval_seeds(self.cfg.seed, n, self.cfg.trainer.get("eval_seed_start"))
        rounds = [self._eval_round(seeds[i:i + self.num_eval_envs], video_path if i == 0 else None)
                  for i in range(0, n, self.num_eval_envs)]
        once, at_end, returns, lengths, tasks = (torch.cat(parts) if parts[0] is not None else None
                                                 for parts in zip(*rounds))
        metrics = {
            "eval/success_rate": float(once.mean()),
            "eval/success_once": float(once.mean()),
            "eval/success_at_end": float(at_end.mean()),
            "eval/episode_return": float(returns.mean()),
            "eval/episode_length": float(lengths.mean()),
        }
        # Multi-task envs (LIBERO) tag episodes with their task: success is also reported per task.
        if tasks is not None:
            for task in sorted(set(tasks.tolist())):
                metrics[f"eval/success_task_{task}"] = float(once[tasks == task].mean())
        return metrics

    def _eval_round(self, seeds: np.ndarray, video_path: Path | None) -> tuple[torch.Tensor, ...]:
        """One episode on each of the first ``len(seeds)`` eval envs; returns per-episode
        (success at any step, success at the last step, return, length, task index or None).
        Eval envs beyond ``len(seeds)`` (the last round) run an episode of the next seeds that is
        not counted."""
        n, spare = len(seeds), self.num_eval_envs - len(seeds)
        padded = np.concatenate([seeds, seeds[-1] + 1 + np.arange(spare)]) if spare else seeds
        obs = self.envs.reset(Batch({"seed": torch.tensor(padded)}), split="eval")
        tasks = obs["task_index"][:n].clone() if "task_index" in obs else None
        ended = torch.zeros(self.num_eval_envs, dtype=torch.bool)
        ended[n:] = True
        once, at_end, returns = torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.zeros(n)
        lengths = torch.full((n,), float(self.max_episode_steps))
        recorded = min(VIDEO_EPISODES, n, self.spec.get("eval_envs", 1)) if video_path else 0
        frames = [[self.envs.render(split="eval", index=i)] for i in range(recorded)]
        solved = [[False] for _ in range(recorded)]
        instructions = [_instruction(obs, i) for i in range(recorded)]
        for _ in range(self.max_episode_steps):
            out = self.rollout.act(obs, deterministic=True)
            result = self.envs.step(out.select("actions"), split="eval")
            success = result["success"][:n]
            once |= success & ~ended[:n]
            new = ((result["terminated"] | result["truncated"]) & ~ended)[:n]
            at_end[new] = success[new].float()
            returns[new] = result["episode_return"][:n][new]
            lengths[new] = result["episode_length"][:n][new].float()
            # An env auto-resets when its episode ends: its video ends with the step before, marked
            # with how the episode ended.
            for i in range(recorded):
                if not ended[i]:
                    solved[i][-1] = solved[i][-1] or bool(success[i])
                    if not new[i]:
                        frames[i].append(self.envs.render(split="eval", index=i))
                        solved[i].append(bool(success[i]))
            ended[:n] |= new
            obs = result.select(*self.obs_keys)
            if ended.all():
                break
        if recorded:
            self._save_episodes(video_path, frames, solved, instructions, once[:recorded])
        return once.float(), at_end, returns, lengths, tasks

    def _save_episodes(self, video_path: Path, frames: list, solved: list, instructions: list,
                       once: torch.Tensor) -> None:
        """One successful and one failed recorded episode (those that exist), GIF + MP4."""
        fps = self.spec.get("control_hz") or 10.0
        for kind, pick in (("success", True), ("failure", False)):
            i = next((j for j in range(len(frames)) if bool(once[j]) == pick), None)
            if i is None:
                continue
            annotated = annotate_episode(frames[i], instructions[i], solved[i])
            for suffix in (".gif", ".mp4"):
                save_video(annotated, video_path.with_name(f"{video_path.stem}_{kind}{suffix}"), fps=fps)
        shown = next((video_path.with_name(f"{video_path.stem}_{kind}.gif") for kind in ("success", "failure")
                      if video_path.with_name(f"{video_path.stem}_{kind}.gif").exists()), None)
        if shown is not None:
            shutil.copyfile(shown, video_path)

    # ------------------------------------------------------------------ set-up
    def build(self, placement: Placement, env_vars: dict[str, str]) -> None:
        """Builds the env shards (in ``placement.pipeline_stages`` stages) and learns the spaces."""
        cfg = self.cfg
        threads = cfg.trainer.torch_threads
        stages = int(cfg.placement.get("pipeline_stages", 1))
        env_kwargs = {
            "env_cfg": OmegaConf.to_container(cfg.env, resolve=True),
            "include_final_obs": self.algo.needs_final_values,
            "eval_ignore_terminations": bool(cfg.trainer.get("eval_ignore_terminations", False)),
            "torch_threads": threads,
        }
        if self.rollout_in_env:
            env_kwargs["policy"] = {"policy_cfg": OmegaConf.to_container(cfg.policy, resolve=True),
                                    "algo_cfg": OmegaConf.to_container(cfg.algo, resolve=True), "seed": cfg.seed}

        def env_group(sizes: dict[str, int], name: str) -> WorkerGroup:
            # Pipeline stages on the same devices split the env role's share between them.
            return WorkerGroup(EnvWorker, placement.devices("env"), placement,
                               placement.share("env") / stages, init_kwargs={**env_kwargs, **sizes},
                               name=name, env_vars=env_vars)

        eval_envs = cfg.trainer.get("eval_num_envs")
        self.num_eval_envs = int(eval_envs) if eval_envs is not None else min(cfg.trainer.eval_episodes, self.num_envs)
        self.envs = EnvStages(env_group, stages, self.num_envs, self.num_eval_envs)
        self.spec = self.envs.spec()
        checkpoint.write_env_spec(self.run_dir, self.spec)
        self.max_episode_steps = self.spec["max_episode_steps"]
        if cfg.env.max_episode_steps is None:
            check_batch(self.algo, cfg, self.max_episode_steps)  # the env's own episode limit is known now
        self.obs_keys = list(self.spec["observation_space"].spaces)
        self.num_steps = self.algo.rollout_steps(self.max_episode_steps)
        # Pipelined rollout: env stages overlap with policy inference (not for scripted experts).
        self.pipelined = self.envs.stages > 1 and not self.algo.uses_expert

    def policy_workers(self) -> PolicyWorkers:
        return PolicyWorkers(PolicyWorker, {"observation_space": self.spec["observation_space"],
                                            "action_space": self.spec["action_space"]},
                             with_ref=self.algo.needs_ref)

    def shutdown(self) -> None:
        if self.envs is not None:
            self.envs.shutdown()

    # ------------------------------------------------------------------ helpers
    def _fresh_seeds(self) -> list[int]:
        return [int(s) for s in self.rng.integers(0, 2**31 - 1, size=self.num_envs)]

    def _media(self, name: str) -> Path:
        return self.run_dir / "media" / name

    def report(self, metrics: dict[str, Any]) -> None:
        plot = plot_learning_curve(self.run_dir / METRICS_FILE, self._media("learning_curve.png"))
        say(self.run_dir, f"final eval success rate: {metrics.get('eval/success_rate', float('nan')):.3f}")
        say(self.run_dir, f"learning curve: {plot}")
        videos = [self._media(f"episode_{kind}.mp4") for kind in ("success", "failure")]
        if any(v.exists() for v in videos):
            say(self.run_dir, "episode videos: " + ", ".join(str(v) for v in videos if v.exists())
                + " (and .gif; episode.gif shows the successful one when there is one)")
        say(self.run_dir, f"run dir: {self.run_dir}")


def embodied_run(cfg: DictConfig, run_dir: Path, algo: Algorithm | None = None) -> Run:
    """The run of ``cfg`` (policy x env x algorithm) in ``run_dir``, its workers built."""
    algo = algo or check_config(cfg)
    return Run(cfg, run_dir, algo, EnvCollector(cfg, run_dir, algo))
