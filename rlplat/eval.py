"""``rlplat-eval``: evaluate a checkpoint of a run, of any kind the platform trains.

    rlplat-eval outputs/quickstart/2026-11-28_10-00-00            # newest intact checkpoint of a run
    rlplat-eval outputs/.../checkpoints/step_60 --episodes 256 --video eval.gif
    rlplat-eval outputs/d3po_tiny/...                             # text-to-image: held-out prompts

Rebuilds the run from its saved ``config.yaml`` (validated like a training run), loads the
policy and evaluates it: an env run on fixed-seed episodes (success rate, return, episode length;
``--video`` writes a GIF), a text-to-image run on its held-out prompts (mean reward, and the image
grid saved as ``eval_samples.png`` next to the checkpoint). Prints the metrics and writes
``eval.json`` next to the checkpoint. Nothing else is left behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from rlplat import checkpoint
from rlplat.train import offline_defaults


def main(argv: list[str] | None = None) -> None:
    """Console entry point (see the module docstring)."""
    evaluate_checkpoint(argv)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1 (episodes, or images for a text-to-image run)")
    return value


def evaluate_checkpoint(argv: list[str] | None = None) -> dict[str, float]:
    """Parses ``argv``, evaluates the checkpoint, writes eval.json and returns the metrics."""
    parser = argparse.ArgumentParser(prog="rlplat-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run dir (its newest intact checkpoint) or a checkpoints/step_N folder")
    parser.add_argument("--episodes", type=_at_least_one, default=None,
                        help="episodes, or images of the held-out prompts (default: the run's trainer.eval_episodes)")
    parser.add_argument("--video", type=Path, default=None, help="env runs: write a GIF of env 0 here")
    parser.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    args = parser.parse_args(argv)

    try:
        folder = checkpoint.find_resume_checkpoint(str(args.path), args.path)
    except FileNotFoundError:
        parser.error(f"{args.path} is neither a run dir (config.yaml + an intact checkpoints/step_N) nor a "
                     f"checkpoint folder (trainer_state.pt); pass one of those")
    run_dir = folder.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        parser.error(f"{config_file} is missing: rlplat-eval rebuilds the run from its saved config; pass a "
                     f"checkpoint inside a run dir written by rlplat-train")
    cfg = OmegaConf.load(config_file)
    cfg.resume, cfg.warm_start.steps = False, 0
    if args.episodes is not None:
        cfg.trainer.eval_episodes = args.episodes
    if args.seed is not None:
        cfg.seed = args.seed
    is_preference = cfg.get("preference") is not None
    if args.video is not None and is_preference:
        parser.error("--video is for env runs; a text-to-image run's images go to eval_samples.png")

    offline_defaults()
    from rlplat.loops.embodied import embodied_run
    from rlplat.loops.preference import preference_run
    from rlplat.runtime.cluster import ClusterConfig, ray_session
    from rlplat.validate import ConfigError, validate

    scratch = Path(tempfile.mkdtemp(prefix="rlplat-eval-"))
    try:
        try:
            checked = validate(cfg, scratch)
        except ConfigError as err:
            raise SystemExit(f"rlplat-eval: the run's config ({config_file}) no longer validates: {err}") from None
        with ray_session(ClusterConfig(**OmegaConf.to_container(cfg.cluster, resolve=True))):
            loop = (preference_run if is_preference else embodied_run)(cfg, scratch, checked.algo)
            try:
                loop.load_policy(folder)
                if is_preference:
                    metrics = loop.collector.evaluate(0, last=True)
                    grid = next((scratch / "media").glob("eval_step_*.png"), None)
                    if grid is not None:
                        shutil.copy(grid, folder / "eval_samples.png")
                        metrics["samples"] = str(folder / "eval_samples.png")
                else:
                    metrics = loop.collector.evaluate(video_path=args.video)
            finally:
                loop.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics = {"checkpoint": str(folder), "episodes": cfg.trainer.eval_episodes, **metrics}
    (folder / "eval.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        print(f"{key}: {value}")
    return metrics


if __name__ == "__main__":
    main()
