"""A toy sweep through Hydra's basic launcher and through rlplat's Ray launcher: wall time and
the report each gives.

    python bench/sweep.py                       # 4 learning rates x 3 seeds of toy_mlp, both launchers
    python bench/sweep.py --lrs 3e-4 1e-3 --seeds 0 --steps 2   # smoke run

Each launcher runs the same sweep (``rlplat-train -m experiment=toy_mlp algo.optim.lr=... seed=...``)
in its own folder: the basic launcher one job after another in one process (one Ray for all),
the Ray launcher as Ray tasks, as many at once as their placements fit on the local Ray
(``--cpus``, each job's placement one CPU bundle). Then ``rlplat-report`` summarises each sweep;
their tables should agree (same seeds, same configs: the runs are deterministic per seed).
Writes bench/results/sweep.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlplat.report import report

LAUNCHERS = {
    "basic": [],
    "rlplat_ray": ["hydra/launcher=rlplat_ray"],
}


def sweep(launcher: str, lrs: list[str], seeds: list[int], steps: int, cpus: int, folder: Path) -> dict:
    args = ["-m", "experiment=toy_mlp", f"algo.optim.lr={','.join(lrs)}", f"seed={','.join(map(str, seeds))}",
            f"trainer.total_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}", "trainer.save_video=false",
            f"hydra.sweep.dir={folder}", *LAUNCHERS[launcher]]
    if launcher == "rlplat_ray":
        args.append(f"hydra.launcher.num_cpus={cpus}")
    else:
        args.append(f"cluster.num_cpus={cpus}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = report([folder], out=folder)
    return {"launcher": launcher, "wall_s": wall, "jobs": len(lrs) * len(seeds), "folder": str(folder),
            "metric": result["metric"], "table": result["table"], "markdown": result["markdown"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", nargs="+", default=["1e-4", "3e-4", "1e-3", "3e-3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="iterations per job (64 envs x 50 steps each)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-sweep-"))
    results = [sweep(name, args.lrs, args.seeds, args.steps, args.cpus, root / name) for name in args.launchers]
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "runs": results}
    if len(results) == 2:
        summary["speedup_ray_vs_basic"] = results[0]["wall_s"] / results[1]["wall_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    print(f"\n{'launcher':<12} {'jobs':>5} {'wall s':>8} {'s / job':>8}")
    for r in results:
        print(f"{r['launcher']:<12} {r['jobs']:>5} {r['wall_s']:>8.1f} {r['wall_s'] / r['jobs']:>8.1f}")
    if "speedup_ray_vs_basic" in summary:
        print(f"Ray launcher vs basic: {summary['speedup_ray_vs_basic']:.2f}x")
    for r in results:
        print(f"\n{r['launcher']} report:\n{r['markdown']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
