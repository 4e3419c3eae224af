"""The preference controller: sample images -> score / label -> update, for text-to-image policies.

One process runs this loop top to bottom; the policy lives in Ray worker groups (rollout samples
trajectories, actor trains; colocated they are one worker). The preference source (prompts, a
score, tie rules) runs here in the controller. Read ``PreferenceLoop.run`` first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from rlplat import checkpoint
from rlplat.algos.base import PreferenceAlgorithm
from rlplat.batch import Batch
from rlplat.logging import METRICS_FILE, Panel, RunLogger, plot_learning_curve, save_image_grid, truncate_metrics
from rlplat.runtime.placement import Placement, PlacementSpec
from rlplat.runtime.worker_group import WorkerGroup
from rlplat.workers.diffusion import DiffusionWorker

log = logging.getLogger(__name__)

# Images of the eval set shown in each grid (the first ones, same seeds at every evaluation).
GRID_IMAGES = 32


def check_preference_config(cfg: DictConfig) -> PreferenceAlgorithm:
    """Builds the algorithm and checks it against the policy and placement before Ray starts."""
    algo = instantiate(cfg.algo, _convert_="all")
    if not isinstance(algo, PreferenceAlgorithm):
        raise ValueError(  # noqa: TRY004 (a wrong config value: reported as a config error)
            f"algo._target_={cfg.algo._target_} trains action policies in environments, but this run has a "
            f"preference source (preference={cfg.preference._target_}): pick algo=d3po, ddpo or diffusion_sft"
        )
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    policy_cls = get_class(policy_cfg.pop("_target_"))
    if not hasattr(policy_cls, "sample_trajectory"):
        raise ValueError(f"policy._target_={policy_cls.__name__} is not a text-to-image policy; "
                         f"preference runs need policy=diffusion_tiny, diffusion_tiny_shapes or sd15")
    if hasattr(policy_cls, "preflight"):
        policy_cls.preflight(**policy_cfg)
    if algo.samples_per_prompt == 0:
        prompts_cls = get_class(cfg.preference.prompts._target_)
        if not getattr(prompts_cls, "has_demonstrations", False):
            raise ValueError(
                f"{type(algo).__name__} trains on captioned images, but preference.prompts._target_="
                f"{cfg.preference.prompts._target_} has prompts only: use a prompt set with demonstrations "
                f"(rlplat.envs.preference.shapes.ShapesPrompts, e.g. preference=shapes_fidelity)"
            )
    for role in ("rollout", "actor"):
        if role not in cfg.placement.roles:
            raise ValueError(f"placement.roles has no {role!r}: add placement.roles.{role}=<devices>")
    spec = PlacementSpec.from_config(cfg.placement)
    if len(spec.devices("actor")) != 1:
        raise ValueError(f"placement.roles.actor={cfg.placement.roles.actor!r}: preference runs train on one "
                         f"actor worker (data-parallel diffusion updates are not implemented); name one device")
    algo.check(int(OmegaConf.select(cfg, "policy.lora.r", default=0) or 0))
    return algo


class PreferenceLoop:
    """Tunes a text-to-image policy online against a preference source with a PreferenceAlgorithm."""

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: PreferenceAlgorithm | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.algo = algo or check_preference_config(cfg)
        self.source = instantiate(cfg.preference, _convert_="all")
        self.rng = np.random.default_rng(cfg.seed)
        self.samples = 0
        self._build_workers()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Trains for ``trainer.total_steps`` iterations; returns the last logged metrics."""
        tc = self.cfg.trainer
        start = self._restore_or_reset()
        logger = RunLogger.from_config(self.cfg, self.run_dir, start)
        self.logger = logger
        metrics: dict[str, Any] = {}
        try:
            if start == 0 and tc.eval_at_start:
                logger.log(0, {"samples": 0, **self.evaluate(0)})
            for step in range(start + 1, tc.total_steps + 1):
                t0 = time.perf_counter()
                batch, metrics = self.collect()
                t_collect = time.perf_counter() - t0
                metrics |= self.update(batch, step)
                self.sync_weights()
                elapsed = time.perf_counter() - t0
                metrics |= {
                    "samples": self.samples,
                    "perf/samples_per_s": metrics.pop("_rows") / elapsed,
                    "perf/collect_s": t_collect,
                    "perf/iteration_s": elapsed,
                }
                last = step == tc.total_steps
                if last or (tc.eval_every and step % tc.eval_every == 0):
                    metrics |= self.evaluate(step)
                logger.log(step, metrics)
                if last or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                    self.save_checkpoint(step)
        finally:
            logger.close()
        self._report(metrics)
        return metrics

    # ------------------------------------------------------------------ stages
    def collect(self) -> tuple[Batch, dict[str, Any]]:
        """This iteration's training batch: demonstrations (SFT) or scored, prepared samples."""
        n = int(self.algo.cfg["batch_size"])
        k = self.algo.samples_per_prompt
        if k == 0:
            rows = n * int(self.algo.cfg["num_minibatches"])
            images, prompts = self.source.demonstrations(rows, seed=int(self.rng.integers(2**31 - 1)))
            self.samples += rows
            return Batch({"images": torch.as_tensor(images)}, extras={"prompts": prompts}), {"_rows": rows}
        prompts = [p for p in self.source.sample_prompts(n, self.rng) for _ in range(k)]
        noise = self.rng.integers(0, 2**31 - 1, size=len(prompts))
        if self.algo.share_noise:
            noise = np.repeat(noise[::k], k)
        traj = self.generate(prompts, noise, int(self.rng.integers(2**31 - 1)))
        scores = self.source.score(traj["images"].numpy(), prompts)
        self.samples += len(prompts)
        batch, metrics = self.algo.prepare(traj, scores, self.source, self.rng)
        return batch, {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()), **metrics,
                       "_rows": len(prompts)}

    def generate(self, prompts: list[str], noise_seeds: np.ndarray, seed: int,
                 guidance_scale: float | None = None) -> Batch:
        """Trajectories for ``prompts`` from x_T drawn with ``noise_seeds`` (one per prompt)."""
        requests = Batch({"noise_seed": torch.as_tensor(np.asarray(noise_seeds, np.int64)),
                          "seed": torch.full((len(prompts),), seed, dtype=torch.int64)},
                         extras={"prompts": list(prompts)})
        return self.rollout.generate(requests, guidance_scale)

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """One algorithm update on the actor group; skipped when no row carries signal."""
        lr = self.algo.learning_rate(step - 1, self.cfg.trainer.total_steps)
        metrics = {"train/lr": lr, "train/rows": float(len(batch))}
        if len(batch) == 0:
            log.info("no informative pairs this iteration (all tied): update skipped")
            return metrics
        out = self.actor.update(batch, lr)
        return metrics | (out[0] if isinstance(out, list) else out)

    def sync_weights(self) -> None:
        """Copies trained weights to a separate rollout group (no-op when they are fused)."""
        if self.rollout is not self.actor:
            self.rollout.set_weights(self.actor.get_weights())

    def evaluate(self, step: int) -> dict[str, float]:
        """Scores ``trainer.eval_episodes`` images of the held-out prompts, same seeds every time.

        The prompts cycle through ``eval_prompts``; noise and step seeds derive from ``seed`` only,
        so the grids of two evaluations (and of two runs with the same seed) differ only by the
        weights. Saves ``media/eval_step_<N>.png`` (the first 32 images, captioned).
        """
        n = int(self.cfg.trainer.eval_episodes)
        prompts = [self.source.eval_prompts[i % len(self.source.eval_prompts)] for i in range(n)]
        fixed = np.random.default_rng([self.cfg.seed, 1])
        traj = self.generate(prompts, fixed.integers(0, 2**31 - 1, size=n), int(fixed.integers(2**31 - 1)))
        images = traj["images"].numpy()
        scores = self.source.score(images, prompts)
        grid = save_image_grid(images[:GRID_IMAGES], self.run_dir / "media" / f"eval_step_{step:05d}.png",
                               captions=prompts[:GRID_IMAGES])
        self.logger.log_media("eval/samples", grid, step=step)
        return {"eval/reward": float(scores.mean()), "eval/reward_std": float(scores.std())}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Writes policy, optimizer, RNG streams and the algorithm's controller state."""
        tmp = checkpoint.begin(self.run_dir, step)
        for group in self.policy_groups:
            group.save(str(tmp / checkpoint.POLICY))
        checkpoint.save_trainer_state(tmp, {
            "step": step,
            "samples": self.samples,
            "controller_rng": checkpoint.capture_rng(),
            "loop_rng": self.rng.bit_generator.state,
            "algo": self.algo.state_dict(),
        })
        return checkpoint.commit(tmp, self.cfg.trainer.keep_checkpoints)

    def _restore_or_reset(self) -> int:
        folder = checkpoint.find_resume_checkpoint(self.cfg.resume, self.run_dir)
        if folder is None:
            return 0
        state = checkpoint.load_trainer_state(folder)
        for group in self.policy_groups:
            group.load(str(folder / checkpoint.POLICY))
        self.samples = state["samples"]
        self.rng.bit_generator.state = state["loop_rng"]
        self.algo.load_state_dict(state["algo"])
        checkpoint.restore_rng(state["controller_rng"])
        truncate_metrics(folder.parent.parent / METRICS_FILE, self.run_dir / METRICS_FILE, state["step"])
        print(f"resumed from {folder} (step {state['step']})")
        return state["step"]

    # ------------------------------------------------------------------ set-up
    def _build_workers(self) -> None:
        cfg = self.cfg
        self.placement = Placement(PlacementSpec.from_config(cfg.placement), never_fuse={"env"})
        threads = cfg.trainer.torch_threads
        env_vars = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.policy_groups: list[WorkerGroup] = []
        for roles in self.placement.fused_groups():
            roles = [r for r in roles if r in ("rollout", "actor")]
            if not roles:
                continue
            group = WorkerGroup(
                DiffusionWorker, self.placement.devices(roles[0]), self.placement, self.placement.share(roles[0]),
                init_kwargs={
                    "policy_cfg": OmegaConf.to_container(cfg.policy, resolve=True),
                    "algo_cfg": OmegaConf.to_container(cfg.algo, resolve=True),
                    "roles": roles, "seed": cfg.seed, "torch_threads": threads,
                },
                name="+".join(roles), env_vars=env_vars,
            )
            self.policy_groups.append(group)
            if "rollout" in roles:
                self.rollout = group
            if "actor" in roles:
                self.actor = group

    def shutdown(self) -> None:
        """Stops the worker groups and frees the placement group."""
        for group in self.policy_groups:
            group.shutdown()
        self.placement.remove()

    def _report(self, metrics: dict[str, Any]) -> None:
        media = self.run_dir / "media"
        plot = plot_learning_curve(self.run_dir / METRICS_FILE, media / "learning_curve.png",
                                   panels=[Panel("reward", ("reward/mean", "eval/reward"))], x_key="samples")
        print(f"final eval reward ({self.source.name}, held-out prompts): {metrics.get('eval/reward', float('nan')):.4f}")
        print(f"learning curve: {plot}")
        grids = sorted(media.glob("eval_step_*.png"))
        if grids:
            print(f"eval grids: {grids[0]} ... {grids[-1]}")
        print(f"run dir: {self.run_dir}")
