"""rlplat-report: grouping by config minus seed, exact statistics, unfinished runs listed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from rlplat.report import main, report


def _run(folder: Path, lr: float, seed: int, evals: list[float], total: int = 3, steps: int | None = None) -> None:
    """A run dir as rlplat-train leaves it: config.yaml, Hydra's overrides, metrics.jsonl with an
    eval every iteration (``steps`` rows; default all of ``total``)."""
    folder.mkdir(parents=True)
    config = {"name": "toy", "seed": seed, "resume": False, "algo": {"optim": {"lr": lr}},
              "trainer": {"total_steps": total}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"algo.optim.lr={lr}", f"seed={seed}"]))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": i + 1, "env_steps": 100 * (i + 1), "eval/success_rate": v}
            for i, v in enumerate(evals[: steps if steps is not None else total])]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_configs_by_two_seeds_give_the_exact_statistics(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "2026-12-03_10-00-00"
    _run(sweep / "0_toy_lr=0.1,seed=0", 0.1, 0, [0.1, 0.9, 0.5])
    _run(sweep / "1_toy_lr=0.1,seed=1", 0.1, 1, [0.2, 0.3, 0.7])
    _run(sweep / "2_toy_lr=0.2,seed=0", 0.2, 0, [0.0, 0.1, 0.2])
    _run(sweep / "3_toy_lr=0.2,seed=1", 0.2, 1, [0.3, 0.4, 0.4])
    # Not finished (2 of 3 steps) and failed (no metrics): listed, not in the numbers.
    _run(sweep / "4_toy_lr=0.2,seed=2", 0.2, 2, [0.9, 0.9, 0.9], steps=2)
    _run(sweep / "5_toy_lr=0.1,seed=2", 0.1, 2, [], steps=0)
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    with (sweep / "report.csv").open() as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"algo.optim.lr=0.1", "algo.optim.lr=0.2"}
    a, b = rows["algo.optim.lr=0.1"], rows["algo.optim.lr=0.2"]
    t975_1 = 12.706204736174698  # Student's t, 97.5% quantile, 1 degree of freedom
    # lr 0.1: finals 0.5, 0.7 -> mean 0.6, std sqrt(0.02) = 0.141421, CI 0.6 -+ t * 0.1; bests 0.9, 0.7.
    assert float(a["final mean"]) == pytest.approx(0.6)
    assert float(a["final std"]) == pytest.approx(math.sqrt(0.02))
    assert float(a["final 95% CI low"]) == pytest.approx(0.6 - t975_1 * 0.1)
    assert float(a["final 95% CI high"]) == pytest.approx(0.6 + t975_1 * 0.1)
    assert float(a["best mean"]) == pytest.approx(0.8) and float(a["best std"]) == pytest.approx(math.sqrt(0.02))
    # lr 0.2: finals 0.2, 0.4 -> mean 0.3, same std; bests 0.2, 0.4.
    assert float(b["final mean"]) == pytest.approx(0.3) and float(b["best mean"]) == pytest.approx(0.3)
    assert float(b["final 95% CI low"]) == pytest.approx(0.3 - t975_1 * 0.1)
    assert (a["seeds"], a["not finished"], b["seeds"], b["not finished"]) == ("2", "1", "2", "1")
    assert float(a["progress"]) == 300
    # The Markdown table and the runs left out, named with why.
    md = (sweep / "report.md").read_text()
    assert md in printed and "| algo.optim.lr=0.1 | 2 | 0.6 | 0.1414 |" in md
    assert "4_toy_lr=0.2,seed=2` (seed 2): unfinished: last step 2 of 3" in md
    assert "5_toy_lr=0.1,seed=2` (seed 2): no metrics" in md
    assert (sweep / "curves.png").stat().st_size > 1000


def test_three_seeds_use_t_with_two_degrees_of_freedom_and_configs_are_told_apart_without_overrides(tmp_path):
    for seed, final in enumerate([0.2, 0.4, 0.9]):
        _run(tmp_path / f"a{seed}", 0.5, seed, [0.0, 0.0, final])
        (tmp_path / f"a{seed}" / ".hydra" / "overrides.yaml").unlink()  # runs made by a script
    _run(tmp_path / "b0", 0.7, 0, [0.0, 0.0, 1.0])
    (tmp_path / "b0" / ".hydra" / "overrides.yaml").unlink()
    result = report([tmp_path], out=tmp_path / "out")
    table = {row["group"]: row for row in result["table"]}
    assert set(table) == {"algo.optim.lr=0.5", "algo.optim.lr=0.7"}
    row = table["algo.optim.lr=0.5"]
    mean, std = 0.5, math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2)
    t975_2 = 4.302652729749464
    assert row["final mean"] == pytest.approx(mean) and row["final std"] == pytest.approx(std)
    assert row["final 95% CI high"] == pytest.approx(mean + t975_2 * std / math.sqrt(3))
    # One seed: no spread to estimate, the interval is the value itself.
    one = table["algo.optim.lr=0.7"]
    assert (one["final std"], one["final 95% CI low"], one["final 95% CI high"]) == (0.0, 1.0, 1.0)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no run dirs"):
        main([str(tmp_path)])
    _run(tmp_path / "r", 0.1, 0, [0.5, 0.5, 0.5])
    with pytest.raises(SystemExit, match=r"no run logged --metric eval/succes.*eval/success_rate"):
        main([str(tmp_path), "--metric", "eval/succes"])
    with pytest.raises(SystemExit, match="is not a folder"):
        main([str(tmp_path / "nope")])
