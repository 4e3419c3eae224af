"""Learning benchmark: success rate vs env steps on the toy reach task, PPO and GRPO, 3 seeds.

    python bench/learning_toy.py                      # both algorithms, seeds 0 1 2
    python bench/learning_toy.py --algos ppo --seeds 0

Each (algo, seed) is a full ``rlplat-train`` run (in-process, own local Ray) with periodic
deterministic evaluation on 64 fixed-seed episodes. Prints a table of eval success (mean +- std
over seeds) per evaluation point and writes everything to bench/results/learning_toy.json.
Run with OMP_NUM_THREADS=1 for stable timings.
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

# Per-algorithm overrides on top of the state-MLP preset.
ALGO_OVERRIDES = {
    "ppo": ["experiment=toy_mlp", "algo=ppo", "trainer.total_steps=60", "trainer.eval_every=10"],
    "grpo": ["experiment=toy_mlp", "algo=grpo", "trainer.total_steps=150", "trainer.eval_every=10"],
}


def run_one(algo: str, seed: int, out_root: Path) -> dict:
    run_dir = out_root / f"{algo}_seed{seed}"
    cfg = compose([*ALGO_OVERRIDES[algo], f"seed={seed}", "name=bench", "trainer.save_video=false",
                   "logger.progress_bar=false", "logger.log_every=1000"])
    t0 = time.perf_counter()
    final = run(cfg, run_dir)
    wall = time.perf_counter() - t0
    curve = [(r["env_steps"], r["eval/success_rate"]) for r in read_metrics(run_dir / METRICS_FILE)
             if r.get("eval/success_rate") is not None]
    return {"algo": algo, "seed": seed, "wall_s": wall, "final_success": final["eval/success_rate"],
            "curve": curve, "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo"], choices=sorted(ALGO_OVERRIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learning_toy.json")
    args = parser.parse_args()

    out_root = Path(tempfile.mkdtemp(prefix="rlplat-bench-"))
    results = [run_one(algo, seed, out_root) for algo in args.algos for seed in args.seeds]

    print(f"\n{'algo':<6} {'env steps':>10} {'eval success (mean +- std over seeds)':>40}")
    summary = {}
    for algo in args.algos:
        runs = [r for r in results if r["algo"] == algo]
        steps = [s for s, _ in runs[0]["curve"]]
        table = []
        for i, s in enumerate(steps):
            vals = np.array([r["curve"][i][1] for r in runs])
            table.append({"env_steps": s, "mean": float(vals.mean()), "std": float(vals.std()), "values": vals.tolist()})
            print(f"{algo:<6} {s:>10,} {vals.mean():>30.3f} +- {vals.std():.3f}")
        summary[algo] = {
            "curve": table,
            "final_mean": table[-1]["mean"],
            "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
        }
        print(f"{algo:<6} final {table[-1]['mean']:.3f}, wall {summary[algo]['wall_s_mean']:.0f} s per run\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
