"""Sweeps: Hydra multirun as the README runs it, and what a piped console and the run dir show."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlplat.logging import LOG_FILE, read_metrics
from rlplat.report import report
from rlplat.runtime.cluster import STARTED_MESSAGE
from tests.simulators import require_optional

README = Path(__file__).resolve().parents[1] / "README.md"
# Small enough for a test (PPO or GRPO alike): 8 envs, 10-step episodes, 4 eval episodes.
SMALL = ["env.num_envs=8", "env.max_episode_steps=10", "trainer.eval_episodes=4",
         "policy.hidden_sizes=[32,32]", "trainer.save_video=false"]


def readme_sweep_line() -> list[str]:
    """The arguments of the README's sweep command (the first ``rlplat-train -m`` line)."""
    line = next(line for line in README.read_text().splitlines() if line.startswith("rlplat-train -m "))
    return shlex.split(line)[1:]


# The Ray launcher's local Ray has 2 CPUs and each job's placement takes both: one job at a time.
RAY_LAUNCHER = ["hydra/launcher=rlplat_ray", "hydra.launcher.num_cpus=2", "placement.cpus_per_device=2"]


@pytest.mark.parametrize("launcher", ["basic", "rlplat_ray"])
def test_the_readmes_sweep_line_makes_one_run_dir_per_job_and_writes_nothing_in_home(tmp_path, launcher):
    args = readme_sweep_line()
    assert "-m" in args and any(a.startswith("seed=") and "," in a for a in args), args
    # Shortened: one seed, two iterations; every other swept value kept.
    args = ["seed=0" if a.startswith("seed=") else "trainer.total_steps=2" if a.startswith("trainer.total_steps=")
            else a for a in args]
    swept = {a.split("=")[0]: a.split("=")[1].split(",") for a in args if "=" in a and "," in a}
    assert swept, args
    jobs = 1
    for values in swept.values():
        jobs *= len(values)
    home = tmp_path / "home"
    home.mkdir()
    # A user's environment: HOME, nothing redirected by the test harness.
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "WANDB_DIR")}
    env |= {"HOME": str(home), "PYTHONUNBUFFERED": "1", "RLPLAT_CACHE_DIR": str(tmp_path / "cache")}
    extra = RAY_LAUNCHER if launcher == "rlplat_ray" else []
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", *args, *SMALL, *extra, "logger=wandb"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    (sweep,) = (tmp_path / "multirun").iterdir()
    runs = sorted(p.parent for p in sweep.glob("*/metrics.jsonl"))
    assert len(runs) == jobs, (runs, out)
    # Each job's folder: its number, the experiment's name and its own overrides, which together
    # cover every combination of the swept values; its config holds its seed.
    combos = set()
    for run_dir in runs:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        match = re.fullmatch(rf"(\d+)_{cfg.name}_(.*)", run_dir.name)
        assert match and cfg.name == "toy_mlp", run_dir.name
        overrides = dict(o.split("=", 1) for o in re.split(r",(?=[\w.]+=)", match.group(2)))
        assert int(overrides["seed"]) == cfg.seed
        combos.add(tuple(overrides[key] for key in sorted(swept)))
        assert read_metrics(run_dir / "metrics.jsonl")
    assert combos == set(itertools.product(*(swept[key] for key in sorted(swept))))
    # One Ray for the whole sweep: the basic launcher runs the jobs in this process one after
    # another; the Ray launcher runs them as tasks on its cluster, never more than fit.
    assert out.count(STARTED_MESSAGE) == 1, out
    spans = sorted(((r / "config.yaml").stat().st_mtime, (r / "metrics.jsonl").stat().st_mtime) for r in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans
    # Piped: one console line per logged iteration, unwrapped, the same lines in each run's log file.
    step_lines = [re.sub(r"^\([^)]*\) ", "", line) for line in proc.stdout.splitlines()]  # Ray's task prefix
    step_lines = [line for line in step_lines if line.startswith("step ")]
    rows = sum(len(read_metrics(r / "metrics.jsonl")) for r in runs)
    assert len(step_lines) == rows, proc.stdout
    assert all(re.fullmatch(r"step +\d+  env_steps [\d,]+.*", line) for line in step_lines), step_lines
    for run_dir in runs:
        logged = [line for line in (run_dir / LOG_FILE).read_text().splitlines() if line.startswith("step ")]
        assert len(logged) == len(read_metrics(run_dir / "metrics.jsonl")) and set(logged) <= set(step_lines)
    assert "\x1b[" not in out, "colour codes in a piped console"
    # Nothing under HOME: matplotlib, wandb and Ray state went to the cache dir and the run dirs.
    assert not [p for p in home.rglob("*")], sorted(home.rglob("*"))
    assert (tmp_path / "cache" / "matplotlib").is_dir()
    # The sweep's report: one group per swept combination other than the seed, each run finished.
    result = report([sweep])
    others = sorted(key for key in swept if key != "seed")
    want = {" ".join(f"{key}={value}" for key, value in zip(others, combo))
            for combo in itertools.product(*(swept[key] for key in others))}
    assert {row["group"] for row in result["table"]} == want, result["markdown"]
    assert all(row["seeds"] == 1 and row["not finished"] == 0 for row in result["table"])
    assert not result["problems"] and (sweep / "report.md").exists()


def test_the_ray_launcher_counts_what_each_job_places_and_never_oversubscribes():
    from omegaconf import OmegaConf as Conf

    from hydra_plugins.rlplat_launchers.ray_launcher import fits, job_resources

    gpu_job = Conf.create({"placement": {"num_devices": 2, "use_gpu": True, "gpus_per_device": 0.5,
                                          "cpus_per_device": 2, "roles": {"env": "0", "actor": "1"}}})
    need = job_resources(gpu_job)
    assert need == {"CPU": 4.0, "GPU": 1.0}
    cluster = {"CPU": 8.0, "GPU": 1.0}
    # Two such jobs need two GPUs' worth: the second waits for the first.
    assert fits(need, {}, cluster) and not fits(need, need, cluster)
    half = job_resources(Conf.create({"placement": {"num_devices": 1, "use_gpu": True, "gpus_per_device": 0.5}}))
    assert half == {"CPU": 1.0, "GPU": 0.5}
    assert fits(half, half, cluster) and not fits(half, {"CPU": 1.0, "GPU": 0.75}, cluster)


def test_the_slurm_launcher_preset_writes_the_sbatch_script_of_the_sweep(tmp_path):
    require_optional("hydra_plugins.hydra_submitit_launcher", "pip install -e '.[sweeps]'")
    # A machine without Slurm: srun passes through, sbatch keeps the script it was given and refuses.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "sbatch: error: no Slurm here" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "sbatch.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)}
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", "-m", "hydra/launcher=rlplat_slurm",
                           "hydra.launcher.partition=gpu", "experiment=toy_mlp", "seed=0,1,2", "placement.use_gpu=true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "no Slurm here" in proc.stderr, proc.stderr
    text = script.read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=240", "#SBATCH --mem=64GB",
                 "export HF_HUB_OFFLINE=1 WANDB_MODE=offline"):
        assert line in text, text
    assert re.search(r"^srun .* -m submitit\.core\._submit .*/multirun/[^/]+/\.submitit/%j$", text, re.MULTILINE), text
    # Each job's call (its overrides) was pickled for the array's tasks: one per seed.
    assert len(list((tmp_path / "multirun").glob("*/.submitit/*.pkl"))) == 3


def test_the_optuna_preset_composes_with_its_search_space_and_a_maximized_objective():
    require_optional("hydra_plugins.hydra_optuna_sweeper", "pip install -e '.[sweeps]'")
    from hydra import compose, initialize_config_module

    from rlplat.config import register_configs

    register_configs()
    with initialize_config_module("rlplat.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy_mlp", "hydra/sweeper=optuna_toy_mlp"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert dict(sweeper.params) == {"algo.optim.lr": "tag(log, interval(1e-4, 3e-3))",
                                    "algo.ent_coef": "interval(0.0, 0.01)"}
    # Both searched keys exist in the composed run config (a typo would make every trial fail).
    assert cfg.algo.optim.lr > 0 and cfg.algo.ent_coef >= 0
