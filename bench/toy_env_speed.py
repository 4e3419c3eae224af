"""Steps per second of ToyReachEnv over batch sizes and observation modes (numpy only).

Run single-threaded so the numbers describe one env worker on one core:

    OMP_NUM_THREADS=1 python bench/toy_env_speed.py

Actions are uniform random, so episodes mostly run to the 50-step limit and the cost of
auto-resets (about num_envs / 50 per step) is included. Prints a table and writes
``bench/results/toy_env_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from rlplat.envs.toy import ToyReachEnv


def measure(
    num_envs: int, obs_mode: str, steps: int, warmup: int, image_size: int
) -> dict[str, float]:
    """Times ``steps`` env.step calls after ``warmup`` untimed ones.

    Args:
        num_envs: Sub-envs per vector env.
        obs_mode: ToyReachEnv obs mode.
        steps: Timed vector steps.
        warmup: Untimed vector steps first (caches, allocator).
        image_size: Image side in pixels for rgb modes.

    Returns:
        Vector steps/s, env steps/s (vector steps/s * num_envs) and microseconds per vector step.
    """
    env = ToyReachEnv(num_envs=num_envs, obs_mode=obs_mode, image_size=image_size)
    env.reset(seed=0)
    # Pre-draw the actions so the timing holds only the env.
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (warmup + steps, num_envs, 2)).astype(np.float32)
    for a in actions[:warmup]:
        env.step(a)
    start = time.perf_counter()
    for a in actions[warmup:]:
        env.step(a)
    seconds = time.perf_counter() - start
    return {
        "vector_steps_per_s": steps / seconds,
        "env_steps_per_s": steps * num_envs / seconds,
        "us_per_vector_step": seconds / steps * 1e6,
    }


def main() -> None:
    """Parses arguments, runs the grid, prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--obs-modes", nargs="+", default=["state", "rgb"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--env-steps", type=int, default=200_000, help="state-mode env steps timed per cell"
    )
    parser.add_argument(
        "--min-steps", type=int, default=50, help="at least this many vector steps per cell"
    )
    parser.add_argument("--warmup", type=int, default=20)
    default_out = Path(__file__).parent / "results" / "toy_env_speed.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()

    rows = []
    print(f"{'obs_mode':<10}{'num_envs':>9}{'vec steps/s':>14}{'env steps/s':>14}{'us/step':>10}")
    for obs_mode in args.obs_modes:
        for num_envs in args.num_envs:
            # An rgb env step costs ~20x a state one; a smaller budget keeps the run short.
            budget = args.env_steps // (1 if obs_mode == "state" else 20)
            steps = max(args.min_steps, budget // num_envs)
            result = measure(num_envs, obs_mode, steps, args.warmup, args.image_size)
            rows.append({"obs_mode": obs_mode, "num_envs": num_envs, "steps": steps, **result})
            print(
                f"{obs_mode:<10}{num_envs:>9}{result['vector_steps_per_s']:>14,.0f}"
                f"{result['env_steps_per_s']:>14,.0f}{result['us_per_vector_step']:>10.1f}"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "toy_env_speed",
        "image_size": args.image_size,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
