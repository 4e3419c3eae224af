"""Memory and start-up footprint of a tiny run per policy family: the controller and the whole process tree.

    python bench/footprint.py                      # toy (MLP), VLA (tiny OpenVLA), diffusion (tiny, D3PO)
    python bench/footprint.py --families toy vla

Each family runs as ``rlplat-train <preset> trainer.total_steps=2`` in a subprocess (its own local
Ray). Every 0.1 s the resident set size (RSS) of the controller process and of every process
below it (Ray's raylet, GCS, workers, simulators) is summed; the table reports the peaks, the
controller's peak alone, the Python modules the controller holds (model libraries should be
absent: they belong in the workers) and the start-up time (launch to the first training
iteration's line). Writes bench/results/footprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# A tiny run of each family: two iterations, no videos, no evaluation beyond the final one.
FAMILIES = {
    "toy": ["experiment=toy_mlp"],
    "vla": ["experiment=quickstart"],
    "diffusion": ["experiment=d3po_tiny"],
    # The reference case (SD-shaped tiny model, JPEG score): 468 MiB controller, 1.74 GB tree before.
    "diffusion_jpeg": ["experiment=d3po_tiny_jpeg"],
}
COMMON = ["trainer.total_steps=2", "trainer.eval_every=0", "trainer.eval_episodes=8", "trainer.save_video=false",
          "trainer.checkpoint_every=0", "logger.progress_bar=false"]
HEAVY_MODULES = ("transformers", "diffusers", "peft", "mani_skill")
# Printed by the controller at exit (rlplat.train runs it in-process): the heavy modules it imported.
PROBE = ("import atexit, sys; atexit.register(lambda: print('CONTROLLER_MODULES', "
         "sorted(m for m in {mods} if m in sys.modules), flush=True)); "
         "sys.argv = ['rlplat-train', *sys.argv[1:]]; from rlplat.train import main; main()")


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(RSS of ``root`` and every descendant, RSS of ``root``) in bytes; vanished processes count 0."""
    total = own = 0
    try:
        own = root.memory_info().rss
        total = own
        for child in root.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total, own


def measure(family: str, overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"rlplat-footprint-{family}-"))
    cmd = [sys.executable, "-c", PROBE.format(mods=repr(HEAVY_MODULES)), *overrides, *COMMON,
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = {"tree": 0, "controller": 0}
    lines: list[str] = []
    first_step: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not first_step and line.lstrip().startswith("step") and line.split()[1] != "0":
                first_step.append(time.perf_counter() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        total, own = tree_rss(root)
        peak["tree"], peak["controller"] = max(peak["tree"], total), max(peak["controller"], own)
        time.sleep(0.1)
    reader.join(timeout=10)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{family}: rlplat-train failed (rc {proc.returncode}):\n{''.join(lines[-40:])}")
    modules = next((line.split(" ", 1)[1].strip() for line in lines if line.startswith("CONTROLLER_MODULES")), "?")
    return {"family": family, "overrides": overrides + COMMON, "tree_peak_mib": peak["tree"] / 2**20,
            "controller_peak_mib": peak["controller"] / 2**20, "controller_heavy_modules": modules,
            "startup_s": first_step[0] if first_step else None, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "footprint.json")
    args = parser.parse_args()
    rows = [measure(family, FAMILIES[family]) for family in args.families]
    print(f"{'family':<10} {'tree peak MiB':>14} {'controller MiB':>15} {'start-up s':>11} {'wall s':>8}  controller holds")
    for r in rows:
        startup = f"{r['startup_s']:.1f}" if r["startup_s"] is not None else "-"
        print(f"{r['family']:<10} {r['tree_peak_mib']:>14.0f} {r['controller_peak_mib']:>15.0f} {startup:>11} "
              f"{r['wall_s']:>8.1f}  {r['controller_heavy_modules']}")
    result = {"cpu_count": os.cpu_count(), "rows": rows}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
