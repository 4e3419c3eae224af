"""Learning benchmark for text-to-image preference tuning: D3PO and DDPO on the tiny model.

    python bench/learning_diffusion.py                                  # short: 2 algos x 2 rewards x seeds 0 1 2
    python bench/learning_diffusion.py --seeds 0 --steps 4 --eval-images 16   # a quick look
    python bench/learning_diffusion.py --budget-min 30                  # long: 30 min of wall time per cell, 1 seed
    python bench/learning_diffusion.py --merge a.json b.json            # join long-mode cells run side by side

Short mode (the default) runs each cell's preset for its iterations (16) on 3 seeds: is the
gain beyond the seed spread? Long mode (``--budget-min M``) runs each cell's long preset
(``LONG_PRESETS``: JPEG from the shipped base, prompt fidelity from the early base
``diffusion_tiny_shapes_early``) for M minutes of wall time on one seed (``trainer.time_budget_s``:
the run ends with a final evaluation, and a preset with ``algo.optim.anneal_lr`` anneals over the
budget), evaluating every ``--eval-every`` iterations;
it records reward, prompt fidelity, diversity and the log-ratio to the base against samples and
wall time, writes bench/results/learning_diffusion_long.json, a plot of the curves beside it and
the eval grids at 0/25/50/100% of the run in learning_diffusion_long_grids/.

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
from typing import Any

import numpy as np

from rlplat.config import compose
from rlplat.logging import METRICS_FILE, read_metrics
from rlplat.train import run

# Shared by every run: quiet logs.
COMMON = ["name=bench_diffusion", "logger.progress_bar=false", "logger.log_every=1000"]
REWARDS = ("jpeg_compressibility", "shapes_fidelity")
DEFAULT_OUT = Path(__file__).parent / "results" / "learning_diffusion.json"
# The shipped presets (conf/experiment/) per algorithm and reward: D3PO on JPEG takes more pairs and
# Adam steps per iteration (d3po_tiny_jpeg.yaml says why); DDPO uses one preset for both.
PRESETS = {
    "d3po": {"jpeg_compressibility": ["experiment=d3po_tiny_jpeg"], "shapes_fidelity": ["experiment=d3po_tiny"]},
    "ddpo": {reward: ["experiment=ddpo_tiny"] for reward in REWARDS},
}


# Long mode: the tuned preset of each cell (conf/experiment/ says why each value), JPEG from the
# shipped base and prompt fidelity from the early base (room to learn: ~0.65 instead of 0.95).
LONG_PRESETS = {
    "d3po": {"jpeg_compressibility": ["experiment=d3po_tiny_jpeg_long"],
             "shapes_fidelity": ["experiment=d3po_tiny_shapes_early"]},
    "ddpo": {"jpeg_compressibility": ["experiment=ddpo_tiny_jpeg_long"],
             "shapes_fidelity": ["experiment=ddpo_tiny_shapes_early"]},
}
# What a long run records at each evaluation (the train metric is the iteration's own).
LONG_KEYS = ("samples", "perf/elapsed_s", "eval/reward", "eval/fidelity", "eval/diversity", "eval/win_rate_vs_base",
             "train/kl_to_base")
# Shares of the run's wall time whose nearest evaluation grid is kept.
GRID_SHARES = (0, 25, 50, 100)
# Long-mode acceptance (issue #22): held-out reward within the budget, fidelity floor on JPEG runs.
TARGETS = {"jpeg_compressibility": -0.91, "shapes_fidelity": 0.85}
FIDELITY_FLOOR = 0.8


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


def long_curve(run_dir: Path) -> list[dict[str, float]]:
    """One row per evaluation: ``LONG_KEYS`` that the row logged."""
    return [{key: float(r[key]) for key in LONG_KEYS if r.get(key) is not None} | {"step": int(r["step"])}
            for r in read_metrics(run_dir / METRICS_FILE) if r.get("eval/reward") is not None]


# Training metrics averaged over a long run's iterations (what the update saw; absent keys skipped).
TRAIN_KEYS = ("train/loss", "train/clipfrac", "train/approx_kl", "train/implicit_acc", "train/kl_to_base",
              "pairs/kept_fraction", "perf/iteration_s")


def train_summary(run_dir: Path) -> dict[str, float]:
    """Mean of each ``TRAIN_KEYS`` metric over the run's iterations."""
    rows = [r for r in read_metrics(run_dir / METRICS_FILE) if r["step"] > 0]
    return {f"mean_{key}": float(np.mean([r[key] for r in rows if key in r]))
            for key in TRAIN_KEYS if any(key in r for r in rows)}


def reached(curve: list[dict[str, float]], reward: str) -> dict[str, Any]:
    """The first evaluation that meets the cell's target (and, on JPEG, keeps fidelity >= the floor)."""
    target = TARGETS[reward]
    for row in curve:
        # Both rewards are higher-is-better (JPEG: minus kB, so -0.91 means at most 0.91 kB).
        good = row["eval/reward"] >= target
        fidelity_ok = reward != "jpeg_compressibility" or row.get("eval/fidelity", 0.0) >= FIDELITY_FLOOR
        if good and fidelity_ok:
            return {"target": target, "met": True, "step": row["step"], "minutes": row.get("perf/elapsed_s", 0) / 60}
    return {"target": target, "met": False}


def best_evaluations(curve: list[dict[str, float]], reward: str) -> dict[str, Any]:
    """The best evaluation after the start: ``best_reward`` where the cell's side condition holds
    (JPEG: fidelity >= the floor; None if no evaluation kept it), ``best_reward_any`` regardless."""
    later = curve[1:] or curve
    kept = [row for row in later
            if reward != "jpeg_compressibility" or row.get("eval/fidelity", 0.0) >= FIDELITY_FLOOR]
    return {"best_reward": max(kept, key=lambda r: r["eval/reward"]) if kept else None,
            "best_reward_any": max(later, key=lambda r: r["eval/reward"])}


def keep_grids(run_dir: Path, curve: list[dict[str, float]], out: Path, name: str) -> dict[str, str]:
    """Copies the eval grid nearest to each share of the run's wall time (``GRID_SHARES``) to ``out``."""
    total = max(row.get("perf/elapsed_s", 0.0) for row in curve)
    kept = {}
    for share in GRID_SHARES:
        row = min(curve, key=lambda r: abs(r.get("perf/elapsed_s", 0.0) - total * share / 100))
        grid = run_dir / "media" / f"eval_step_{row['step']:05d}.png"
        if grid.is_file():
            out.mkdir(parents=True, exist_ok=True)
            target = out / f"{name}_{share:03d}pct.png"
            shutil.copy(grid, target)
            kept[f"{share}%"] = f"{target.name} (step {row['step']}, {row.get('perf/elapsed_s', 0) / 60:.1f} min)"
    return kept


def plot_long(runs: list[dict], out_png: Path) -> None:
    """Reward vs wall time and vs samples, and fidelity vs wall time, one row per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(r["reward"] for r in runs))
    fig, axes = plt.subplots(len(rewards), 3, figsize=(16, 4 * len(rewards)), squeeze=False)
    for row_axes, reward in zip(axes, rewards):
        for r in (r for r in runs if r["reward"] == reward):
            minutes = [p.get("perf/elapsed_s", 0.0) / 60 for p in r["curve"]]
            label = f"{r['algo']} ({r['preset']})"
            row_axes[0].plot(minutes, [p["eval/reward"] for p in r["curve"]], marker="o", label=label)
            row_axes[1].plot([p["samples"] for p in r["curve"]], [p["eval/reward"] for p in r["curve"]], marker="o",
                             label=label)
            row_axes[2].plot(minutes, [p.get("eval/fidelity", float("nan")) for p in r["curve"]], marker="o",
                             label=label)
        for ax, (x_label, y_label) in zip(row_axes, (("wall minutes", reward), ("samples", reward),
                                                     ("wall minutes", "eval/fidelity (shapes score)"))):
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"held-out {y_label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row_axes[0].axhline(TARGETS[reward], color="grey", linestyle="--")
        row_axes[2].axhline(FIDELITY_FLOOR, color="grey", linestyle=":")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main_long(args: argparse.Namespace) -> None:
    """Long mode: each cell for ``--budget-min`` minutes of wall time, one seed."""
    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-diffusion-long-"))
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("learning_diffusion_long.json")
    grids = out.parent / f"{out.stem}_grids"
    seed = args.seeds[0]
    runs = []
    for reward in args.rewards:
        for algo in args.algos:
            preset = LONG_PRESETS[algo][reward]
            budget_s = args.budget_min * 60
            overrides = [*preset, f"seed={seed}", f"trainer.eval_episodes={args.eval_images}",
                         f"trainer.eval_every={args.eval_every}", "trainer.total_steps=1000000",
                         "trainer.checkpoint_every=0", f"trainer.time_budget_s={budget_s:g}", *args.set]
            # The budget ends the run (a final evaluation) unless the preset's own stop condition
            # (e.g. a fidelity floor) ends it first; an annealed lr reaches 0 at the budget.
            cfg = compose([*COMMON, *overrides])
            run_dir = root / f"{algo}_{reward}_seed{seed}"
            t0 = time.perf_counter()
            run(cfg, run_dir)
            curve = long_curve(run_dir)
            log_lines = (run_dir / "train.log").read_text().splitlines() if (run_dir / "train.log").is_file() else []
            name = f"{algo}_{reward}"
            result = {"algo": algo, "reward": reward, "seed": seed, "preset": preset[0].split("=")[-1],
                      "overrides": overrides, "stop_when": cfg.trainer.stop_when, "budget_min": args.budget_min,
                      "anneal_lr": bool(cfg.algo.optim.get("anneal_lr", False)),
                      "wall_s": time.perf_counter() - t0,
                      "stopped": next((line for line in log_lines
                                       if "trainer.stop_when" in line or "trainer.time_budget_s" in line), None),
                      "iterations": curve[-1]["step"], "before": curve[0], "final": curve[-1],
                      **best_evaluations(curve, reward), "reached": reached(curve, reward),
                      "train_means": train_summary(run_dir),
                      "grids": keep_grids(run_dir, curve, grids, name),
                      "curve": curve, "run_dir": str(run_dir)}
            runs.append(result)
            final = result["final"]
            fidelity = [row.get("eval/fidelity", float("nan")) for row in (curve[0], final)]
            print(f"{algo} {reward} ({result['preset']}): {curve[0]['eval/reward']:.4f} -> {final['eval/reward']:.4f} "
                  f"in {final.get('perf/elapsed_s', 0) / 60:.1f} min, {result['iterations']} iterations, fidelity "
                  f"{fidelity[0]:.3f} -> {fidelity[1]:.3f}; target {result['reached']}", flush=True)
            settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            write_long(out, settings, runs)  # after every cell, so a long session keeps what finished
    print_long(runs, out, grids)


def write_long(out: Path, settings: dict[str, Any], runs: list[dict]) -> None:
    """The long-mode JSON and its plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": "long", "settings": settings, "common": COMMON, "presets": LONG_PRESETS,
                               "targets": TARGETS, "fidelity_floor": FIDELITY_FLOOR, "runs": runs}, indent=2))
    plot_long(runs, out.with_suffix(".png"))


def merge_long(files: list[Path], out: Path) -> None:
    """Joins long-mode results of invocations run side by side (e.g. one cell per core) into
    ``out`` with their grids; refused unless they ran the same settings (cells, evaluation cadence
    and ``--set`` aside: each run keeps its own ``overrides``) and each cell once."""
    records = [json.loads(f.read_text()) for f in files]
    for f, record in zip(files, records, strict=True):
        if record.get("mode") != "long":
            raise SystemExit(f"--merge: {f} is not a long-mode result (run with --budget-min)")
    # What may differ between the records (merged_from: where an earlier merge's records came from).
    varying = ("algos", "rewards", "eval_every", "set", "out", "merge", "merged_from")
    same = [{k: v for k, v in r["settings"].items() if k not in varying} for r in records]
    for f, other in zip(files[1:], same[1:], strict=True):
        if other != same[0]:
            differ = {k: (same[0].get(k), other.get(k)) for k in same[0].keys() | other.keys()
                      if same[0].get(k) != other.get(k)}
            raise SystemExit(f"--merge: {f} ran other settings than {files[0]}: {differ}")
    # Summaries are recomputed from each curve, so records written before a summary changed join too.
    runs = [run | best_evaluations(run["curve"], run["reward"]) | {"reached": reached(run["curve"], run["reward"])}
            for record in records for run in record["runs"]]
    cells = [(r["algo"], r["reward"]) for r in runs]
    if len(set(cells)) != len(cells):
        raise SystemExit(f"--merge: a cell appears twice in {[str(f) for f in files]}: {cells}")
    grids = out.parent / f"{out.stem}_grids"
    for f, record in zip(files, records, strict=True):
        for run in record["runs"]:
            for kept in run["grids"].values():  # "<file> (step N, M min)"
                src = f.parent / f"{f.stem}_grids" / kept.split(" ")[0]
                if src.resolve() != (grids / src.name).resolve():
                    grids.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, grids / src.name)
    settings = {**records[0]["settings"], "algos": sorted({a for a, _ in cells}),
                "rewards": list(dict.fromkeys(r for _, r in cells)), "eval_every": None, "set": None, "out": str(out),
                # A merged record merged again keeps the files it came from.
                "merged_from": [m for f, r in zip(files, records, strict=True)
                                for m in (r["settings"].get("merged_from") or [str(f)])]}
    write_long(out, settings, runs)
    print_long(runs, out, grids)


def print_long(runs: list[dict], out: Path, grids: Path) -> None:
    """The long-mode table: one row per cell."""
    print(f"\n{'algo':<6} {'reward':<22} {'before':>8} {'final':>8} {'best':>8} {'fid. before':>11} {'fid. final':>10} "
          f"{'min':>5} {'iters':>6}  target")
    for r in runs:
        b, f = r["before"], r["final"]
        print(f"{r['algo']:<6} {r['reward']:<22} {b['eval/reward']:>8.4f} {f['eval/reward']:>8.4f} "
              f"{(r['best_reward'] or {}).get('eval/reward', float('nan')):>8.4f} "
              f"{b.get('eval/fidelity', float('nan')):>11.3f} "
              f"{f.get('eval/fidelity', float('nan')):>10.3f} {f.get('perf/elapsed_s', 0) / 60:>5.1f} "
              f"{r['iterations']:>6}  {r['reached']}")
    print(f"best: the best evaluation after the start (JPEG: among those with fidelity >= {FIDELITY_FLOOR})")
    print(f"wrote {out}, {out.with_suffix('.png')}; grids in {grids}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="iterations per run (default: the preset's)")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. algo.optim.lr=1e-3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON to write (default: learning_diffusion.json; long: learning_diffusion_long.json)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="long mode: wall-clock minutes per cell (one seed: the first of --seeds)")
    parser.add_argument("--eval-every", type=int, default=10, help="long mode: iterations between evaluations")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="run nothing: join these long-mode JSON files (cells run side by side) into --out")
    args = parser.parse_args()
    if args.merge:
        merge_long(args.merge, args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("learning_diffusion_long.json"))
        return
    if args.budget_min is not None:
        main_long(args)
        return

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
