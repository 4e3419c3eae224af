"""``rlplat-report DIR...``: the table and curves of a sweep (or of any set of run dirs).

Runs are found under each DIR (a multirun folder, a folder of runs, or run dirs: any folder with
a ``config.yaml``) and grouped by their config minus the seed. Per group: the final and the best
value of ``--metric`` as mean +- std and a 95% confidence interval (Student's t over the seeds),
env steps (or samples / pairs) and wall time; one learning-curve panel per group with the
seeds' mean and a +- std band. Unfinished and failed runs are listed, never dropped silently.
Writes ``report.md``, ``report.csv`` and ``curves.png`` to ``--out`` (default: the one DIR given,
else ``./report``) and prints the Markdown table.

Examples::

    rlplat-report multirun/2026-12-03_10-00-00
    rlplat-report outputs/toy_mlp --metric eval/episode_return --out /tmp/toy_report
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rlplat.logging import METRICS_FILE, read_metrics

#: Keys of a run's config that do not make a different configuration.
IGNORED_KEYS = ("seed", "resume")
#: The first of these a run logs is its progress axis (env runs, online and offline preference runs).
PROGRESS_KEYS = ("env_steps", "samples", "pairs")
#: Default metrics, in order of preference.
DEFAULT_METRICS = ("eval/success_rate", "eval/reward")


@dataclass
class RunRecord:
    """One run dir: its config, its rows and what became of it."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    #: The command-line overrides Hydra saved for it (empty for runs made another way).
    overrides: list[str]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def total_steps(self) -> int | None:
        return (self.config.get("trainer") or {}).get("total_steps")

    @property
    def last_step(self) -> int:
        return self.rows[-1]["step"] if self.rows else 0

    @property
    def finished(self) -> bool:
        return bool(self.rows) and self.total_steps is not None and self.last_step >= self.total_steps

    def status(self) -> str:
        if not self.rows:
            return "no metrics (failed before its first step, or not started)"
        if not self.finished:
            return f"unfinished: last step {self.last_step} of {self.total_steps}"
        return "finished"

    @property
    def x_key(self) -> str:
        """The run's progress axis: env steps, samples or pairs (else the iteration)."""
        return next((k for k in PROGRESS_KEYS if any(k in r for r in self.rows)), "step")

    def curve(self, metric: str) -> list[tuple[float, float]]:
        """(progress, value) of every row that logged ``metric``."""
        x_key = self.x_key
        return [(float(r.get(x_key, r["step"])), float(r[metric])) for r in self.rows if r.get(metric) is not None]

    def progress(self) -> float:
        x_key = next((k for k in PROGRESS_KEYS if any(k in r for r in self.rows)), None)
        return float(next((r[x_key] for r in reversed(self.rows) if x_key in r), 0)) if x_key else 0.0

    def wall_s(self) -> float:
        """Seconds from the run's saved config to its last metrics row (file times; a resumed run
        counts the pause too)."""
        metrics = self.path / METRICS_FILE
        if not metrics.exists():
            return 0.0
        return max(0.0, metrics.stat().st_mtime - (self.path / "config.yaml").stat().st_mtime)


@dataclass
class Group:
    """Runs whose configs differ only in the seed."""

    label: str
    runs: list[RunRecord] = field(default_factory=list)


def find_runs(dirs: Sequence[Path]) -> list[RunRecord]:
    """Every run dir under ``dirs`` (a folder with a ``config.yaml``; warm-start sub-runs and
    checkpoint folders are part of their run, not runs of their own)."""
    found: dict[Path, RunRecord] = {}
    for top in dirs:
        top = Path(top)
        if not top.is_dir():
            raise SystemExit(f"rlplat-report: {top} is not a folder (give a multirun folder or run dirs)")
        for cfg_file in sorted(top.rglob("config.yaml")):
            run_dir = cfg_file.parent
            if run_dir.name == ".hydra" or "checkpoints" in run_dir.parts or run_dir.name == "warm_start":
                continue
            if run_dir.resolve() in found:
                continue
            config = yaml.safe_load(cfg_file.read_text()) or {}
            overrides_file = run_dir / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
            found[run_dir.resolve()] = RunRecord(run_dir, config, read_metrics(run_dir / METRICS_FILE),
                                                 list(overrides or []))
    if not found:
        raise SystemExit(f"rlplat-report: no run dirs (folders with a config.yaml) under {', '.join(map(str, dirs))}")
    return list(found.values())


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Runs grouped by config minus the seed; each group labelled by its own overrides minus the
    seed and those all groups share (Hydra's), else by the config values that tell it apart."""
    keyed: dict[str, list[RunRecord]] = {}
    flats = {}
    for run in runs:
        flat = {k: v for k, v in _flat(run.config).items() if k.split(".")[0] not in IGNORED_KEYS}
        flats[id(run)] = flat
        keyed.setdefault(repr(sorted(flat.items(), key=lambda kv: kv[0])), []).append(run)
    members = list(keyed.values())
    differing = sorted({k for ms in members for k in flats[id(ms[0])]
                        if len({repr(flats[id(m[0])].get(k)) for m in members}) > 1})
    own = [[o for o in ms[0].overrides if o.split("=")[0].lstrip("+~") not in IGNORED_KEYS
            and not o.startswith("hydra.")] for ms in members]
    # Overrides every group shares say nothing about the difference (unless there is one group).
    common = set.intersection(*(set(o) for o in own)) if len(own) > 1 else set()
    groups = []
    for ms, overrides in zip(members, own):
        overrides = [o for o in overrides if o not in common]
        if overrides:
            label = " ".join(overrides)
        elif differing:
            label = " ".join(f"{k}={flats[id(ms[0])].get(k)}" for k in differing[:4]) + (" ..." if len(differing) > 4 else "")
        else:
            label = str(ms[0].config.get("name", "runs"))
        groups.append(Group(label, sorted(ms, key=lambda r: (str(r.seed), str(r.path)))))
    return sorted(groups, key=lambda g: g.label)


def mean_std_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std (ddof 1) and the two ends of the Student-t confidence interval of the
    mean; with one value the std is 0 and the interval is that value (nothing to estimate from)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, 0.0, mean, mean
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def pick_metric(runs: Sequence[RunRecord], metric: str | None) -> str:
    logged = {k for r in runs for row in r.rows for k in row}
    if metric is not None:
        if metric not in logged:
            close = sorted(k for k in logged if k.split("/")[-1] in metric or metric in k)[:5]
            raise SystemExit(f"rlplat-report: no run logged --metric {metric}"
                             + (f"; logged keys like it: {', '.join(close)}" if close else ""))
        return metric
    for name in DEFAULT_METRICS:
        if name in logged:
            return name
    raise SystemExit("rlplat-report: the runs log neither eval/success_rate nor eval/reward; pick one with --metric")


COLUMNS = ("group", "seeds", "final mean", "final std", "final 95% CI low", "final 95% CI high",
           "best mean", "best std", "progress", "wall s", "not finished")


def summarize(groups: Sequence[Group], metric: str) -> list[dict[str, Any]]:
    """One row per group: final / best of ``metric`` over its finished seeds, and what did not finish."""
    table = []
    for group in groups:
        done = [r for r in group.runs if r.finished and r.curve(metric)]
        row: dict[str, Any] = {"group": group.label, "seeds": len(done),
                               "not finished": len(group.runs) - len(done)}
        if done:
            final = mean_std_ci([r.curve(metric)[-1][1] for r in done])
            best = mean_std_ci([max(v for _, v in r.curve(metric)) for r in done])
            row |= dict(zip(COLUMNS[2:6], final)) | {"best mean": best[0], "best std": best[1]}
            row |= {"progress": float(np.mean([r.progress() for r in done])),
                    "wall s": float(np.mean([r.wall_s() for r in done]))}
        table.append(row)
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown(table: Sequence[dict[str, Any]], metric: str, problems: Sequence[RunRecord]) -> str:
    lines = [f"metric: `{metric}` (final = its last logged value; mean +- std over seeds, 95% CI of the mean)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |" for row in table]
    if problems:
        lines += ["", "Runs not in the numbers above:", ""]
        lines += [f"- `{r.path}` (seed {r.seed}): {r.status()}" for r in problems]
    return "\n".join(lines) + "\n"


def plot_groups(groups: Sequence[Group], metric: str, out_png: Path) -> Path:
    """One panel per group: each seed's curve (thin), their mean and a +- std band where every
    seed has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        curves = [dict(r.curve(metric)) for r in group.runs if r.curve(metric)]
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), lw=0.8, alpha=0.4, color="C0")
        shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if shared:
            values = np.array([[c[x] for x in shared] for c in curves])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(shared))
            ax.plot(shared, mean, marker="o", color="C0", label=f"mean of {len(curves)} seeds")
            ax.fill_between(shared, mean - std, mean + std, color="C0", alpha=0.2, label="+- std")
            ax.legend(fontsize=8)
        ax.set_title(group.label if len(group.label) <= 60 else group.label[:57] + "...", fontsize=9)
        ax.set_ylabel(metric)
        ax.set_xlabel(group.runs[0].x_key.replace("_", " "))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def report(dirs: Sequence[Path], metric: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Finds, groups and summarizes the runs under ``dirs``; writes report.md, report.csv and
    curves.png to ``out``; returns the metric, the table and the paths."""
    runs = find_runs(dirs)
    metric = pick_metric(runs, metric)
    groups = group_runs(runs)
    table = summarize(groups, metric)
    problems = [r for g in groups for r in g.runs if not (r.finished and r.curve(metric))]
    out = Path(out) if out is not None else (Path(dirs[0]) if len(dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table, metric, problems)
    (out / "report.md").write_text(md)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    png = plot_groups(groups, metric, out / "curves.png")
    return {"metric": metric, "table": table, "markdown": md, "problems": problems,
            "files": [out / "report.md", out / "report.csv", png]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlplat-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun folders, folders of runs, or run dirs")
    parser.add_argument("--metric", default=None,
                        help="metric to compare (default: eval/success_rate, else eval/reward)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, report.csv and curves.png go (default: the one DIR, else ./report)")
    args = parser.parse_args(argv)
    result = report(args.dirs, args.metric, args.out)
    print(result["markdown"], end="")
    print("wrote " + ", ".join(map(str, result["files"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
