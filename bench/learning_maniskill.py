"""Learning benchmark: PPO with a state MLP on ManiSkill3 on CPU, success vs env steps and time.

    python bench/learning_maniskill.py                        # PushCube preset, seeds 0 1 2
    python bench/learning_maniskill.py --seeds 0 --steps 40   # a quick look
    python bench/learning_maniskill.py --label truncated --seeds 0 --set algo.bootstrap_at_done=truncated
    python bench/learning_maniskill.py --preset maniskill_pickcube_ppo_mlp --seeds 0

Every run is ``rlplat-train experiment=<preset>`` (in-process, own local Ray) on the CPU
simulator. Each evaluation (greedy, fixed seeds) records ``success_once`` (succeeded at any
step; the headline), ``success_at_end`` (successful at the last step, episodes run to the limit
under ``trainer.eval_ignore_terminations``) and the return, against env steps and wall time (the
sum of the iterations' own times, evaluations included). The training diagnostics of every
iteration (explained variance, approx KL, clip fraction, KL stops, entropy, grad norm) are kept
per run. Results are stored under ``--label`` in ``bench/results/learning_<preset>.json`` (other
labels in the file are kept, so A/B variants sit side by side) and printed as a table with the
acceptance summary: the first evaluation at or above ``--target`` per seed and whether every
later one stays there.
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

COMMON = ["trainer.eval_at_start=true", "trainer.save_video=false", "logger.progress_bar=false", "logger.log_every=1000"]
EVAL_KEYS = {"success_once": "eval/success_once", "success_at_end": "eval/success_at_end",
             "return": "eval/episode_return"}
TRAIN_KEYS = ("explained_variance", "approx_kl", "clipfrac", "kl_stop", "update_fraction", "entropy",
              "grad_norm", "value_loss", "return_mean", "value_mean", "episode_return", "success_rate", "lr")


def curve(run_dir: Path) -> tuple[list[dict], dict[str, list[float]]]:
    """Evaluation points (env steps, wall seconds, success, return) and per-iteration diagnostics."""
    points, wall = [], 0.0
    train: dict[str, list[float]] = {key: [] for key in TRAIN_KEYS}
    for row in read_metrics(run_dir / METRICS_FILE):
        wall += float(row.get("perf/iteration_s", 0.0))
        if row["step"] > 0:
            for key in TRAIN_KEYS:
                train[key].append(row.get(f"train/{key}"))
        if row.get("eval/success_once") is not None:
            points.append({"env_steps": int(row["env_steps"]), "wall_s": wall,
                           **{name: float(row[key]) for name, key in EVAL_KEYS.items()}})
    return points, train


def summarize(points: list[dict], target: float, by_steps: int) -> dict:
    """First evaluation with success_once >= target, and whether every later one holds it."""
    first = next((p for p in points if p["success_once"] >= target), None)
    later = [p["success_once"] for p in points if first is not None and p["env_steps"] >= first["env_steps"]]
    after_by = [p["success_once"] for p in points if p["env_steps"] >= by_steps]
    return {
        "first_env_steps": first["env_steps"] if first else None,
        "first_wall_s": first["wall_s"] if first else None,
        "min_after_first": min(later) if later else None,
        "min_from_by_steps": min(after_by) if after_by else None,
        "passes": bool(first and first["env_steps"] <= by_steps and after_by and min(after_by) >= target),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maniskill_pushcube_ppo_mlp", help="conf/experiment preset")
    parser.add_argument("--label", default="preset", help="name of this variant in the JSON")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="iterations per run (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=None, help="iterations (default: the preset's)")
    parser.add_argument("--eval-episodes", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.9, help="success_once to reach and hold")
    parser.add_argument("--by-steps", type=int, default=100_000, help="env steps by which to reach it")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="run nothing: join variant --label of these JSON files (invocations run side by side) into --out")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"learning_{args.preset.removesuffix('_ppo_mlp')}.json"
    if args.merge:
        merge(args.merge, args.label, out)
        return

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-maniskill-"))
    runs = []
    for seed in args.seeds:
        overrides = [f"experiment={args.preset}", f"name=bench_{args.label}", *COMMON, f"seed={seed}",
                     f"trainer.eval_episodes={args.eval_episodes}", *args.set]
        if args.eval_every is not None:
            overrides.append(f"trainer.eval_every={args.eval_every}")
        if args.steps is not None:
            overrides.append(f"trainer.total_steps={args.steps}")
        t0 = time.perf_counter()
        run(compose(overrides), root / f"seed{seed}")
        points, train = curve(root / f"seed{seed}")
        runs.append({"seed": seed, "overrides": overrides, "curve": points, "train": train,
                     "summary": summarize(points, args.target, args.by_steps), "wall_s": time.perf_counter() - t0})
        print(f"seed {seed}: " + ", ".join(f"{p['env_steps'] // 1000}k {p['success_once']:.2f}/{p['success_at_end']:.2f}"
                                           for p in points) + f" ({runs[-1]['wall_s']:.0f} s)", flush=True)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    store(out, args.label, variant(runs, settings, args.preset))


def variant(runs: list[dict], settings: dict, preset: str) -> dict:
    """One variant's record: its runs, the mean +- std / min table over seeds (evaluation points
    line up across seeds: same schedule), KL stops and whether every seed passes; printed."""
    table = []
    for i, point in enumerate(runs[0]["curve"]):
        row = {"env_steps": point["env_steps"], "wall_s_mean": float(np.mean([r["curve"][i]["wall_s"] for r in runs]))}
        for name in EVAL_KEYS:
            values = np.array([r["curve"][i][name] for r in runs])
            row[f"{name}_mean"], row[f"{name}_std"] = float(values.mean()), float(values.std())
            row[f"{name}_min"] = float(values.min())
        table.append(row)
    summaries = [r["summary"] for r in runs]
    kl_stops = [int(np.nansum([x or 0 for x in r["train"]["kl_stop"]])) for r in runs]
    print(f"\n{preset} [{settings['label']}] {' '.join(settings['set'])}")
    print(f"{'env steps':>10} {'wall s':>7} {'success_once':>16} {'min':>5} {'success_at_end':>16} {'return':>8}")
    for row in table:
        print(f"{row['env_steps']:>10} {row['wall_s_mean']:>7.0f} {row['success_once_mean']:>9.3f} +- "
              f"{row['success_once_std']:.3f} {row['success_once_min']:>5.2f} {row['success_at_end_mean']:>9.3f} +- "
              f"{row['success_at_end_std']:.3f} {row['return_mean']:>8.2f}")
    for run_ in runs:
        s = run_["summary"]
        print(f"seed {run_['seed']}: first >= {settings['target']} at {s['first_env_steps']} env steps "
              f"({s['first_wall_s'] and round(s['first_wall_s'])} s), min after it {s['min_after_first']}, "
              f"passes: {s['passes']}")
    print(f"KL stops per run: {kl_stops}")
    return {"settings": settings, "common": COMMON, "table": table, "runs": runs, "kl_stops": kl_stops,
            "all_pass": all(s["passes"] for s in summaries)}


def store(out: Path, label: str, record: dict) -> None:
    """Writes ``record`` under ``label`` in ``out``, keeping the file's other variants."""
    results = json.loads(out.read_text()) if out.exists() else {}
    results = results if "variants" in results else {"variants": {}}
    results["variants"][label] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} [{label}]")


def merge(files: list[Path], label: str, out: Path) -> None:
    """Joins variant ``label`` of several invocations run side by side (e.g. one seed per core)
    into one record in ``out``; refused unless they ran the same settings."""
    records = [json.loads(f.read_text())["variants"][label] for f in files]
    varying = ("seeds", "out", "merge")
    same = [{k: v for k, v in r["settings"].items() if k not in varying} for r in records]
    for f, other in zip(files[1:], same[1:], strict=True):
        if other != same[0]:
            raise SystemExit(f"--merge: {f} [{label}] ran other settings than {files[0]}: "
                             f"{ {k: (same[0].get(k), v) for k, v in other.items() if same[0].get(k) != v} }")
    runs = sorted((r for record in records for r in record["runs"]), key=lambda r: r["seed"])
    settings = {**records[0]["settings"], "seeds": [r["seed"] for r in runs], "out": str(out),
                "merged_from": [str(f) for f in files]}
    store(out, label, variant(runs, settings, settings["preset"]))


if __name__ == "__main__":
    main()
