"""Learning benchmark for offline preference data: Diffusion-DPO on all pairs vs the FiFA top 10% vs a random 10%.

    python bench/learning_dpo.py                          # 3 cells x seeds 0 1 2 (about 30 minutes on 2 cores)
    python bench/learning_dpo.py --seeds 0 --steps 4      # a quick look

FiFA (arXiv 2410.10166) reports that training on a small filtered subset of human pairs converges
faster than, and ends no worse than, training on all of them. This checks the claim on data made
here: ``rlplat-make-pairs`` samples ``--pairs`` pairs of the shapes captions from the base model
(``--policy``) and labels them with a noisy proxy human; ``rlplat-fifa`` keeps the ``--keep``
fraction with the highest importance (proxy margin, prompt quality, prompt diversity); a seeded
random subset of the same size is the control. Each cell trains ``experiment=dpo_tiny_shapes``
from the same base on its folder for the same number of optimizer steps (``--steps`` iterations),
with evaluations of the held-out captions (fixed seeds): the mean fidelity and the win rate over
the base model's images of the same prompts and seeds.

Two comparisons, both printed and in the JSON: at equal steps (the end of every run) and at equal
wall time, where a cell's clock starts with the time its filter took (FiFA scores every pair once)
and adds the training iterations' time; the budget is the shortest cell's total. Writes
bench/results/learning_dpo.json, learning_dpo.png (held-out fidelity and win rate vs iterations,
mean over seeds with the seeds' range) and the first seed's grids before and after per cell.
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

COMMON = ["experiment=dpo_tiny_shapes", "name=bench_dpo", "logger.progress_bar=false", "logger.log_every=1000"]
CELLS = ("full", "fifa", "random")


def make_data(args: argparse.Namespace, root: Path) -> dict[str, dict]:
    """The three folders and what making each took: {cell: {"path", "filter_s", "report"}}."""
    from rlplat.algos.fifa import filter_pairs, random_subset
    from rlplat.make_pairs import make_pairs

    full = args.data or root / "pairs"
    if not (full / "data").is_dir():
        make_pairs(["--out", str(full), "--pairs", str(args.pairs), "--validation-pairs", "256", "--policy",
                    args.policy, "policy.num_steps=10"])
    t0 = time.perf_counter()
    fifa_report = filter_pairs(full, root / "fifa", keep=args.keep)
    fifa_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    random_report = random_subset(full, root / "random", keep=args.keep, seed=0)
    random_s = time.perf_counter() - t0
    return {"full": {"path": full, "filter_s": 0.0, "report": None},
            "fifa": {"path": root / "fifa", "filter_s": fifa_s, "report": fifa_report},
            "random": {"path": root / "random", "filter_s": random_s, "report": random_report}}


def curve(run_dir: Path, filter_s: float) -> list[dict]:
    """(step, wall_s, reward, win rate) at every evaluation; wall_s = filter time + iteration time so far."""
    points, clock = [], filter_s
    for row in read_metrics(run_dir / METRICS_FILE):
        clock += float(row.get("perf/iteration_s") or 0.0)
        if row.get("eval/reward") is not None:
            points.append({"step": int(row["step"]), "wall_s": clock, "reward": float(row["eval/reward"]),
                           "win_rate": float(row.get("eval/win_rate_vs_base", float("nan")))})
    return points


def at_time(points: list[dict], budget: float) -> dict:
    """The last evaluation at or before ``budget`` seconds."""
    return [p for p in points if p["wall_s"] <= budget + 1e-9][-1]


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for cell in CELLS:
        cell_runs = [r for r in runs if r["cell"] == cell]
        steps = [p["step"] for p in cell_runs[0]["curve"]]
        for ax, key in zip(axes, ("reward", "win_rate")):
            values = np.array([[p[key] for p in r["curve"]] for r in cell_runs])
            ax.plot(steps, values.mean(0), marker="o", label=cell)
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    axes[0].set_ylabel("held-out fidelity")
    axes[1].set_ylabel("win rate over the base")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16, help="iterations per run (algo.num_minibatches steps each)")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2048, help="pairs to make when --data is not given")
    parser.add_argument("--policy", default="diffusion_tiny_shapes_early",
                        help="base model preset (makes the pairs, is tuned)")
    parser.add_argument("--data", type=Path, default=None, help="an existing rlplat-make-pairs folder")
    parser.add_argument("--keep", type=float, default=0.1, help="fraction kept by FiFA and by the random control")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learning_dpo.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-dpo-"))
    data = make_data(args, root)
    runs = []
    for cell in CELLS:
        for seed in args.seeds:
            overrides = [*COMMON, f"policy={args.policy}", f"preference.path={data[cell]['path']}", f"seed={seed}",
                         f"trainer.total_steps={args.steps}", f"trainer.eval_every={args.eval_every}",
                         f"trainer.eval_episodes={args.eval_images}", *args.set]
            run_dir = root / f"{cell}_seed{seed}"
            run(compose(overrides), run_dir)
            points = curve(run_dir, data[cell]["filter_s"])
            runs.append({"cell": cell, "seed": seed, "curve": points})
            print(f"{cell} seed {seed}: fidelity {points[0]['reward']:.4f} -> {points[-1]['reward']:.4f}, win rate "
                  f"{points[-1]['win_rate']:.3f} ({points[-1]['wall_s']:.0f} s)", flush=True)

    budget = min(r["curve"][-1]["wall_s"] for r in runs)
    summary = {}
    for cell in CELLS:
        cell_runs = [r for r in runs if r["cell"] == cell]
        report = data[cell]["report"] or {}
        summary[cell] = {
            "before": mean_std([r["curve"][0]["reward"] for r in cell_runs]),
            "after": mean_std([r["curve"][-1]["reward"] for r in cell_runs]),
            "win_rate": mean_std([r["curve"][-1]["win_rate"] for r in cell_runs]),
            "at_equal_time": mean_std([at_time(r["curve"], budget)["reward"] for r in cell_runs]),
            "win_rate_at_equal_time": mean_std([at_time(r["curve"], budget)["win_rate"] for r in cell_runs]),
            "filter_s": data[cell]["filter_s"], "rows": report.get("kept", args.pairs),
        }
    print(f"\n{'cell':<8} {'rows':>5} {'filter s':>8} {'before':>14} {'after (equal steps)':>20} {'win rate':>14} "
          f"{'after (equal time)':>19}")
    for cell, s in summary.items():
        print(f"{cell:<8} {s['rows']:>5} {s['filter_s']:>8.1f} {s['before'][0]:>7.4f}+-{s['before'][1]:.4f} "
              f"{s['after'][0]:>13.4f}+-{s['after'][1]:.4f} {s['win_rate'][0]:>7.3f}+-{s['win_rate'][1]:.3f} "
              f"{s['at_equal_time'][0]:>12.4f}+-{s['at_equal_time'][1]:.4f}")
    print(f"equal wall time: {budget:.0f} s (filter + training iterations)")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "budget_s": budget, "summary": summary, "runs": runs,
              "fifa_report": data["fifa"]["report"], "random_report": data["random"]["report"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    plot(runs, args.out.with_suffix(".png"))
    grids = args.out.parent / f"{args.out.stem}_grids"  # the first seed's held-out grids, before and after
    grids.mkdir(exist_ok=True)
    for cell in CELLS:
        media = sorted((root / f"{cell}_seed{args.seeds[0]}" / "media").glob("eval_step_*.png"))
        shutil.copy(media[0], grids / f"{cell}_before.png")
        shutil.copy(media[-1], grids / f"{cell}_after.png")
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {grids}/")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
