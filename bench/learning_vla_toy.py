"""Learning benchmark for the tiny OpenVLA: SFT warm start (S0), then PPO / GRPO from it, 3 seeds.

    python bench/learning_vla_toy.py                         # seeds 0 1 2, ppo and grpo
    python bench/learning_vla_toy.py --seeds 0 --rl-steps 10 # a quick look

Per seed: one ``algo=sft`` run on the toy env's scripted expert (the S0 checkpoint, evaluated
greedily on the fixed eval episodes), then one run per RL algorithm with
``policy.init_from=<that SFT run>``, evaluated on the same episodes every ``--eval-every``
iterations. Every run is a full ``rlplat-train`` (in-process, own local Ray). Prints a table of
success before (S0) and after RL (mean +- std over seeds) and writes everything to
bench/results/learning_vla_toy.json. The task is conf/env/toy_camera.yaml: the toy reach with one
square seen through a 32x32 camera (image + instruction only, no state), success radius 0.15.
"Before" is each RL run's own step-0 evaluation of the SFT weights (same episodes as "after").
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

# Shared by every run: quiet logs, no videos.
COMMON = ["name=bench_vla", "trainer.save_video=false", "logger.progress_bar=false", "logger.log_every=1000"]
# SFT: the preset that made the shipped quickstart checkpoint.
SFT = ["experiment=vla_toy_sft"]
# RL from each seed's own SFT run: the quickstart preset (GRPO, lr 1e-4, eval at step 0); PPO
# adds a fresh critic with its own lr, two critic-only iterations before the policy moves, and
# value_detach so the young critic's gradients do not reshape the SFT trunk (without it, success
# fell from 0.76 to 0.27 during the warm-up on seed 1).
RL = {
    "ppo": ["experiment=quickstart", "algo=ppo", "policy.value_head=true", "algo.critic_warmup_steps=2",
            "policy.value_lr=1e-3", "policy.value_detach=true"],
    "grpo": ["experiment=quickstart"],
}


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["env_steps"]), float(r["eval/success_rate"])) for r in read_metrics(run_dir / METRICS_FILE)
            if r.get("eval/success_rate") is not None]


def train_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per iteration: the rollouts' own success (sampled at policy.temperature, beside the greedy
    evaluation) and the policy's entropy per action dimension (nats; log 256 = 5.5 is uniform)."""
    rows = [r for r in read_metrics(run_dir / METRICS_FILE) if r["step"] > 0]
    return {key: [r.get(f"train/{key}") for r in rows] for key in ("success_rate", "entropy", "approx_kl")}


def run_one(overrides: list[str], run_dir: Path) -> dict:
    cfg = compose([*COMMON, *overrides])
    t0 = time.perf_counter()
    final = run(cfg, run_dir)
    curve = eval_curve(run_dir)
    return {"final_success": float(final["eval/success_rate"]), "curve": curve, "train": train_curves(run_dir),
            "env_steps": curve[-1][0], "wall_s": time.perf_counter() - t0, "run_dir": str(run_dir)}


def report(runs: list[dict], algos: list[str]) -> dict:
    """Prints every RL run (success before -> after, env steps, wall time) and the per-algorithm
    summary over seeds; returns the summary."""
    s0 = np.array([r["final_success"] for r in runs if r["algo"] == "sft"])
    summary = {"sft": {"S0_mean": float(s0.mean()), "S0_std": float(s0.std()), "values": s0.tolist()}} if len(s0) else {}
    print(f"\n{'algo':<6} {'seed':>4} {'before':>7} {'after':>7} {'env steps':>10} {'wall s':>7}")
    for r in runs:
        if r["algo"] != "sft":
            print(f"{r['algo']:<6} {r['seed']:>4} {r['before']:>7.3f} {r['final_success']:>7.3f} {r['env_steps']:>10} "
                  f"{r['wall_s']:>7.0f}")
    print(f"\n{'algo':<6} {'before (S0)':>16} {'after RL':>16} {'min after':>10} {'gain':>16} {'env steps':>10} {'wall s/run':>11}")
    for algo in algos:
        mine = [r for r in runs if r["algo"] == algo]
        before = np.array([r["before"] for r in mine])
        after = np.array([r["final_success"] for r in mine])
        gain = after - before
        summary[algo] = {"seeds": [r["seed"] for r in mine], "before_mean": float(before.mean()),
                         "after_mean": float(after.mean()), "after_std": float(after.std()),
                         "afters": after.tolist(), "min_after": float(after.min()),
                         "gain_mean": float(gain.mean()), "gain_std": float(gain.std()), "gains": gain.tolist(),
                         "env_steps": mine[0]["env_steps"],
                         "wall_s_mean": float(np.mean([r["wall_s"] for r in mine]))}
        print(f"{algo:<6} {before.mean():>9.3f} +- {before.std():.3f} {after.mean():>9.3f} +- {after.std():.3f} "
              f"{after.min():>10.3f} {gain.mean():>+9.3f} +- {gain.std():.3f} {mine[0]['env_steps']:>10} "
              f"{summary[algo]['wall_s_mean']:>11.0f}")
    return summary


def merge(files: list[Path], out: Path) -> None:
    """One JSON from several invocations run side by side (e.g. one per core): their runs
    together, the summary recomputed; refused unless every file ran the same settings."""
    docs = [json.loads(f.read_text()) for f in files]
    varying = ("algos", "seeds", "out", "merge")
    same = [{k: v for k, v in d["settings"].items() if k not in varying} | {"rl": d["rl"], "common": d["common"]}
            for d in docs]
    for f, s in zip(files[1:], same[1:], strict=True):
        if s != same[0]:
            raise SystemExit(f"--merge: {f} ran other settings than {files[0]}: "
                             f"{ {k: (same[0].get(k), v) for k, v in s.items() if same[0].get(k) != v} }")
    runs = [r for d in docs for r in d["runs"]]
    algos = list(dict.fromkeys(r["algo"] for r in runs if r["algo"] != "sft"))
    summary = report(runs, algos)
    settings = {**docs[0]["settings"], "algos": algos, "seeds": sorted({r["seed"] for r in runs}),
                "out": str(out), "merged_from": [str(f) for f in files]}
    out.write_text(json.dumps({"settings": settings, "common": docs[0]["common"], "sft": docs[0]["sft"],
                               "rl": docs[0]["rl"], "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo"], choices=sorted(RL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sft-steps", type=int, default=240,
                        help="SFT iterations (64 envs x 50 expert steps each; the vla_toy_sft preset's 240)")
    parser.add_argument("--rl-steps", type=int, default=20, help="RL iterations (64 envs x 50 steps each)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--sft-from", type=Path, default=None,
                        help="reuse the SFT runs of an earlier invocation (a folder with sft_seed<N>/ run dirs)")
    parser.add_argument("--shipped", action="store_true",
                        help="no SFT runs: every seed's RL starts from the shipped SFT checkpoint (policy=openvla_tiny_toy_sft)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every RL run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learning_vla_toy.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="run nothing: merge the JSON files of invocations run side by side into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.shipped and args.sft_from is not None:
        parser.error("--shipped and --sft-from both name the SFT start: give one")

    root = Path(tempfile.mkdtemp(prefix="rlplat-bench-vla-"))
    episodes = f"trainer.eval_episodes={args.eval_episodes}"
    runs = []
    for seed in args.seeds:
        if args.shipped:
            sft_dir, sft = None, None
        elif args.sft_from is not None:
            sft_dir = args.sft_from / f"sft_seed{seed}"
            curve = eval_curve(sft_dir)
            sft = {"final_success": curve[-1][1], "curve": curve, "wall_s": None, "run_dir": str(sft_dir)}
        else:
            sft_dir = root / f"sft_seed{seed}"
            sft = run_one([*SFT, f"seed={seed}", f"trainer.total_steps={args.sft_steps}",
                           f"trainer.eval_every={args.sft_steps}", episodes], sft_dir)
        if sft is not None:
            runs.append({"algo": "sft", "seed": seed, **sft})
            print(f"seed {seed}: SFT S0 = {sft['final_success']:.3f} ({sft['run_dir']})", flush=True)
        start = [] if sft_dir is None else [f"policy.init_from={sft_dir}"]
        for algo in args.algos:
            rl = run_one([*RL[algo], f"seed={seed}", *start, f"trainer.total_steps={args.rl_steps}",
                          f"trainer.eval_every={args.eval_every}", episodes, *args.set], root / f"{algo}_seed{seed}")
            before = rl["curve"][0][1]  # step 0: the SFT weights, evaluated in this run
            runs.append({"algo": algo, "seed": seed, "before": before, **rl})
            print(f"seed {seed}: {algo} {before:.3f} -> {rl['final_success']:.3f} ({rl['wall_s']:.0f} s)", flush=True)

    summary = report(runs, args.algos)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "common": COMMON, "sft": SFT, "rl": RL,
                                    "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
