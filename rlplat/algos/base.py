"""The Algorithm contract: batch arithmetic, advantages and a loss; the update loop is shared.

An algorithm is chosen by ``algo._target_`` and built from its config. The controller asks it
how to roll out (``rollout_steps``, ``reset_seeds``), checks its batch arithmetic at start-up,
calls ``compute_advantages`` on the collected rollout, and the actor worker runs ``update``,
which minimises ``loss`` over minibatches.
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from rlplat.algos.losses import masked_mean
from rlplat.algos.optim import OptimizerStep, adapt_lr_to_kl, annealed_lr, check_optim
from rlplat.batch import Batch
from rlplat.policies.base import ActionPolicy, EvalOutput

log = logging.getLogger(__name__)


class BatchArithmeticError(ValueError):
    """Sizes from several config groups do not fit together."""


class Algorithm(abc.ABC):
    """Base class of embodied RL algorithms (PPO, GRPO).

    Attributes:
        needs_value: whether the policy's critic is trained and used.
        episodic: whether each iteration starts fresh episodes from chosen seeds (GRPO groups)
            instead of continuing the envs where the last iteration left them (PPO).
        needs_final_values: whether episode ends are bootstrapped with V(final obs) (the env
            workers return final observations and the rollout records their values).
    """

    needs_value: ClassVar[bool] = True
    episodic: ClassVar[bool] = False
    needs_final_values: ClassVar[bool] = True

    #: Whether rollouts act with the env's scripted expert instead of the policy (SFT).
    uses_expert: ClassVar[bool] = False

    def __init__(self, **cfg: Any) -> None:
        self.cfg = cfg
        self.optim = cfg["optim"]
        check_optim(self.optim)
        if self.optim.get("desired_kl") is not None and self.uses_expert:
            raise ValueError(f"algo.optim.desired_kl={self.optim['desired_kl']} adapts the lr to the KL between the "
                             f"rollout policy and the trained one; {type(self).__name__} learns from demonstrations, "
                             f"which have no such policy: set algo.optim.desired_kl=null")
        self.iteration = 1

    # ----------------------------------------------------------------- rollout shape
    @abc.abstractmethod
    def rollout_steps(self, max_episode_steps: int) -> int:
        """Env steps per env per iteration (None while an episodic algorithm's ``max_episode_steps`` is None)."""

    def reset_seeds(self, num_envs: int, rng: np.random.Generator) -> list[int] | None:
        """Per-env seeds for the envs at the start of an iteration (episodic algorithms)."""
        return None

    @property
    def needs_ref(self) -> bool:
        """Whether a frozen reference policy must score the rollouts."""
        return False

    def check(self, num_envs: int, max_episode_steps: int | None, num_env_workers: int, num_actor_workers: int) -> None:
        """Checks that the sizes fit together; raises BatchArithmeticError naming the numbers.

        ``max_episode_steps=None`` (the env's own limit, known once it is built) skips the row
        arithmetic that depends on it; the loop checks again with the env's value.
        """
        if num_envs % num_env_workers:
            raise BatchArithmeticError(
                f"env.num_envs={num_envs} must be a multiple of the {num_env_workers} env workers "
                f"(placement.roles.env); use env.num_envs={num_env_workers * max(1, num_envs // num_env_workers)}"
            )
        steps = self.rollout_steps(max_episode_steps)
        if steps is None:  # episodic: the env's limit is not known yet
            return
        rows = num_envs * steps
        minibatches = self.cfg["num_minibatches"]
        if rows % (minibatches * num_actor_workers):
            raise BatchArithmeticError(
                f"a rollout holds env.num_envs={num_envs} x rollout_steps="
                f"{steps} = {rows} rows, which does not split into "
                f"algo.num_minibatches={minibatches} x {num_actor_workers} actor workers; "
                f"pick sizes so that {minibatches * num_actor_workers} divides {rows}"
            )

    # ----------------------------------------------------------------- learning
    @abc.abstractmethod
    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        """Adds ``advantages`` (and ``returns``, ``mask``) to a time-major rollout batch."""

    @abc.abstractmethod
    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one minibatch and detached metrics."""

    def update(
        self,
        policy: ActionPolicy,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        generator: torch.Generator,
        sync_grads: Callable[[], None] | None = None,
        sync_mean: Callable[[list[float]], list[float]] | None = None,
        iteration: int = 1,
    ) -> dict[str, float]:
        """Runs the epochs x minibatches optimisation of ``loss`` on one rollout.

        ``sync_grads`` averages gradients over data-parallel actor workers, and ``sync_mean``
        averages a list of floats over them, so every rank takes the same decisions: a
        minibatch whose loss is not finite on *any* rank is skipped by all (never stepped, so no
        rank waits alone in the gradient all-reduce), and the KL early stop uses the mean KL.
        ``iteration`` (from 1) is the training iteration, for schedules such as critic warm-up.

        The approx KL of each minibatch is checked *before* its optimizer step (as ManiSkill's
        and SB3's PPO do): a minibatch that is already beyond ``algo.target_kl`` is not stepped
        and the update ends there (``train/kl_stop``; ``train/update_fraction`` says how much of
        the planned epochs x minibatches ran). With ``algo.optim.desired_kl`` the same KL then
        moves the learning rate (``adapt_lr_to_kl``) before the step; ``train/lr`` reports the lr
        the update ended with.

        With ``algo.recompute_old_logprobs`` (null: on for bf16/fp16 weights) the rollout's
        log-probs are first re-scored with the training weights in training mode (verl's
        choice), so the first ratio is 1 up to the rounding of another minibatch composition
        instead of carrying the rollout path's (KV-cached decoding, low-precision matmuls of
        another batch shape). Either way
        ``train/ratio_dev_first`` reports mean |ratio - 1| on the first minibatch, before any step.
        """
        self.iteration = iteration
        # Demonstrations (SFT) carry no behaviour log-probs: there is no ratio to check.
        has_old_logprobs = "logprobs" in batch
        if has_old_logprobs and self.recomputes_old_logprobs(policy):
            rescore_old_logprobs(policy, batch, self.cfg["num_minibatches"])
        sums: dict[str, float] = defaultdict(float)
        count, stop_kl, ratio_dev_first = 0, None, None
        target_kl = self.cfg.get("target_kl")
        desired_kl = self.optim.get("desired_kl")
        stepper = OptimizerStep(optimizer, self.optim["max_grad_norm"], sync_grads, sync_mean)
        planned = self.cfg["update_epochs"] * self.cfg["num_minibatches"]
        for _ in range(self.cfg["update_epochs"]):
            for mb in batch.minibatches(self.cfg["num_minibatches"], generator):
                # The minibatch carries the rollout's extras (e.g. the VLA's action tokens).
                out = policy.evaluate_actions(mb, mb["actions"], mb)
                if has_old_logprobs and ratio_dev_first is None:
                    with torch.no_grad():
                        ratio = (out.logprobs.float() - mb["logprobs"].float()).exp()
                        ratio_dev_first = float(masked_mean((ratio - 1).abs(), mb["mask"] if "mask" in mb else None))
                loss, metrics = self.loss(mb, out)
                kl = float(metrics.get("approx_kl", 0.0)) if torch.isfinite(loss) else 0.0
                if sync_mean is not None:
                    kl = sync_mean([kl])[0]
                if target_kl is not None and kl > target_kl:
                    stop_kl = kl
                    break
                if desired_kl is not None:  # the KL every rank agreed on: the same lr everywhere
                    adapt_lr_to_kl(optimizer, kl, float(desired_kl))
                grad_norm = stepper.step(loss)
                if grad_norm is None:
                    continue
                metrics = {**metrics, "loss": loss.detach(), "grad_norm": grad_norm}
                for key, value in metrics.items():
                    sums[key] += float(value)
                sums["grad_norm_max"] = max(sums["grad_norm_max"], float(grad_norm))
                count += 1
            if stop_kl is not None:
                break
        result = {f"train/{k}": v / max(count, 1) for k, v in sums.items() if k != "grad_norm_max"}
        result["train/ratio_dev_first"] = float("nan") if ratio_dev_first is None else ratio_dev_first
        result["train/grad_norm_max"] = sums["grad_norm_max"]
        result["train/minibatches"] = float(count)
        result["train/update_fraction"] = count / planned
        result["train/skipped_nonfinite"] = float(stepper.skipped)
        result["train/kl_stop"] = float(stop_kl is not None)
        if stop_kl is not None:
            result["train/kl_at_stop"] = stop_kl
        if desired_kl is not None:
            first = optimizer.param_groups[0]
            result["train/lr"] = first["lr"] / first.get("lr_scale", 1.0)
        return result

    def recomputes_old_logprobs(self, policy: ActionPolicy) -> bool:
        """``algo.recompute_old_logprobs``, where null means: when the weights are bf16 or fp16."""
        setting = self.cfg.get("recompute_old_logprobs")
        if setting is None:
            return any(p.dtype in (torch.bfloat16, torch.float16) for p in policy.parameters())
        return bool(setting)

    def learning_rate(self, step: int, total_steps: int, time_share: float = 0.0) -> float:
        """Learning rate at iteration ``step`` (linear annealing when optim.anneal_lr, over the
        iterations or the share ``time_share`` of the run's wall-clock budget, whichever is further)."""
        return annealed_lr(self.optim, step, total_steps, time_share)


def rescore_old_logprobs(policy: ActionPolicy, batch: Batch, num_chunks: int) -> None:
    """Replaces ``batch["logprobs"]`` with the policy's own log-probs of the recorded actions,
    scored without gradients in ``num_chunks`` pieces (the update's minibatch size)."""
    with torch.no_grad():
        parts = [policy.evaluate_actions(chunk, chunk["actions"], chunk).logprobs for chunk in batch.chunk(num_chunks)]
    batch["logprobs"] = torch.cat(parts).to(batch["logprobs"].dtype)


class PreferenceAlgorithm(abc.ABC):
    """Base class of text-to-image algorithms (D3PO, DDPO/GRPO, diffusion SFT).

    The preference loop asks the rollout worker for ``samples_per_prompt`` trajectories of each
    of ``cfg["batch_size"]`` prompts (sharing the initial noise within a prompt when
    ``share_noise``), scores them with the preference source, hands them to ``prepare`` in the
    controller (labels, advantages), and the actor worker runs ``update``: for every minibatch,
    the gradients of ``step_loss`` over a random subset of the denoising steps are accumulated
    and applied in one optimizer step (DDPO's and D3PO's schedule).
    """

    #: Trajectories sampled per prompt (0: the algorithm trains on demonstrations instead).
    samples_per_prompt: ClassVar[int] = 1
    #: Whether the trajectories of one prompt start from the same x_T.
    share_noise: ClassVar[bool] = False
    #: What the algorithm learns from: "online" (a preference source's prompts and score, or its
    #: demonstrations) or "pairs" (a dataset of preference pairs, read by the offline collector).
    source_kind: ClassVar[str] = "online"

    def __init__(self, **cfg: Any) -> None:
        self.cfg = cfg
        self.optim = cfg["optim"]
        if cfg.get("share_prefix", False):
            if int(cfg.get("skip_initial_steps", 0)) <= 0:
                raise ValueError("algo.share_prefix=true shares the sampler's noise of the untrained initial steps "
                                 "within a group, but algo.skip_initial_steps=0 leaves none untrained: set "
                                 "algo.skip_initial_steps>0 or algo.share_prefix=false")
            if cfg.get("branch", False):
                raise ValueError("algo.share_prefix=true and algo.branch=true: a branching sample is already "
                                 "deterministic before its one noisy step; set one of them to false")
        if self.optim.get("desired_kl") is not None:
            raise ValueError(f"algo.optim.desired_kl={self.optim['desired_kl']}: the KL-adaptive lr is for the "
                             f"embodied algorithms (ppo, grpo); {type(self).__name__} keeps its lr schedule "
                             f"(algo.optim.lr, algo.optim.anneal_lr): set algo.optim.desired_kl=null")

    @property
    def needs_adapter_reference(self) -> bool:
        """Whether the loss scores a reference with the policy's LoRA adapter disabled."""
        return False

    def check(self, lora_rank: int) -> None:
        """Checks the batch arithmetic and what the policy must offer; raises naming the fields."""
        batch, minibatches = int(self.cfg["batch_size"]), int(self.cfg["num_minibatches"])
        rows = batch * max(self.samples_per_prompt, 1)
        if minibatches < 1 or rows < minibatches:
            raise BatchArithmeticError(
                f"algo.batch_size={batch} prompts x {max(self.samples_per_prompt, 1)} samples = {rows} rows cannot "
                f"fill algo.num_minibatches={minibatches}; use algo.num_minibatches between 1 and {rows}"
            )
        if self.needs_adapter_reference and lora_rank <= 0:
            raise ValueError(
                f"{type(self).__name__} scores the reference as the policy with its LoRA adapter disabled, but "
                f"policy.lora.r={lora_rank}: set policy.lora.r>0, or algo.reference=sampled / algo.kl_coef=0"
            )

    def attach(self, policy: Any) -> None:
        """Called once on the actor with the policy as built, before any checkpoint is loaded
        (e.g. to keep a frozen copy of the starting weights as the reference)."""

    def check_source(self, data: Any) -> None:
        """Checks that the run's training data (the source's prompt set) offers what the algorithm
        trains on; called before Ray starts."""

    def prepare(self, traj: Batch, scores: np.ndarray, source: Any, rng: np.random.Generator
                ) -> tuple[Batch, dict[str, float]]:
        """Turns scored trajectories into the training batch (in the controller); returns it and metrics."""
        raise NotImplementedError

    def step_loss(self, policy: Any, mb: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss of denoising step ``step`` over the minibatch, with gradients."""
        raise NotImplementedError

    def update(
        self,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        generator: torch.Generator,
        sync_grads: Callable[[], None] | None = None,
        sync_mean: Callable[[list[float]], list[float]] | None = None,
    ) -> dict[str, float]:
        """``update_epochs`` x ``num_minibatches`` optimizer steps, each over a subset of the steps.

        Each minibatch trains on ``timestep_fraction`` of the denoising steps, drawn at random
        per minibatch; their losses are averaged, each times its ``algo.step_weight`` weight
        (``step_weights``; gradients accumulated step by step, so memory holds one step's graph).
        A minibatch whose loss is not finite is skipped and counted.
        """
        num_steps = batch["timesteps"].shape[1]
        train_steps = max(1, round(num_steps * float(self.cfg.get("timestep_fraction", 1.0))))
        weights = step_weights(policy, batch["timesteps"][0], self.cfg.get("step_weight", "uniform"))
        stepper = OptimizerStep(optimizer, self.optim["max_grad_norm"], sync_grads, sync_mean)
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for _ in range(int(self.cfg["update_epochs"])):
            order = torch.randperm(len(batch), generator=generator)
            for rows in torch.tensor_split(order, min(int(self.cfg["num_minibatches"]), len(batch))):
                mb = batch[rows]
                steps = torch.randperm(num_steps, generator=generator)[:train_steps].tolist()
                stepper.begin()
                step_sums: dict[str, float] = defaultdict(float)
                for step in steps:
                    loss, metrics = self.step_loss(policy, mb, step)
                    if not stepper.backward(loss * float(weights[step]) / len(steps)):
                        break
                    for key, value in {"loss": loss.detach(), **metrics}.items():
                        step_sums[key] += float(value) / len(steps)
                grad_norm = stepper.finish()
                if grad_norm is None:
                    continue
                step_sums["grad_norm"] = grad_norm
                for key, value in step_sums.items():
                    sums[key] += value
                count += 1
        result = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
        result["train/minibatches"] = float(count)
        result["train/skipped_nonfinite"] = float(stepper.skipped)
        return result

    def learning_rate(self, step: int, total_steps: int, time_share: float = 0.0) -> float:
        """Learning rate at iteration ``step`` (linear annealing when optim.anneal_lr, over the
        iterations or the share ``time_share`` of the run's wall-clock budget, whichever is further)."""
        return annealed_lr(self.optim, step, total_steps, time_share)

    def branch_step(self, rng: np.random.Generator, num_steps: int) -> int | None:
        """With ``algo.branch``: the denoising step (index) at which this iteration's samples draw
        their noise, uniform over the trainable steps (``skip_initial_steps`` and ``skip_final_steps``
        excluded); every other step is deterministic, so samples that share x_T differ by that
        step's noise alone and their scores credit it (branching credit assignment, as in
        TempFlow-GRPO / BranchGRPO). None without ``algo.branch`` (noise at every step)."""
        if not self.cfg.get("branch", False):
            return None
        first, last = int(self.cfg.get("skip_initial_steps", 0)), num_steps - int(self.cfg.get("skip_final_steps", 0))
        if last <= first:
            raise ValueError(f"algo.skip_initial_steps + algo.skip_final_steps leave none of the {num_steps} "
                             f"denoising steps (policy.num_steps) to branch at")
        return int(rng.integers(first, last))

    @property
    def shared_prefix_steps(self) -> int:
        """With ``algo.share_prefix``: the untrained initial steps (``skip_initial_steps``), whose
        sampler noise the rows of a group share as they share x_T, so they part where training
        starts and their scores compare what the trained steps drew; else 0."""
        return int(self.cfg.get("skip_initial_steps", 0)) if self.cfg.get("share_prefix", False) else 0

    def trained_part(self, batch: Batch) -> Batch:
        """The denoising steps of ``batch`` that train: the branch step (``algo.branch``: the batch
        holds ``sde_step``), else all but ``skip_initial_steps`` and ``skip_final_steps``."""
        steps = batch["timesteps"].shape[1]
        if "sde_step" in batch:
            k = int(batch["sde_step"][0])
            return trained_steps(batch, k, steps - 1 - k)
        return trained_steps(batch, int(self.cfg.get("skip_initial_steps", 0)), int(self.cfg.get("skip_final_steps", 0)))

    def state_dict(self) -> dict[str, Any]:
        """Controller-side state to checkpoint (e.g. DDPO's per-prompt statistics)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict``."""


def trained_steps(batch: Batch, initial: int = 0, final: int = 0) -> Batch:
    """``batch`` without its first ``initial`` and last ``final`` denoising steps in every per-step
    field ([B, T, ...], T = ``timesteps``' second dim), so those steps get no update; both 0
    returns it as is. The first steps lay the image out (what is drawn where), the last ones
    render its fine detail (edges, texture)."""
    if initial <= 0 and final <= 0:
        return batch
    steps = batch["timesteps"].shape[1]
    if initial + final >= steps:
        raise ValueError(f"algo.skip_initial_steps={initial} + algo.skip_final_steps={final} leave none of the "
                         f"{steps} denoising steps (policy.num_steps) to train: together they must be at most {steps - 1}")
    out = batch.select(*batch.keys())
    for key in batch:
        value = batch[key]
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[1] == steps:
            out[key] = value[:, initial : steps - final]
    return out


def _output_scale_weights(policy: Any, timesteps: torch.Tensor) -> torch.Tensor:
    if not hasattr(policy, "step_output_scale"):
        raise ValueError(f"algo.step_weight=output_scale needs a DDIM policy with step_output_scale(t) "
                         f"({type(policy).__name__} has none): use algo.step_weight=uniform")
    inverse = 1.0 / policy.step_output_scale(timesteps).float().cpu()
    return inverse / inverse.mean()


# algo.step_weight -> (policy, timesteps [T]) -> loss weight of each denoising step [T].
STEP_WEIGHTS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "uniform": lambda policy, timesteps: torch.ones(len(timesteps)),
    "output_scale": _output_scale_weights,
}


def step_weights(policy: Any, timesteps: torch.Tensor, mode: str) -> torch.Tensor:
    """Loss weight [T] of each denoising step of a trajectory with ``timesteps`` [T] (mean 1).

    "uniform": every step's loss counts once (DDPO's and D3PO's papers). "output_scale": each
    step's loss is divided by ``policy.step_output_scale`` (|d mu_t / d output| / sigma_t), so
    every step moves the model output by a comparable amount. Uniform weights let the steps
    near the image dominate: on the early tiny shapes base (10 DDIM steps) the D3PO gradient
    norm was 2.1e-3 at t=99, 1.4e-4 at t=199 and 4e-6 at t=999, and after 16 Adam steps on one
    batch of 16 pairs the implicit accuracy of steps t=999..199 stayed at 0.53 (t=99: 0.88-0.94);
    with "output_scale" it was 0.69 on those steps after 4 Adam steps and stayed there.
    """
    if mode not in STEP_WEIGHTS:
        raise ValueError(f"algo.step_weight={mode!r} must be one of {tuple(STEP_WEIGHTS)}")
    return STEP_WEIGHTS[mode](policy, timesteps)
