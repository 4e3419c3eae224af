"""Preference tuning of text-to-image policies: the two collectors of image-model runs.

Online (``OnlinePreferenceCollector``): sample images -> score / label -> batch (D3PO, DDPO,
diffusion SFT on demonstrations). Offline (``OfflinePreferenceCollector``): the next pairs of a
preference dataset -> batch (Diffusion-DPO). Both are collectors of the shared run skeleton
(``rlplat.loops.skeleton.Run``): the policy lives in Ray worker groups (rollout samples, actor
trains; colocated they are one worker); the preference source runs here in the controller, and
evaluation is the same for both (held-out prompts, fixed seeds, score and win rate over the
images of the untuned model).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rlplat import registry
from rlplat.algos.base import PreferenceAlgorithm
from rlplat.batch import Batch
from rlplat.logging import METRICS_FILE, Panel, plot_learning_curve, save_image_grid, say
from rlplat.loops.skeleton import ELAPSED, Collector, PolicyWorkers, Run, parse_stop_when
from rlplat.runtime.placement import PlacementSpec
from rlplat.workers.diffusion import DiffusionWorker

log = logging.getLogger(__name__)

# Images of the eval set shown in each grid (the first ones, same seeds at every evaluation).
GRID_IMAGES = 32


#: What ``OnlinePreferenceCollector.evaluate`` can log beside the reward (``trainer.stop_when`` may name them).
SIDE_METRICS = ("eval/fidelity", "eval/diversity")
#: What a text-to-image run logs that ``trainer.stop_when`` may watch (besides the algorithm's
#: ``train/`` metrics): the evaluation's metrics, the log-ratio to the base (``train/kl_to_base``:
#: D3PO with the adapter reference, DDPO with ``algo.kl_to_base_rows`` > 0), progress and wall time.
STOPPABLE_METRICS = ("eval/reward", "eval/reward_std", "eval/win_rate_vs_base", *SIDE_METRICS, "train/kl_to_base",
                     "reward/mean", ELAPSED, "perf/iteration_s", "samples", "pairs")


def image_diversity(images: np.ndarray, prompts: Sequence[str]) -> float:
    """Mean pairwise distance between the images of the same caption (different seeds).

    The distance of two uint8 images is the root-mean-square difference of their pixels scaled to
    [0, 1] (0: identical, 1: black vs white everywhere); pairs are averaged per caption, then over
    the captions with at least two images. NaN when no caption has two images.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    pixels = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    per_caption = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        x = pixels[rows]
        sq = ((x[:, None, :] - x[None, :, :]) ** 2).mean(-1)
        upper = np.triu_indices(len(rows), k=1)
        per_caption.append(float(np.sqrt(sq[upper]).mean()))
    return float(np.mean(per_caption)) if per_caption else float("nan")


#: The contract of preference sources that are datasets of pairs (envs/preference/offline.py).
PAIR_SOURCE = "PreferencePairSource"
SOURCE_WORDS = {"online": "images it samples and a score (online)",
                "pairs": "a dataset of preference pairs (offline)"}


def check_preference_config(cfg: DictConfig) -> PreferenceAlgorithm:
    """Builds the algorithm and checks it against the policy and placement before Ray starts."""
    algo = instantiate(cfg.algo, _convert_="all")
    if not isinstance(algo, PreferenceAlgorithm):
        raise ValueError(  # noqa: TRY004 (a wrong config value: reported as a config error)
            f"algo._target_={cfg.algo._target_} trains action policies in environments, but this run has a "
            f"preference source (preference={cfg.preference._target_}): pick algo=d3po, ddpo, diffusion_sft or dpo"
        )
    source = registry.part_for("preference", cfg.preference._target_)
    kind = "pairs" if source is not None and source.contract == PAIR_SOURCE else "online"
    if algo.source_kind != kind:
        other = "preference=shapes_pairs or pickapic_v2" if algo.source_kind == "pairs" else "preference=shapes_fidelity"
        raise ValueError(
            f"algo._target_={cfg.algo._target_} learns from {SOURCE_WORDS[algo.source_kind]}, but "
            f"preference={cfg.preference._target_} gives {SOURCE_WORDS[kind]}: pick "
            f"{'algo=dpo' if kind == 'pairs' else 'algo=d3po, ddpo or diffusion_sft'}, or "
            f"{other}")
    registry.preflight("preference", cfg.preference)
    part = registry.part_for("policy", cfg.policy._target_)
    if part is None or part.contract != "DiffusionPolicy":
        raise ValueError(f"policy._target_={cfg.policy._target_} is not a registered text-to-image policy; "
                         f"preference runs need policy=diffusion_tiny, diffusion_tiny_shapes or sd15")
    registry.preflight("policy", cfg.policy)
    prompt_set = None
    if "prompts" in cfg.preference:  # a prompt set is data only: cheap to build here
        prompt_set = instantiate(cfg.preference.prompts, _convert_="all")
        algo.check_source(prompt_set)
    check_score_arguments(cfg)
    check_stop_when(cfg, prompt_set)
    for role in ("rollout", "actor"):
        if role not in cfg.placement.roles:
            raise ValueError(f"placement.roles has no {role!r}: add placement.roles.{role}=<devices>")
    spec = PlacementSpec.from_config(cfg.placement)
    if len(spec.devices("actor")) != 1:
        raise ValueError(f"placement.roles.actor={cfg.placement.roles.actor!r}: preference runs train on one "
                         f"actor worker (data-parallel diffusion updates are not implemented); name one device")
    algo.check(int(OmegaConf.select(cfg, "policy.lora.r", default=0) or 0))
    return algo


def check_score_arguments(cfg: DictConfig) -> None:
    """``preference.score``'s settings are arguments of its class, so a misspelt one (added with
    ``+``) fails before Ray starts; a score that is cheap to build (``ScoreSource.cheap_to_build``)
    is built here too, so it checks their values as well (one that loads a model is not)."""
    node = cfg.preference.get("score")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    from hydra.utils import get_object

    score_class = get_object(node._target_)
    settings = OmegaConf.to_container(node, resolve=True)
    arguments = {str(k): v for k, v in settings.items() if not str(k).startswith("_")}
    signature = inspect.signature(score_class)
    try:
        signature.bind(**arguments)
    except TypeError as err:
        known = ", ".join(p for p in signature.parameters if p not in ("args", "kwargs")) or "none"
        raise ValueError(f"preference.score ({node._target_}) does not take these settings ({err}): "
                         f"remove or rename them (its settings: {known})") from None
    if getattr(score_class, "cheap_to_build", False):
        score_class(**arguments)  # its own ValueError names the setting


def check_stop_when(cfg: DictConfig, prompt_set: Any = None) -> None:
    """``trainer.stop_when`` names metrics a text-to-image run logs (and ``eval/fidelity`` needs
    shapes captions among the held-out prompts); raises ValueError naming the key."""
    text = OmegaConf.select(cfg, "trainer.stop_when", default=None)
    for condition in parse_stop_when(text):
        # The algorithm's own train/ metrics differ between algorithms: a missing one is warned about
        # at the first evaluation (``Run``); everything else must be a metric this loop logs.
        if condition.metric not in STOPPABLE_METRICS and not condition.metric.startswith("train/"):
            raise ValueError(f"trainer.stop_when={text!r} watches {condition.metric!r}, which text-to-image runs "
                             f"do not log: name one of {', '.join(STOPPABLE_METRICS)} or a train/ metric of the "
                             f"algorithm")
        if condition.metric == "eval/fidelity" and prompt_set is not None and not prompt_set.has_fidelity:
            raise ValueError(f"trainer.stop_when={text!r} watches eval/fidelity, but the prompt set of "
                             f"preference={cfg.preference._target_} ({type(prompt_set).__name__}, held-out prompts "
                             f"like {prompt_set.eval_prompts[0]!r}) has no fidelity score (the shapes world's "
                             f"ShapesPrompts has one): watch eval/reward instead")


class OnlinePreferenceCollector(Collector):
    """Samples from the text-to-image policy, scored and prepared by the preference source and
    the algorithm (or, for diffusion SFT, the source's demonstrations)."""

    progress_key = "samples"

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: PreferenceAlgorithm) -> None:
        super().__init__(cfg, run_dir, algo)
        self.source = instantiate(cfg.preference, _convert_="all")
        self.samples = 0
        self._rows, self._collect_s = 0, float("nan")
        # Held-out scores at step 0 (the untuned model), for the win rate of later evaluations.
        self.base_scores: np.ndarray | None = None

    def policy_workers(self) -> PolicyWorkers:
        return PolicyWorkers(DiffusionWorker)

    def batch_metrics(self, batch: Batch) -> dict[str, float]:
        return {"train/rows": float(len(batch))}

    def has_signal(self, batch: Batch) -> bool:
        # Online pairs that all tied leave nothing to learn from.
        return len(batch) > 0

    def progress(self, step: int, iteration_s: float) -> dict[str, float]:
        return {"samples": self.samples, "perf/samples_per_s": self._rows / iteration_s,
                "perf/collect_s": self._collect_s}

    def state_dict(self) -> dict[str, Any]:
        base = None if self.base_scores is None else self.base_scores.tolist()
        return {**super().state_dict(), "samples": self.samples, "algo": self.algo.state_dict(), "base_scores": base}

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        self.samples = state["samples"]
        super().load_state_dict(state, folder)
        self.algo.load_state_dict(state["algo"])
        base = state.get("base_scores")
        self.base_scores = None if base is None else np.asarray(base, np.float64)

    # ------------------------------------------------------------------ stages
    def collect(self, step: int) -> tuple[Batch, dict[str, Any]]:
        """This iteration's training batch: demonstrations (SFT) or scored, prepared samples."""
        t0 = time.perf_counter()
        batch, metrics = self._collect()
        self._collect_s = time.perf_counter() - t0
        return batch, metrics

    def _collect(self) -> tuple[Batch, dict[str, Any]]:
        n = int(self.algo.cfg["batch_size"])
        k = self.algo.samples_per_prompt
        if k == 0:
            rows = n * int(self.algo.cfg["num_minibatches"])
            images, prompts = self.source.demonstrations(rows, seed=int(self.rng.integers(2**31 - 1)))
            self.samples += rows
            self._rows = rows
            return Batch({"images": torch.as_tensor(images)}, extras={"prompts": prompts}), {}
        prompts = [p for p in self.source.sample_prompts(n, self.rng) for _ in range(k)]
        noise = self.rng.integers(0, 2**31 - 1, size=len(prompts))
        if self.algo.share_noise:
            noise = np.repeat(noise[::k], k)
        # algo.branch: this iteration's samples draw noise at one step only (None: at every step).
        sde_step = self.algo.branch_step(self.rng, int(self.cfg.policy.num_steps))
        traj = self.generate(prompts, noise, int(self.rng.integers(2**31 - 1)), sde_step=sde_step,
                             prefix_steps=self.algo.shared_prefix_steps)
        scores = self.source.score(traj["images"].numpy(), prompts)
        self.samples += len(prompts)
        self._rows = len(prompts)
        batch, metrics = self.algo.prepare(traj, scores, self.source, self.rng)
        if sde_step is not None:
            metrics = {**metrics, "branch/step": float(sde_step)}
        return batch, {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()), **metrics}

    def generate(self, prompts: list[str], noise_seeds: np.ndarray, seed: int,
                 guidance_scale: float | None = None, sde_step: int | None = None, prefix_steps: int = 0) -> Batch:
        """Trajectories for ``prompts`` from x_T drawn with ``noise_seeds`` (one per prompt);
        ``sde_step``: the one denoising step that draws noise (None: every step); ``prefix_steps``:
        the first steps whose noise is drawn from the row's noise seed too (shared by equal seeds)."""
        requests = Batch({"noise_seed": torch.as_tensor(np.asarray(noise_seeds, np.int64)),
                          "seed": torch.full((len(prompts),), seed, dtype=torch.int64)},
                         extras={"prompts": list(prompts)})
        return self.rollout.generate(requests, guidance_scale, sde_step, prefix_steps)

    def evaluate(self, step: int, last: bool = False) -> dict[str, float]:
        """Scores ``trainer.eval_episodes`` images of the held-out prompts, same seeds every time.

        Beside the reward: ``eval/fidelity`` (the shapes score of the same images, on any reward,
        from the prompt set, e.g. the shapes world's: ``PromptSet.fidelity``), ``eval/diversity`` (how far
        apart the images of one caption are across seeds: ``image_diversity``) and the win rate
        over the untuned model's images. The prompts cycle through ``eval_prompts``; noise and step
        seeds derive from ``seed`` only, so the grids of two evaluations (and of two runs with the
        same seed) differ only by the weights. Saves ``media/eval_step_<N>.png`` (the first 32 images, captioned).
        """
        n = int(self.cfg.trainer.eval_episodes)
        prompts = [self.source.eval_prompts[i % len(self.source.eval_prompts)] for i in range(n)]
        fixed = np.random.default_rng([self.cfg.seed, 1])
        traj = self.generate(prompts, fixed.integers(0, 2**31 - 1, size=n), int(fixed.integers(2**31 - 1)))
        images = traj["images"].numpy()
        grid = save_image_grid(images[:GRID_IMAGES], self.run_dir / "media" / f"eval_step_{step:05d}.png",
                               captions=prompts[:GRID_IMAGES])
        if self.logger is not None:  # None outside a training run (rlplat-eval)
            self.logger.log_media("eval/samples", grid, step=step)
        scores = self.source.score(images, prompts)
        if scores is None:  # a dataset without an evaluation score: the grids only
            return {}
        scores = np.asarray(scores, np.float64)
        if step == 0 and self.base_scores is None:
            self.base_scores = scores  # the untuned model's images of the same prompts and seeds
        metrics = {"eval/reward": float(scores.mean()), "eval/reward_std": float(scores.std())}
        diversity = image_diversity(images, prompts)
        if np.isfinite(diversity):  # not when every caption has one image
            metrics["eval/diversity"] = diversity
        fidelity = self.source.fidelity(images, prompts)
        if fidelity is not None:
            metrics["eval/fidelity"] = float(fidelity.mean())
        if self.base_scores is not None and len(self.base_scores) == len(scores):
            metrics["eval/win_rate_vs_base"] = float(np.mean(scores > self.base_scores)
                                                     + 0.5 * np.mean(scores == self.base_scores))
        return metrics

    def report(self, metrics: dict[str, Any]) -> None:
        media = self.run_dir / "media"
        plot = plot_learning_curve(self.run_dir / METRICS_FILE, media / "learning_curve.png",
                                   panels=[Panel("reward", ("reward/mean", "eval/reward"))], x_key=self.progress_key)
        reward = metrics.get("eval/reward", float("nan"))
        say(self.run_dir, f"final eval reward ({self.source.name}, held-out prompts): {reward:.4f}"
            + (f", win rate over the untuned model {metrics['eval/win_rate_vs_base']:.3f}"
               if "eval/win_rate_vs_base" in metrics else ""))
        say(self.run_dir, f"learning curve: {plot}")
        grids = sorted(media.glob("eval_step_*.png"))
        if grids:
            say(self.run_dir, f"eval grids: {grids[0]} ... {grids[-1]}")
        say(self.run_dir, f"run dir: {self.run_dir}")


class OfflinePreferenceCollector(OnlinePreferenceCollector):
    """The next ``batch_size x num_minibatches`` pairs of a preference dataset per iteration
    (``images_w``, ``images_l``, ``prompts``); the stream position is part of the checkpoint.
    Evaluation samples the held-out captions like the online collector."""

    progress_key = "pairs"

    def __init__(self, cfg: DictConfig, run_dir: Path, algo: PreferenceAlgorithm) -> None:
        super().__init__(cfg, run_dir, algo)
        self.pairs = 0

    def _collect(self) -> tuple[Batch, dict[str, Any]]:
        n = int(self.algo.cfg["batch_size"]) * int(self.algo.cfg["num_minibatches"])
        images_w, images_l, prompts = self.source.take(n)
        self.pairs += n
        self._rows = n
        stats = self.source.stats
        return (Batch({"images_w": torch.as_tensor(images_w), "images_l": torch.as_tensor(images_l)},
                      extras={"prompts": prompts}),
                {f"data/{key}": float(stats.get(key, 0)) for key in ("rows", "kept", "ties", "corrupt")})

    def progress(self, step: int, iteration_s: float) -> dict[str, float]:
        return {"pairs": self.pairs, "perf/pairs_per_s": self._rows / iteration_s, "perf/collect_s": self._collect_s}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pairs": self.pairs, "source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        super().load_state_dict(state, folder)
        self.pairs = state["pairs"]
        self.source.load_state_dict(state["source"])


#: The collector of each kind of preference source (``PreferenceAlgorithm.source_kind``).
COLLECTORS: dict[str, type[OnlinePreferenceCollector]] = {"online": OnlinePreferenceCollector,
                                                          "pairs": OfflinePreferenceCollector}


def preference_run(cfg: DictConfig, run_dir: Path, algo: PreferenceAlgorithm | None = None) -> Run:
    """The run of ``cfg`` (text-to-image policy x preference source x algorithm) in ``run_dir``."""
    algo = algo or check_preference_config(cfg)
    return Run(cfg, run_dir, algo, COLLECTORS[algo.source_kind](cfg, run_dir, algo))
