"""Learning benchmark: PPO with a state MLP on ManiSkill3 PushCube-v1 on CPU, success vs steps and time.

    python bench/learning_maniskill.py                       # seeds 0 1 2, the preset's 300 iterations
    python bench/learning_maniskill.py --seeds 0 --steps 20  # a quick look

Every run is ``rlplat-train experiment=maniskill_pushcube_ppo_mlp`` (in-process, own local Ray;
ManiSkill's PPO baseline shape: joint-delta control, normalized dense reward, gamma 0.8, 3x256
MLP) on the CPU simulator. The greedy success rate on fixed evaluation episodes is recorded every
``--eval-every`` iterations against env steps and wall time (the sum of the iterations' own
times, evaluations included). ManiSkill reports PushCube solved in under a minute on one GPU with
thousands of envs; this is the honest 2-core CPU curve. Prints a table and writes
bench/results/learning_maniskill.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rlplat.config import compose
from rlplat.logging import METRICS_FILE, read_metrics
from rlplat.train import run

COMMON = ["experiment=maniskill_pushcube_ppo_mlp", "name=bench_maniskill", "trainer.save_video=false",
          "logger.progress_bar=false", "logger.log_every=1000"]


def curve(run_dir: Path) -> list[dict]:
    """(env steps, wall seconds, success) at every evaluation of a run."""
    out, wall = [], 0.0
    for row in read_metrics(run_dir / METRICS_FILE):
        wall += float(row.get("perf/iteration_s", 0.0))
        if row.get("eval/success_rate") is not None:
            out.append({"env_steps": int(row["env_steps"]), "wall_s": wall, "success": float(row["eval/success_rate"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="iterations per run (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learning_maniskill.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-maniskill-"))
    runs = []
    for seed in args.seeds:
        overrides = [*COMMON, f"seed={seed}", f"trainer.eval_every={args.eval_every}",
                     f"trainer.eval_episodes={args.eval_episodes}", *args.set]
        if args.steps is not None:
            overrides.append(f"trainer.total_steps={args.steps}")
        t0 = time.perf_counter()
        run(compose(overrides), root / f"seed{seed}")
        points = curve(root / f"seed{seed}")
        runs.append({"seed": seed, "curve": points, "wall_s": time.perf_counter() - t0})
        print(f"seed {seed}: " + ", ".join(f"{p['env_steps']}: {p['success']:.2f}" for p in points)
              + f" ({runs[-1]['wall_s']:.0f} s)", flush=True)

    # Evaluation points line up across seeds (same schedule): mean +- std per point.
    table = []
    for i, point in enumerate(runs[0]["curve"]):
        success = np.array([r["curve"][i]["success"] for r in runs])
        wall = np.array([r["curve"][i]["wall_s"] for r in runs])
        table.append({"env_steps": point["env_steps"], "wall_s_mean": float(wall.mean()),
                      "success_mean": float(success.mean()), "success_std": float(success.std())})
    print(f"\n{'env steps':>10} {'wall s':>8} {'success':>16}")
    for row in table:
        print(f"{row['env_steps']:>10} {row['wall_s_mean']:>8.0f} {row['success_mean']:>9.3f} +- {row['success_std']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "common": COMMON, "table": table, "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
