"""The top-level config schema of ``rlplat-train`` and the plumbing that composes it.

The schemas of the parts (algorithms, envs, policies, preference sources) live beside the parts
and register themselves (``rlplat.registry``); each YAML in ``conf/<group>/`` starts with
``defaults: [<name>_schema, _self_]`` and holds only what its preset changes, so OmegaConf checks
it against that dataclass: a misspelt key or a value of the wrong type stops the run at
composition time with a message naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

import rlplat.algos.sft  # noqa: F401  (registers the SFT schema below)
from rlplat import registry
from rlplat.registry import Check, checked
from rlplat.runtime.cluster import ClusterConfig
from rlplat.runtime.placement import PlacementConfig

#: The SFT schema with its _target_ (the warm start's algo).
SFTNode = registry.get("algo", "sft").node()

# --------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl in the run dir."""

    # console (metrics.jsonl + progress) or wandb (also logs to Weights & Biases).
    backend: str = checked("console", choices=("console", "wandb"))
    # wandb mode: offline (default, no network) or online.
    mode: str = checked("offline", choices=("offline", "online", "disabled"))
    # wandb project name.
    project: str = "rlplat"
    # Print a progress line every this many iterations.
    log_every: int = checked(1, ge=1)
    # Show a live progress bar (rich) when stdout is a terminal.
    progress_bar: bool = True


# --------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class StopWhenCheck(Check):
    """``trainer.stop_when``'s syntax (``rlplat.loops.skeleton.parse_stop_when``)."""

    def problem(self, value: Any) -> str | None:
        from rlplat.loops.skeleton import STOP_SYNTAX, parse_stop_when

        try:
            parse_stop_when(value)
        except ValueError:
            return STOP_SYNTAX
        return None


@dataclass
class TrainerConfig:
    """The controller loop's schedule."""

    # Training iterations (rollout + update) to run.
    total_steps: int = checked(100, ge=1)
    # Evaluate every this many iterations (0: only at the end).
    eval_every: int = checked(20, ge=0)
    # Also evaluate before the first update (logged as step 0): the "before" of a fine-tuning run.
    eval_at_start: bool = False
    # Episodes per evaluation, run in rounds of eval_num_envs parallel episodes.
    eval_episodes: int = checked(64, ge=1)
    # Evaluation envs over all env workers (null: min(eval_episodes, env.num_envs)). Every
    # simulator env costs memory (a ManiSkill CPU env is a ~350 MB process), so this bounds it.
    eval_num_envs: int | None = checked(None, ge=1)
    # Evaluation episodes run to the env's limit even after success, so eval/success_at_end
    # (success at the last step) is meaningful beside eval/success_once (success at any step).
    eval_ignore_terminations: bool = False
    # Seeds of the evaluation episodes: null draws them from the run seed; an int s uses
    # s, s+1, ... (LIBERO: 0 gives the official protocol's tasks x init states).
    eval_seed_start: int | None = None
    # Save a checkpoint every this many iterations (0: only at the end).
    checkpoint_every: int = checked(20, ge=0)
    # Keep this many newest checkpoints (0: keep all); a damaged newest one falls back to the previous.
    keep_last: int = checked(3, ge=0)
    # Dead workers (a killed or crashed EnvWorker, policy worker, simulator) are recreated and
    # restored from the last checkpoint up to this many times per run (0: the run stops, naming
    # the worker and printing the resume command). Restarts are logged as faults/restarts.
    max_restarts: int = checked(0, ge=0)
    # Save an episode GIF of the final evaluation.
    save_video: bool = True
    # Torch threads per worker process (1 gives stable timings on small CPUs).
    torch_threads: int = checked(1, ge=1)
    # Stop early, with a checkpoint, once a logged metric crosses a bound: "eval/fidelity<0.8",
    # several joined by " or " ("eval/fidelity<0.8 or perf/elapsed_s>1800"); null: never.
    stop_when: str | None = field(default=None, metadata={"check": StopWhenCheck()})
    # Wall-clock budget in seconds (iterations and evaluations, counted across resumes): the run
    # ends at the first iteration that reaches it, as it would at total_steps (final evaluation,
    # checkpoint), and algo.optim.anneal_lr anneals over whichever of the two ends the run first.
    # Null: total_steps alone.
    time_budget_s: float | None = checked(None, gt=0)


@dataclass
class WarmStartConfig:
    """An SFT phase that runs before the main algorithm when the policy has no init_from."""

    # SFT iterations before the main run (0: no warm start).
    steps: int = checked(0, ge=0)
    # Evaluate the warm-started policy every this many SFT iterations (0: only at the end).
    eval_every: int = checked(0, ge=0)
    # The SFT settings (conf/algo/sft.yaml's schema).
    algo: SFTNode = field(default_factory=SFTNode)


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
    # false, true (the newest intact checkpoint of this run dir), or a path.
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


def run_name() -> str:
    """The run's default name (the ``rlplat.run_name`` resolver): the chosen experiment, or "run"
    without one (``~experiment``). Read from the job's Hydra config, so it resolves in a single
    run and in every job of a multirun alike (a swept experiment names each job by its own)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("the run name is known once a job's Hydra config is set; set name=... to name it yourself")
    return HydraConfig.get().runtime.choices.get("experiment") or "run"


def register_configs() -> None:
    """Registers the top-level schema, every registered part's schema and rlplat's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("rlplat.resource", package_file, replace=True)
    OmegaConf.register_new_resolver("rlplat.run_name", run_name, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    registry.load_parts()
    for part in registry.parts():
        cs.store(group=part.kind, name=f"{part.name}_schema", node=part.node())


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
