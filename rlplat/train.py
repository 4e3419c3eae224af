"""``rlplat-train``: compose the Hydra config, start (or join) Ray, run the controller loop.

With no arguments it runs ``experiment=quickstart``. Examples::

    rlplat-train algo=grpo
    rlplat-train -m seed=0,1,2 trainer.total_steps=20
    rlplat-train hydra.run.dir=outputs/my_run resume=true
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlplat.config import register_configs

register_configs()


def offline_defaults() -> None:
    """No hub, no network, nothing in $HOME unless the user asks for it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs one training job in ``run_dir`` (also used by tests and benchmarks)."""
    from hydra.errors import InstantiationException

    from rlplat.loops.embodied import EmbodiedLoop, check_config
    from rlplat.runtime.cluster import ClusterConfig, ray_session

    offline_defaults()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Before Ray starts, so a bad config fails in seconds.
        algo = check_config(cfg)
    except (ValueError, InstantiationException) as err:
        raise SystemExit(f"config error: {err}") from None
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    cluster = ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True))
    with ray_session(cluster):
        loop = EmbodiedLoop(cfg, run_dir, algo)
        try:
            return loop.run()
        finally:
            loop.shutdown()


@hydra.main(version_base="1.3", config_path="pkg://rlplat.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final eval success rate (for sweepers)."""
    metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return float(metrics.get("eval/success_rate", 0.0))


if __name__ == "__main__":
    sys.exit(main())
