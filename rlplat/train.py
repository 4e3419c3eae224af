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

from rlplat import registry
from rlplat.config import register_configs

register_configs()


def offline_defaults() -> None:
    """No hub, no network, nothing in $HOME unless the user asks for it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs one training job in ``run_dir`` (also used by tests and benchmarks): an env run
    (policy x env x algorithm) or a preference run (policy x preference source x algorithm)."""
    from hydra.errors import InstantiationException

    from rlplat.loops.embodied import check_config, embodied_run
    from rlplat.loops.preference import check_preference_config, preference_run
    from rlplat.runtime.cluster import ClusterConfig, ray_session

    offline_defaults()
    has_env, has_preference = cfg.get("env") is not None, cfg.get("preference") is not None
    if has_env == has_preference:
        raise SystemExit(
            f"config error: env={cfg.env._target_} and preference={cfg.preference._target_} are both set; a run has "
            f"one of them: drop the env with ~env on the command line (in an experiment: '- override /env: null')"
            if has_env else "config error: the run has neither an env nor a preference source: choose env=<name> "
                            "(e.g. env=toy) or preference=<name> (e.g. preference=shapes_fidelity)")
    check, build = (check_preference_config, preference_run) if has_preference else (check_config, embodied_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    warm_cfg = warm_start_config(cfg, run_dir) if has_env else None
    try:
        # Before Ray starts, so a bad config fails in seconds.
        registry.refuse_renamed(cfg)
        algo = check(cfg)
        warm_algo = check_config(warm_cfg) if warm_cfg is not None else None
    except (ValueError, FileNotFoundError, InstantiationException) as err:
        raise SystemExit(f"config error: {err}") from None
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    with ray_session(ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True))):
        if warm_cfg is not None:
            warm_dir = run_dir / WARM_START_DIR
            if not (warm_dir / "checkpoints" / f"step_{warm_cfg.trainer.total_steps}").is_dir():
                print(f"warm start: {warm_cfg.trainer.total_steps} SFT iterations in {warm_dir}")
                run_to_end(embodied_run(warm_cfg, warm_dir, warm_algo))
            cfg = copy.deepcopy(cfg)
            cfg.policy.init_from = str(warm_dir)
        return run_to_end(build(cfg, run_dir, algo))


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
        raise SystemExit(
            f"config error: warm_start.steps={ws.steps} needs a policy that can start from a "
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


@hydra.main(version_base="1.3", config_path="pkg://rlplat.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final eval success rate, or eval reward of preference runs (for sweepers)."""
    metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return float(metrics.get("eval/success_rate", metrics.get("eval/reward", 0.0)))


if __name__ == "__main__":
    sys.exit(main())
