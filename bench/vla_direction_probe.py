"""Where a tiny-OpenVLA toy policy points the wrong way: greedy direction vs gripper-target distance.

    python bench/vla_direction_probe.py                                  # the shipped SFT checkpoint
    python bench/vla_direction_probe.py --init-from outputs/vla_toy_sft/<date>_<time> --patch 0.25

Places the gripper at a random offset from the target (distance uniform in [0.15, 1.0], any
angle, inside the arena) on ``--scenes`` fresh toy-camera scenes, takes the policy's greedy
action and counts how often it points away from the target (cosine with the expert's action
< 0), per distance band, split by whether gripper and target fall in the same ViT patch
(``--patch``: the patch side in arena units, 8 px of the 32 px camera = 0.5). A greedy policy
that points the wrong way next to the target locks into a two-step cycle or pushes into the
arena wall, which sampling escapes and greedy evaluation does not (bench/vla_decode_modes.py).
Prints a table and writes bench/results/vla_direction_probe.json.
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

BANDS = [(0.15, 0.3), (0.3, 0.45), (0.45, 0.6), (0.6, 0.8), (0.8, 1.0)]
# The gripper stays this far inside the arena border, so no probe state touches a wall.
INSIDE = 0.95


def probe(policy, env, rng: np.random.Generator, rounds: int, patch: float) -> np.ndarray:
    """Rows (distance, cosine with the expert, same patch) over ``rounds`` x num_envs states."""
    rows = []
    for r in range(rounds):
        env.reset(seed=1000 * r)
        n = env.num_envs
        dist, angle = rng.uniform(0.15, 1.0, n), rng.uniform(0, 2 * np.pi, n)
        target = env.target_pos
        gripper = target + np.stack([dist * np.cos(angle), dist * np.sin(angle)], 1)
        inside = (np.abs(gripper) <= INSIDE).all(1)
        env._gripper[:] = np.clip(gripper, -INSIDE, INSIDE)  # noqa: SLF001 - a probe sets the state directly
        obs = env._observe(np.arange(n))  # noqa: SLF001
        expert = env.expert_actions()
        with torch.no_grad():
            action = policy.act(Batch.from_numpy_dict(obs), deterministic=True).actions.numpy()
        cos = (action * expert).sum(1) / (np.linalg.norm(action, axis=1) * np.linalg.norm(expert, axis=1) + 1e-9)
        same = (np.floor((env.gripper_pos + 1) / patch) == np.floor((target + 1) / patch)).all(1)
        d = np.linalg.norm(env.gripper_pos - target, axis=1)
        rows.append(np.stack([d, cos, same], 1)[inside])
    return np.concatenate(rows)


def wrong_direction(rows: np.ndarray, select: np.ndarray) -> dict:
    """``n`` selected states and the fraction of them whose greedy action points away (None if n = 0)."""
    return {"n": int(select.sum()), "wrong_direction": float(np.mean(rows[select, 1] < 0)) if select.any() else None}


def _fmt(part: dict) -> str:
    rate = "  -  " if part["wrong_direction"] is None else f"{part['wrong_direction']:.2f}"
    return f"{rate} (n {part['n']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", default=None, help="run dir, checkpoint or export (default: the shipped SFT)")
    parser.add_argument("--scenes", type=int, default=256, help="envs per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--patch", type=float, default=0.5, help="ViT patch side in arena units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vla_direction_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    overrides = ["experiment=quickstart", f"env.num_envs={args.scenes}"]
    if args.init_from:
        overrides.append(f"policy.init_from={args.init_from}")
    cfg = compose(overrides)
    env = instantiate(cfg.env)
    policy = instantiate(cfg.policy, observation_space=env.single_observation_space,
                         action_space=env.single_action_space)
    rows = probe(policy, env, np.random.default_rng(args.seed), args.rounds, args.patch)
    table = []
    for low, high in BANDS:
        band = (rows[:, 0] >= low) & (rows[:, 0] < high)
        entry = {"distance": [low, high], **wrong_direction(rows, band),
                 "mean_cos": float(rows[band, 1].mean()) if band.any() else None,
                 "same_patch": wrong_direction(rows, band & (rows[:, 2] > 0)),
                 "other_patch": wrong_direction(rows, band & (rows[:, 2] == 0))}
        table.append(entry)
        print(f"d [{low:.2f}, {high:.2f}): wrong direction {_fmt(entry)}; same patch {_fmt(entry['same_patch'])}, "
              f"other patch {_fmt(entry['other_patch'])}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "bands": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
