"""Structured configs: the schema behind every Hydra group in conf/.

Each YAML in ``conf/<group>/`` starts with ``defaults: [<name>_schema, _self_]``, so OmegaConf
checks it against the dataclass here: a misspelt key or a value of the wrong type stops the run
at composition time with a message naming the key. Nothing here validates by hand except the
batch arithmetic, which spans several groups (see ``check_batch_arithmetic``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from rlplat.runtime.cluster import ClusterConfig

# --------------------------------------------------------------------------- policy


@dataclass
class MLPPolicyConfig:
    """Gaussian actor-critic on state and/or image observations (policies/mlp.py)."""

    # Class that builds the policy.
    _target_: str = "rlplat.policies.mlp.ActorCritic"
    # Observation keys the policy reads: any of state, proprio, image, instruction.
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    # Hidden layer widths of the actor and the critic MLPs.
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    # Initial log standard deviation of the Gaussian action distribution.
    init_log_std: float = -0.5
    # Width of the instruction embedding (hashed bag of words) when obs_keys has instruction.
    instruction_dim: int = 32
    # Number of hash buckets for instruction words.
    instruction_buckets: int = 256
    # Standardise state/proprio with running statistics of the training batches.
    normalize_obs: bool = False


@dataclass
class ConstantPolicyConfig:
    """The same action on every row (policies/constant.py): no-op runs and overhead benchmarks."""

    # Class that builds the policy.
    _target_: str = "rlplat.policies.constant.ConstantPolicy"
    # The action, broadcast to the action shape (0: no-op for delta controllers).
    value: float = 0.0


@dataclass
class OpenVLATinyConfig:
    """Shape of the random-init tiny OpenVLA (built once, cached, loaded with from_pretrained)."""

    # Square input side of the vision tower(s) in pixels (env images are resized to it).
    image_size: int = 32
    # Side of a ViT patch in pixels (image_size must be a multiple).
    patch_size: int = 8
    # DINOv2 + SigLIP fused towers (6-channel input) instead of SigLIP alone.
    fused: bool = False
    # Width of the vision tower(s).
    vision_hidden_size: int = 32
    # Transformer blocks per vision tower.
    vision_layers: int = 2
    # Width of the Llama decoder.
    llm_hidden_size: int = 64
    # Llama decoder blocks.
    llm_layers: int = 2
    # Init seed of the random weights (part of the cache key).
    seed: int = 0


@dataclass
class LoRAConfig:
    """peft LoRA settings (r = 0 trains every weight instead)."""

    # Adapter rank; 0 disables LoRA (full fine-tuning).
    r: int = 0
    # LoRA alpha (null: min(r, 16), OpenVLA's fine-tuning default).
    alpha: int | None = None
    # Dropout on the adapter input.
    dropout: float = 0.0
    # Modules that get adapters: "all-linear" or a list of module-name suffixes.
    target_modules: Any = "all-linear"


@dataclass
class OpenVLAPolicyConfig:
    """OpenVLA vision-language-action policy (policies/openvla/policy.py)."""

    # Class that builds the policy.
    _target_: str = "rlplat.policies.openvla.policy.OpenVLAPolicy"
    # Local HF-format model folder or hub id found in the local HF cache (null: the tiny preset).
    path: str | None = None
    # Tiny preset shape, used when path is null.
    tiny: OpenVLATinyConfig = field(default_factory=OpenVLATinyConfig)
    # Cache folder of the tiny preset (null: $RLPLAT_CACHE_DIR or <tmp>/rlplat-cache).
    cache_dir: str | None = None
    # Start from an rlplat run / checkpoint / export (e.g. an SFT run) instead of path or tiny.
    init_from: str | None = None
    # Weight dtype: float32, bfloat16 or float16.
    dtype: str = "float32"
    # auto (cuda when available), cpu or cuda[:i].
    device: str = "auto"
    # LoRA adapter via peft; the KL reference is the model with the adapter disabled.
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Add a value head on the last prompt position (PPO needs it; GRPO does not).
    value_head: bool = False
    # Learning rate of the value head (null: the algorithm's lr).
    value_lr: float | None = None
    # Keep the value loss from shaping the shared trunk (the head reads a detached state).
    value_detach: bool = False
    # Sampling temperature of rollouts.
    temperature: float = 1.0
    # Statistics entry that unnormalises actions (null: the only one).
    unnorm_key: str | None = None
    # Keep the vision tower(s) fixed.
    freeze_vision: bool = False
    # Recompute LLM activations in backward (saves memory on 7B).
    gradient_checkpointing: bool = False
    # Copy the base weights next to the LoRA adapter in exports (off for 7B bases).
    export_base: bool = True


@dataclass
class DiffusionTinyConfig:
    """Shape of the random-init tiny text-to-image model (built once, cached, loaded with from_pretrained)."""

    # Side of the square images in pixels.
    image_size: int = 32
    # pixel_unshuffle factor: a 3 x H x W image is a 3 f^2 x H/f x W/f latent.
    fold: int = 2
    # UNet channels per level (each level halves the resolution).
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    # First level with cross-attention to the prompt (attention at full resolution is slow on CPUs).
    attention_from_level: int = 1
    # Width of the frozen text encoder (the fixed word embeddings).
    text_hidden_size: int = 32
    # Zero-terminal-SNR betas with v-prediction and trailing timesteps (false: SD1.5's epsilon
    # schedule, whose x_T keeps 6.8% of the image: pixel-space samples then show a colour checkerboard).
    zero_terminal_snr: bool = True
    # Init seed of the random weights (part of the cache key).
    seed: int = 0


@dataclass
class DiffusionLoRAConfig:
    """peft LoRA on the UNet attention (r = 0 trains every UNet weight instead)."""

    # Adapter rank; 0 disables LoRA (full fine-tuning, no built-in reference).
    r: int = 0
    # LoRA alpha (null: r).
    alpha: int | None = None
    # Dropout on the adapter input.
    dropout: float = 0.0
    # Module-name suffixes that get adapters (null: to_q, to_k, to_v, to_out.0).
    target_modules: list[str] | None = None


@dataclass
class DiffusionPolicyConfig:
    """Text-to-image DDIM sampler with per-step log-probs (policies/diffusion/pipeline.py)."""

    # Class that builds the policy.
    _target_: str = "rlplat.policies.diffusion.pipeline.TextToImagePolicy"
    # Local diffusers-layout folder (SD1.5, an rlplat export); null: the tiny preset.
    path: str | None = None
    # Tiny preset shape, used when path is null.
    tiny: DiffusionTinyConfig = field(default_factory=DiffusionTinyConfig)
    # Cache folder of the tiny preset (null: $RLPLAT_CACHE_DIR or <tmp>/rlplat-cache).
    cache_dir: str | None = None
    # Weight dtype: float32, bfloat16 or float16.
    dtype: str = "float32"
    # auto (cuda when available), cpu or cuda[:i].
    device: str = "auto"
    # LoRA adapter via peft; the reference model is the adapter disabled.
    lora: DiffusionLoRAConfig = field(default_factory=DiffusionLoRAConfig)
    # DDIM steps per sample.
    num_steps: int = 20
    # Classifier-free guidance weight (1: no guidance, one UNet pass per step).
    guidance_scale: float = 3.0
    # DDIM noise scale; > 0, since a deterministic step has no log-probability.
    eta: float = 1.0
    # Reduction of the per-element Gaussian log-density of a step: mean (DDPO/D3PO) or sum.
    reduction: str = "mean"
    # Images sampled per UNet batch (larger requests are split).
    sample_batch_size: int = 64


# --------------------------------------------------------------------------- env


@dataclass
class ToyEnvConfig:
    """Constructor arguments of envs/toy.py's ToyReachEnv (see its docstring)."""

    # Class that builds one shard of vector envs.
    _target_: str = "rlplat.envs.toy.ToyReachEnv"
    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = 64
    # Coloured squares per scene; one of them is named by the instruction.
    num_objects: int = 3
    # Colour vocabulary of the squares and instructions.
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    # Observation keys produced: state, rgb or state+rgb.
    obs_mode: str = "state"
    # Side of the square RGB image in pixels.
    image_size: int = 64
    # Episode limit; reaching it sets truncated.
    max_episode_steps: int = 50
    # dense (progress + success bonus) or sparse (1 on success).
    reward_mode: str = "dense"
    # Arena units moved per unit action.
    action_scale: float = 0.1
    # Distance to the target that counts as success.
    success_radius: float = 0.1
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False


@dataclass
class ManiSkillEnvConfig:
    """Constructor arguments of envs/maniskill.py's ManiSkillEnv (see its docstring)."""

    # Class that builds one shard of vector envs.
    _target_: str = "rlplat.envs.maniskill.ManiSkillEnv"
    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = 16
    # A registered ManiSkill3 env id (PushCube-v1, PickCube-v1, StackCube-v1, ...).
    task: str = "PushCube-v1"
    # state, rgb or rgbd (state and proprio are always returned).
    obs_mode: str = "state"
    # ManiSkill controller (pd_ee_delta_pose, pd_joint_delta_pos, ...); null: the task's default.
    control_mode: str | None = "pd_ee_delta_pose"
    # sparse, dense or normalized_dense.
    reward_mode: str = "normalized_dense"
    # auto (physx_cuda with a GPU, else physx_cpu), physx_cpu or physx_cuda.
    sim_backend: str = "auto"
    # CPU path: async (subprocesses) or sync (all in the worker process).
    vector: str = "async"
    # CPU async path: scenes per subprocess, stepped in turn (1: a process per scene; a few
    # processes of several scenes use a small CPU better and need a fraction of the memory).
    envs_per_process: int = 1
    # Camera side in pixels (rgb modes).
    image_size: int = 128
    # ManiSkill sensor behind the image key.
    camera: str = "base_camera"
    # Sensor behind wrist_image (e.g. hand_camera with robot_uids=panda_wristcam); null: none.
    wrist_camera: str | None = None
    # ManiSkill robot id; null: the task's default.
    robot_uids: str | None = None
    # Episode limit; null: the task's registered limit.
    max_episode_steps: int | None = None
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False
    # Language instruction; null: envs/maniskill.py's table or the task docstring.
    instruction: str | None = None
    # Side of render() frames (episode videos) in state mode.
    render_size: int = 256
    # Start method of the async CPU vector (forkserver, spawn or fork).
    context: str | None = "forkserver"


@dataclass
class LiberoEnvConfig:
    """Constructor arguments of envs/libero.py's LiberoEnv (see its docstring)."""

    # Class that builds one shard of vector envs.
    _target_: str = "rlplat.envs.libero.LiberoEnv"
    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = 2
    # libero_spatial, libero_object, libero_goal, libero_10 or libero_90.
    suite: str = "libero_spatial"
    # Tasks the seeds cycle over; null: every task of the suite.
    task_ids: list[int] | None = None
    # Camera side in pixels (rendered at this size).
    image_size: int = 128
    # Also return wrist_image.
    wrist_camera: bool = True
    # Episode limit; null: the suite's official one (spatial 220, object 280, goal 300, 10 520, 90 400).
    max_episode_steps: int | None = None
    # No-op steps after each reset while objects settle.
    settle_steps: int = 10
    # async (subprocesses) or sync (all in the worker process).
    vector: str = "async"
    # async: scenes per subprocess, stepped in turn (1: a process per scene).
    envs_per_process: int = 1
    # Start method of the async vector (forkserver, spawn or fork).
    context: str | None = "forkserver"
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False


# --------------------------------------------------------------------------- preference


@dataclass
class OnlinePreferenceConfig:
    """Prompts, a score and tie rules for online preference tuning (envs/preference/online.py)."""

    # Class that builds the source.
    _target_: str = "rlplat.envs.preference.online.OnlinePreferences"
    # Prompt set (_target_ + arguments): train prompts, held-out eval prompts, maybe demonstrations.
    prompts: Any = field(default_factory=lambda: {"_target_": "rlplat.envs.preference.shapes.ShapesPrompts"})
    # Score source (_target_ + arguments), higher is better.
    score: Any = MISSING
    # Score gap at or below which a pair counts as a tie.
    tie_margin: float = 0.0
    # Tied pairs: drop (no gradient) or random (a fair coin labels them).
    ties: str = "drop"


# --------------------------------------------------------------------------- algo


@dataclass
class OptimConfig:
    """Adam settings shared by every algorithm."""

    # Learning rate.
    lr: float = 3e-4
    # Adam epsilon.
    eps: float = 1e-5
    # Linearly anneal the learning rate to 0 over trainer.total_steps.
    anneal_lr: bool = False
    # Clip the global gradient norm to this value.
    max_grad_norm: float = 0.5
    # Decoupled weight decay (AdamW; used by the text-to-image algorithms).
    weight_decay: float = 0.0


@dataclass
class PPOConfig:
    """Proximal Policy Optimization with GAE (rlplat/algos/ppo.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.ppo.PPO"
    # Env steps per env per iteration (rollout length T).
    rollout_steps: int = 50
    # Discount factor.
    gamma: float = 0.99
    # GAE lambda.
    gae_lambda: float = 0.95
    # Which episode ends bootstrap V(final observation): always (every end, as ManiSkill's PPO:
    # an episode that ends in success keeps the value of where it got) or truncated (only
    # time-limit ends; a terminal state is worth 0, the textbook MDP).
    bootstrap_at_done: str = "truncated"
    # Minibatches per epoch; num_envs * rollout_steps must divide evenly.
    num_minibatches: int = 4
    # Passes over each rollout.
    update_epochs: int = 4
    # Clip range of the probability ratio.
    clip_coef: float = 0.2
    # Clip range of the value update (null: no value clipping).
    vf_clip_coef: float | None = None
    # Weight of the entropy bonus.
    ent_coef: float = 0.0
    # Weight of the value loss.
    vf_coef: float = 0.5
    # Stop the update before a minibatch whose approx KL exceeds this (null: never).
    target_kl: float | None = None
    # Normalise advantages per minibatch.
    norm_adv: bool = True
    # Iterations at the start that train only the value loss (a fresh critic on a warm policy).
    critic_warmup_steps: int = 0
    # Re-score the rollout's log-probs with the training weights before the update, so the
    # first ratio is 1 up to float rounding (null: on when the weights are bf16 or fp16).
    recompute_old_logprobs: bool | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization on episode outcomes (rlplat/algos/grpo.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.grpo.GRPO"
    # Rollouts per group; the envs of a group share their initial state (same seed).
    group_size: int = 8
    # Outcome score of an episode: return (sum of rewards) or success (0/1).
    outcome: str = "return"
    # Discount inside the episode for outcome=return (1: plain sum; < 1 favours faster success).
    gamma: float = 1.0
    # Divide group-centred outcomes by the group std (false: Dr. GRPO style).
    std_normalize: bool = True
    # Drop groups whose outcomes are all equal (they carry no signal).
    filter_uniform_groups: bool = True
    # How the loss averages steps: step (every step the same; long, failed episodes outweigh
    # short successes) or episode (each episode weighs the same, its steps 1/length: GRPO's
    # per-sequence mean).
    loss_weighting: str = "step"
    # Weight of the KL penalty to the reference policy (0: no reference kept).
    kl_coef: float = 0.0
    # KL estimator: k1, k2 or k3.
    kl_kind: str = "k3"
    # Minibatches per epoch over the valid steps.
    num_minibatches: int = 4
    # Passes over each rollout.
    update_epochs: int = 4
    # Clip range of the probability ratio.
    clip_coef: float = 0.2
    # Weight of the entropy bonus.
    ent_coef: float = 0.0
    # Stop the epoch loop once approx KL exceeds this (null: never).
    target_kl: float | None = None
    # Re-score the rollout's log-probs with the training weights before the update, so the
    # first ratio is 1 up to float rounding (null: on when the weights are bf16 or fp16).
    recompute_old_logprobs: bool | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SFTConfig:
    """Behaviour cloning on the env's scripted expert (rlplat/algos/sft.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.sft.SFT"
    # Env steps per env per iteration (demonstration rows = num_envs x rollout_steps).
    rollout_steps: int = 50
    # Std of the Gaussian noise added to the executed expert action (the label stays clean).
    expert_noise: float = 0.3
    # Compute action statistics (q01/q99) from the first demonstrations and give them to the policy.
    compute_action_stats: bool = True
    # Name of those statistics (OpenVLA's unnorm_key); null: the env class name in lower case.
    stats_key: str | None = None
    # Minibatches per epoch; num_envs * rollout_steps must divide evenly.
    num_minibatches: int = 50
    # Passes over each batch of demonstrations.
    update_epochs: int = 1
    # Stop the epoch loop once approx KL exceeds this (null: never; unused by SFT).
    target_kl: float | None = None
    # Optimizer.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, max_grad_norm=1.0))


@dataclass
class D3POConfig:
    """D3PO on online pairs that share x_T (rlplat/algos/d3po.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.d3po.D3PO"
    # Prompts per iteration; each gets a pair of samples.
    batch_size: int = 16
    # Minibatches (optimizer steps) per epoch over the kept pairs.
    num_minibatches: int = 2
    # Passes over each iteration's pairs.
    update_epochs: int = 1
    # Share of the denoising steps trained per minibatch (drawn at random).
    timestep_fraction: float = 1.0
    # DPO temperature beta.
    beta: float = 0.1
    # Half-width of the clipped ratio band.
    clip_eps: float = 0.1
    # Reference log-probs: adapter (LoRA disabled, the pretrained model) or sampled (at sampling time).
    reference: str = "adapter"
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, eps=1e-8, max_grad_norm=1.0))


@dataclass
class DDPOConfig:
    """DDPO / GRPO for diffusion: PPO-clip on the denoising-step ratios (rlplat/algos/ddpo.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.ddpo.DDPO"
    # Prompts per iteration.
    batch_size: int = 8
    # Samples per prompt (the group of advantage=group).
    group_size: int = 4
    # per_prompt (DDPO's running per-prompt statistics) or group (GRPO: normalised within the group).
    advantage: str = "group"
    # Scores kept per prompt by the tracker (advantage=per_prompt).
    tracker_buffer_size: int = 32
    # Scores a prompt needs before its own statistics are used (advantage=per_prompt).
    tracker_min_count: int = 16
    # Minibatches (optimizer steps) per epoch.
    num_minibatches: int = 2
    # Passes over each iteration's samples.
    update_epochs: int = 1
    # Share of the denoising steps trained per minibatch (drawn at random).
    timestep_fraction: float = 1.0
    # Clip range of the step ratio (tiny: log-probs are means over elements).
    clip_range: float = 1e-4
    # Advantages are clipped to +- this.
    adv_clip_max: float = 5.0
    # Weight of the k3 KL to the adapter-disabled reference (needs LoRA; 0: none).
    kl_coef: float = 0.0
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, eps=1e-8, max_grad_norm=1.0))


@dataclass
class DiffusionSFTConfig:
    """Denoising-loss (pre)training on the source's demonstrations (rlplat/algos/diffusion_sft.py)."""

    # Class that implements the algorithm.
    _target_: str = "rlplat.algos.diffusion_sft.DiffusionSFT"
    # Images per optimizer step.
    batch_size: int = 64
    # Optimizer steps per iteration (fresh demonstrations each).
    num_minibatches: int = 50
    # Share of captions replaced by the empty prompt (trains the unconditional branch for guidance).
    cond_dropout: float = 0.1
    # Optimizer (AdamW).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, eps=1e-8, max_grad_norm=1.0))


# --------------------------------------------------------------------------- placement


@dataclass
class PlacementConfig:
    """Where roles run: device indices per role (GPUs, or CPU bundles without GPUs)."""

    # Name shown in logs.
    name: str = "colocated"
    # Bundles in the Ray placement group (GPUs when use_gpu, else CPU bundles).
    num_devices: int = 1
    # Reserve one GPU per bundle.
    use_gpu: bool = False
    # CPUs per bundle.
    cpus_per_device: float = 1.0
    # Role -> device spec ("0", "0-1", "0,2"); roles with equal specs share one worker group.
    roles: dict[str, str] = field(
        default_factory=lambda: {"env": "0", "rollout": "0", "actor": "0"}
    )
    # Env pipeline stages: K > 1 splits the envs into K groups stepped in turn, so one stage
    # simulates while the policy acts for another (pipelined rollout); 1: all envs step together.
    pipeline_stages: int = 1
    # Each env worker holds a replica of the rollout policy and runs whole rollouts itself: one
    # call per rollout instead of two per env step, for policies cheap next to the simulator
    # (MLP/CNN on CPU). Replicas get weights after every update; each samples from its own
    # stream, so the sampled actions depend on the number of env workers. Not with stages > 1.
    rollout_in_env: bool = False


# --------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl in the run dir."""

    # console (metrics.jsonl + progress) or wandb (also logs to Weights & Biases).
    backend: str = "console"
    # wandb mode: offline (default, no network) or online.
    mode: str = "offline"
    # wandb project name.
    project: str = "rlplat"
    # Print a progress line every this many iterations.
    log_every: int = 1
    # Show a live progress bar (rich) when stdout is a terminal.
    progress_bar: bool = True


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """The controller loop's schedule."""

    # Training iterations (rollout + update) to run.
    total_steps: int = 100
    # Evaluate every this many iterations (0: only at the end).
    eval_every: int = 20
    # Also evaluate before the first update (logged as step 0): the "before" of a fine-tuning run.
    eval_at_start: bool = False
    # Episodes per evaluation, run in rounds of eval_num_envs parallel episodes.
    eval_episodes: int = 64
    # Evaluation envs over all env workers (null: min(eval_episodes, env.num_envs)). Every
    # simulator env costs memory (a ManiSkill CPU env is a ~350 MB process), so this bounds it.
    eval_num_envs: int | None = None
    # Evaluation episodes run to the env's limit even after success, so eval/success_at_end
    # (success at the last step) is meaningful beside eval/success_once (success at any step).
    eval_ignore_terminations: bool = False
    # Seeds of the evaluation episodes: null draws them from the run seed; an int s uses
    # s, s+1, ... (LIBERO: 0 gives the official protocol's tasks x init states).
    eval_seed_start: int | None = None
    # Save a checkpoint every this many iterations (0: only at the end).
    checkpoint_every: int = 20
    # Keep this many newest checkpoints (0: keep all).
    keep_checkpoints: int = 2
    # Save an episode GIF of the final evaluation.
    save_video: bool = True
    # Torch threads per worker process (1 gives stable timings on small CPUs).
    torch_threads: int = 1


@dataclass
class WarmStartConfig:
    """An SFT phase that runs before the main algorithm when the policy has no init_from."""

    # SFT iterations before the main run (0: no warm start).
    steps: int = 0
    # Evaluate the warm-started policy every this many SFT iterations (0: only at the end).
    eval_every: int = 0
    # The SFT settings (conf/algo/sft.yaml's schema).
    algo: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class TrainConfig:
    """Top-level config of rlplat-train."""

    # Policy family (conf/policy).
    policy: Any = MISSING
    # Environment (conf/env); null for preference runs.
    env: Any = None
    # Preference source (conf/preference); null for environment runs.
    preference: Any = None
    # Algorithm (conf/algo).
    algo: Any = MISSING
    # Placement of roles on devices (conf/placement).
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    # Metrics backends (conf/logger).
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Controller schedule.
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Optional SFT phase before the main algorithm (writes <run dir>/warm_start, then init_from).
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    # Ray cluster: start a local one (address null) or connect (address=auto).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Run name used in the output path.
    name: str = "run"
    # Global seed; everything derives from it.
    seed: int = 0
    # false, true (latest checkpoint of this run dir or the newest run of this name), or a path.
    resume: Any = False


def package_file(module: str, relative: str) -> str:
    """Absolute path of ``relative`` inside an installed package (the ``rlplat.resource`` resolver).

    ``${rlplat.resource:rlplat.policies.openvla,assets/toy_sft}`` in a config names files shipped
    with rlplat (e.g. the quickstart's SFT checkpoint) wherever rlplat is installed.
    """
    from importlib.resources import files

    path = files(module).joinpath(relative)
    if not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{relative!r} is not shipped in package {module} (looked at {path})")
    return str(path)


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore and rlplat's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("rlplat.resource", package_file, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="policy", name="mlp_schema", node=MLPPolicyConfig)
    cs.store(group="policy", name="constant_schema", node=ConstantPolicyConfig)
    cs.store(group="policy", name="openvla_schema", node=OpenVLAPolicyConfig)
    cs.store(group="policy", name="diffusion_schema", node=DiffusionPolicyConfig)
    cs.store(group="env", name="toy_schema", node=ToyEnvConfig)
    cs.store(group="env", name="maniskill_schema", node=ManiSkillEnvConfig)
    cs.store(group="env", name="libero_schema", node=LiberoEnvConfig)
    cs.store(group="preference", name="online_schema", node=OnlinePreferenceConfig)
    cs.store(group="algo", name="ppo_schema", node=PPOConfig)
    cs.store(group="algo", name="grpo_schema", node=GRPOConfig)
    cs.store(group="algo", name="sft_schema", node=SFTConfig)
    cs.store(group="algo", name="d3po_schema", node=D3POConfig)
    cs.store(group="algo", name="ddpo_schema", node=DDPOConfig)
    cs.store(group="algo", name="diffusion_sft_schema", node=DiffusionSFTConfig)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``rlplat-train <overrides>`` would run, built outside a Hydra app.

    For tests, benchmarks and notebooks. Interpolations that read Hydra's runtime (the run
    name from the experiment choice) are resolved here, so the result stands on its own.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    with initialize_config_module("rlplat.conf", version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    name = cfg.name
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.name = name
    return cfg
