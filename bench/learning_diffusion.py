"""Learning benchmark for text-to-image preference tuning: D3PO and DDPO on the tiny model, 3 seeds.

    python bench/learning_diffusion.py                                  # 2 algos x 2 rewards x seeds 0 1 2
    python bench/learning_diffusion.py --seeds 0 --steps 4 --eval-images 16   # a quick look

Every run starts from the shipped pretrained tiny model (policies/diffusion/assets/shapes_base,
LoRA r4 on the UNet attention; ``--set policy.path=DIR`` starts from another export) with the
algorithm's preset for that reward (``PRESETS``) and is a full ``rlplat-train`` (in-process, own
local Ray) with an evaluation at step 0: the reward of ``--eval-images`` images of the 14
held-out captions, same seeds before and after, so "gain" is paired. Rewards:
``jpeg_compressibility`` (minus the JPEG size in kB) and ``shapes_fidelity`` (colour/count/shape
agreement with the caption, in [0, 1]). Prints a table (before, after, gain: mean +- std over
seeds) and writes bench/results/learning_diffusion.json; seed 0's before/after grids go next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rlplat.config import compose
from rlplat.logging import METRICS_FILE, read_metrics
from rlplat.train import run

# Shared by every run: quiet logs.
COMMON = ["name=bench_diffusion", "logger.progress_bar=false", "logger.log_every=1000"]
REWARDS = ("jpeg_compressibility", "shapes_fidelity")
# The shipped presets (conf/experiment/) per algorithm and reward: D3PO on JPEG takes more pairs and
# Adam steps per iteration (d3po_tiny_jpeg.yaml says why); DDPO uses one preset for both.
PRESETS = {
    "d3po": {"jpeg_compressibility": ["experiment=d3po_tiny_jpeg"], "shapes_fidelity": ["experiment=d3po_tiny"]},
    "ddpo": {reward: ["experiment=ddpo_tiny"] for reward in REWARDS},
}


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["samples"]), float(r["eval/reward"])) for r in read_metrics(run_dir / METRICS_FILE)
            if r.get("eval/reward") is not None]


def run_one(overrides: list[str], run_dir: Path) -> dict:
    cfg = compose([*COMMON, *overrides])
    t0 = time.perf_counter()
    run(cfg, run_dir)
    curve = eval_curve(run_dir)
    return {"before": curve[0][1], "after": curve[-1][1], "curve": curve, "wall_s": time.perf_counter() - t0,
            "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="iterations per run (default: the preset's)")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. algo.optim.lr=1e-3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learning_diffusion.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-diffusion-"))
    runs = []
    for reward in args.rewards:
        for algo in args.algos:
            for seed in args.seeds:
                overrides = [*PRESETS[algo][reward], f"preference={reward}", f"seed={seed}",
                             f"trainer.eval_episodes={args.eval_images}", *args.set]
                if args.steps is not None:
                    overrides += [f"trainer.total_steps={args.steps}", f"trainer.eval_every={args.steps}"]
                result = run_one(overrides, root / f"{algo}_{reward}_seed{seed}")
                runs.append({"algo": algo, "reward": reward, "seed": seed, **result})
                print(f"{algo} {reward} seed {seed}: {result['before']:.4f} -> {result['after']:.4f} "
                      f"({result['wall_s']:.0f} s)", flush=True)

    summary: dict[str, dict] = {}
    print(f"\n{'algo':<6} {'reward':<22} {'before':>18} {'after':>18} {'gain':>18} {'wall s/run':>11}")
    for reward in args.rewards:
        for algo in args.algos:
            mine = [r for r in runs if r["algo"] == algo and r["reward"] == reward]
            before = np.array([r["before"] for r in mine])
            after = np.array([r["after"] for r in mine])
            gain = after - before
            key = f"{algo}/{reward}"
            summary[key] = {
                "before_mean": float(before.mean()), "before_std": float(before.std()),
                "after_mean": float(after.mean()), "after_std": float(after.std()),
                "gain_mean": float(gain.mean()), "gain_std": float(gain.std()), "gains": gain.tolist(),
                # The claim: the mean gain exceeds the seed spread of the gains (and every seed gains).
                "improves_beyond_spread": bool(gain.mean() > gain.std() and (gain > 0).all()),
                "wall_s_mean": float(np.mean([r["wall_s"] for r in mine])),
            }
            print(f"{algo:<6} {reward:<22} {before.mean():>9.4f} +- {before.std():.4f} {after.mean():>9.4f} +- "
                  f"{after.std():.4f} {gain.mean():>+9.4f} +- {gain.std():.4f} {summary[key]['wall_s_mean']:>11.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grids = args.out.parent / "learning_diffusion_grids"
    for r in runs:
        if r["seed"] == args.seeds[0]:
            media = sorted((Path(r["run_dir"]) / "media").glob("eval_step_*.png"))
            for tag, grid in (("before", media[0]), ("after", media[-1])):
                grids.mkdir(parents=True, exist_ok=True)
                shutil.copy(grid, grids / f"{r['algo']}_{r['reward']}_{tag}.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "common": COMMON, "presets": PRESETS, "summary": summary,
                                    "runs": runs}, indent=2))
    print(f"wrote {args.out}; grids in {grids}")


if __name__ == "__main__":
    main()
