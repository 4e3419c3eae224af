"""``rlplat-train``: compose the Hydra config, start (or join) Ray, run the controller loop.

With no arguments it runs ``experiment=quickstart``. Examples::

    rlplat-train algo=grpo
    rlplat-train -m seed=0,1,2 trainer.total_steps=20
    rlplat-train hydra.run.dir=outputs/my_run resume=true
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlplat.config import register_configs

register_configs()


def cache_dir() -> Path:
    """Where runs keep tool state that is not theirs (matplotlib's font list, wandb's service
    logs): ``$RLPLAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlplat``, else a per-user folder in the
    system temp dir; never the home directory."""
    import tempfile

    if os.environ.get("RLPLAT_CACHE_DIR"):
        return Path(os.environ["RLPLAT_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "rlplat"
    return Path(tempfile.gettempdir()) / f"rlplat-cache-{os.getuid()}"


def offline_defaults() -> None:
    """No hub, no network, nothing in $HOME unless the user asks for it (each variable already
    set is kept: set WANDB_MODE=online or HF_HUB_OFFLINE=0 to go online)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cache = cache_dir()
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    for var, sub in (("WANDB_CACHE_DIR", "wandb"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        os.environ.setdefault(var, str(cache / sub))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs one training job in ``run_dir`` (also used by tests and benchmarks): an env run
    (policy x env x algorithm) or a preference run (policy x preference source x algorithm)."""
    from rlplat.loops.embodied import embodied_run
    from rlplat.loops.preference import preference_run
    from rlplat.runtime.cluster import ClusterConfig, ray_session
    from rlplat.validate import ConfigError, validate

    offline_defaults()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        checked = validate(cfg, run_dir)  # before Ray starts, so a bad config fails in well under a second
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    build = preference_run if cfg.get("preference") is not None else embodied_run
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    with ray_session(ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True))):
        warm_cfg = checked.warm_cfg
        if warm_cfg is not None:
            warm_dir = run_dir / WARM_START_DIR
            if not (warm_dir / "checkpoints" / f"step_{warm_cfg.trainer.total_steps}").is_dir():
                print(f"warm start: {warm_cfg.trainer.total_steps} SFT iterations in {warm_dir}")
                run_to_end(embodied_run(warm_cfg, warm_dir, checked.warm_algo))
            cfg = copy.deepcopy(cfg)
            cfg.policy.init_from = str(warm_dir)
        return run_restarting(cfg, run_dir, build, checked)


def run_restarting(cfg: DictConfig, run_dir: Path, build: Any, checked: Any) -> dict:
    """``build(cfg, run_dir, checked.algo)`` run to the end from ``checked.resume_from`` (what
    ``validate`` found and verified); when a worker dies, the workers are rebuilt and restored
    from the run's newest checkpoint, up to ``trainer.max_restarts`` times, else the run stops
    naming the worker and the resume command."""
    from rlplat import checkpoint
    from rlplat.logging import METRICS_FILE, truncate_metrics
    from rlplat.runtime.worker_group import WorkerDied
    from rlplat.validate import validate

    restarts = 0
    while True:
        try:
            loop = build(cfg, run_dir, checked.algo)
            loop.restarts, loop.resume_from = restarts, checked.resume_from
            return run_to_end(loop)
        except WorkerDied as err:
            limit = int(cfg.trainer.max_restarts)
            if restarts >= limit:
                raise SystemExit(f"error: {err}\nThe run stopped at its last checkpoint; "
                                 f"{checkpoint.resume_command(run_dir)} (trainer.max_restarts=N restarts dead "
                                 f"workers by itself)") from None
            restarts += 1
            cfg = copy.deepcopy(cfg)
            if checkpoint.list_checkpoints(run_dir):
                cfg.resume = str(run_dir)
            elif not cfg.resume and (run_dir / METRICS_FILE).exists():
                truncate_metrics(run_dir / METRICS_FILE, run_dir / METRICS_FILE, -1)  # starts over from step 0
            print(f"warning: {err}\nrestart {restarts} of trainer.max_restarts={limit}: rebuilding the workers "
                  f"from {'the newest checkpoint' if cfg.resume else 'the start'}", flush=True)
            checked = validate(cfg, run_dir)


def run_to_end(loop: Any) -> dict:
    """``loop.run()``, then its workers are stopped whatever happened."""
    try:
        return loop.run()
    finally:
        loop.shutdown()


WARM_START_DIR = "warm_start"


def warm_start_config(cfg: DictConfig, run_dir: Path) -> DictConfig | None:
    """The SFT run that precedes ``cfg`` (``warm_start.steps`` > 0, no ``policy.init_from``), or None."""
    ws = cfg.warm_start
    if ws.steps <= 0 or cfg.policy.get("init_from"):
        return None
    if "init_from" not in cfg.policy:
        raise ValueError(
            f"warm_start.steps={ws.steps} needs a policy that can start from a "
            f"checkpoint (policy.init_from); this policy has none, set warm_start.steps=0"
        )
    warm = copy.deepcopy(cfg)
    warm.algo = ws.algo
    warm.trainer.total_steps = ws.steps
    warm.trainer.eval_every = ws.eval_every
    warm.trainer.checkpoint_every = 0
    warm.trainer.save_video = False
    # Resume a half-finished warm start of this run dir (never another run's).
    warm.resume = str(run_dir / WARM_START_DIR) if (run_dir / WARM_START_DIR / "checkpoints").is_dir() else False
    return warm


def keep_ray_for_the_sweep(cfg: DictConfig) -> None:
    """In a multirun with Hydra's basic launcher (jobs one after another in this process), start
    the local Ray (or join the cluster) once, with the first job's ``cluster`` settings, and keep
    it for every job: each job then only places its own workers (its placement group is removed
    when it ends) instead of paying Ray's start-up. Other launchers run each job elsewhere."""
    from hydra.types import RunMode

    from rlplat.runtime.cluster import ClusterConfig, init_ray_until_exit

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not str(hydra_cfg.launcher.get("_target_", "")).endswith(".BasicLauncher"):
        return
    init_ray_until_exit(ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True)))


@hydra.main(version_base="1.3", config_path="pkg://rlplat.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final eval success rate, or eval reward of preference runs (for sweepers)."""
    offline_defaults()
    keep_ray_for_the_sweep(cfg)
    metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return float(metrics.get("eval/success_rate", metrics.get("eval/reward", 0.0)))


def main() -> Any:
    """``rlplat-train``: our --help and the group-option check, then Hydra."""
    from rlplat.options import check_group_choices, help_text

    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(help_text(), end="")
        return 0
    problem = check_group_choices(args)
    if problem is not None:
        raise SystemExit(f"config error: {problem}")
    register_launchers()
    return hydra_main()


def register_launchers() -> None:
    """Makes ``hydra/launcher=rlplat_ray`` known to Hydra however rlplat is installed (Hydra finds
    plugins by listing the ``hydra_plugins`` folders, which an editable install does not show)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.rlplat_launchers.ray_launcher import RlplatRayLauncher

    Plugins.instance().register(RlplatRayLauncher)


if __name__ == "__main__":
    sys.exit(main())
