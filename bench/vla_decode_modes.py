"""Greedy vs sampled decoding of one tiny-OpenVLA policy on the toy camera task: where it fails.

    python bench/vla_decode_modes.py                                   # the shipped SFT checkpoint
    python bench/vla_decode_modes.py --init-from outputs/quickstart/<date>_<time> --temperatures 1.0 0.5

The platform evaluates greedily (OpenVLA's argmax per action dimension) while RL trains the
policy it samples; this bench measures both on the same episodes (``--episodes`` envs, one
reset seed, episodes run to the limit so success at the end is defined too) and describes the
failures: how close they came to the target and whether their actions flip sign from step to
step (a greedy policy can lock into a two-state cycle that sampling escapes). Prints a table and
writes bench/results/vla_decode_modes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from rlplat.batch import Batch
from rlplat.config import compose


def rollout(policy, env, steps: int, deterministic: bool, seed: int) -> dict:
    torch.manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    success = np.zeros((steps, env.num_envs), bool)
    dist = np.zeros((steps, env.num_envs))
    actions = np.zeros((steps, env.num_envs, 2))
    with torch.no_grad():
        for t in range(steps):
            actions[t] = policy.act(Batch.from_numpy_dict(obs), deterministic=deterministic).actions.numpy()
            obs, _, _, _, info = env.step(actions[t])
            success[t] = info["success"]
            dist[t] = np.linalg.norm(env.gripper_pos - env.target_pos, axis=1)
    once = success.any(0)
    # Sign flips of the x / y action between consecutive steps, per episode (cycling).
    flips = (np.sign(actions[1:]) * np.sign(actions[:-1]) < 0).mean(axis=(0, 2))
    failed = ~once
    return {
        "success_once": float(once.mean()),
        # The last step of an episode that ran to the limit.
        "success_at_end": float(success[-2].mean()),
        "failures_min_dist_p10_p50_p90": np.percentile(dist[:-1].min(0)[failed], [10, 50, 90]).round(3).tolist()
        if failed.any() else None,
        # Successes keep moving around the target after it (no termination), so only failures.
        "sign_flip_rate_failures": float(flips[failed].mean()) if failed.any() else None,
        "distinct_actions": int(len(np.unique(actions.reshape(-1, 2).round(4), axis=0))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", default=None, help="run dir, checkpoint or export (default: the shipped SFT)")
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--temperatures", nargs="*", type=float, default=[1.0, 0.7, 0.5, 0.3])
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vla_decode_modes.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    overrides = ["experiment=quickstart", f"env.num_envs={args.episodes}"]
    if args.init_from:
        overrides.append(f"policy.init_from={args.init_from}")
    cfg = compose(overrides)
    env = instantiate(cfg.env, ignore_terminations=True)
    steps = int(cfg.env.max_episode_steps)
    rows = []
    for temperature in [None, *args.temperatures]:
        policy = instantiate(cfg.policy, observation_space=env.single_observation_space,
                             action_space=env.single_action_space, temperature=temperature or 1.0)
        row = {"decode": "greedy" if temperature is None else f"sampled T={temperature}",
               **rollout(policy, env, steps, temperature is None, args.seed)}
        rows.append(row)
        print(f"{row['decode']:<16} once {row['success_once']:.3f}  at end {row['success_at_end']:.3f}  "
              f"failures' closest approach p10/50/90 {row['failures_min_dist_p10_p50_p90']}  "
              f"failures' sign-flip rate {row['sign_flip_rate_failures'] or 0:.2f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "success_radius": float(cfg.env.success_radius),
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
