"""``rlplat-eval``: evaluate a checkpoint of a run on fixed-seed episodes.

    rlplat-eval outputs/quickstart/2026-11-28_10-00-00            # newest checkpoint of a run
    rlplat-eval outputs/.../checkpoints/step_60 --episodes 256 --video eval.gif

Rebuilds the run from its saved ``config.yaml``, loads the policy, and prints (and writes
``eval.json`` next to the checkpoint) the success rate, mean return and episode length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from rlplat import checkpoint
from rlplat.train import offline_defaults


def main(argv: list[str] | None = None) -> None:
    """Console entry point (see the module docstring)."""
    evaluate_checkpoint(argv)


def evaluate_checkpoint(argv: list[str] | None = None) -> dict[str, float]:
    """Parses ``argv``, evaluates the checkpoint, writes eval.json and returns the metrics."""
    parser = argparse.ArgumentParser(prog="rlplat-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run dir (newest checkpoint) or a checkpoints/step_N folder")
    parser.add_argument("--episodes", type=int, default=None, help="episodes (default: the run's trainer.eval_episodes)")
    parser.add_argument("--video", type=Path, default=None, help="write a GIF of env 0 here")
    parser.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    args = parser.parse_args(argv)

    folder = checkpoint.find_resume_checkpoint(args.path, Path(args.path))
    run_dir = folder.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise SystemExit(f"{config_file} is missing: rlplat-eval needs the run's saved config")
    cfg = OmegaConf.load(config_file)
    cfg.resume = False
    if args.episodes is not None:
        cfg.trainer.eval_episodes = args.episodes
    if args.seed is not None:
        cfg.seed = args.seed

    offline_defaults()
    from rlplat.loops.embodied import embodied_run
    from rlplat.runtime.cluster import ClusterConfig, ray_session

    with ray_session(ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True))):
        loop = embodied_run(cfg, Path(tempfile.mkdtemp(prefix="rlplat-eval-")))
        try:
            loop.load_policy(folder)
            metrics = loop.collector.evaluate(video_path=args.video)
        finally:
            loop.shutdown()
    metrics = {"checkpoint": str(folder), "episodes": cfg.trainer.eval_episodes, **metrics}
    (folder / "eval.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        print(f"{key}: {value}")
    return metrics


if __name__ == "__main__":
    main()
