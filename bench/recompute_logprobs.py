"""How far the first PPO/GRPO ratio is from 1, with and without ``algo.recompute_old_logprobs``.

    python bench/recompute_logprobs.py                 # tiny OpenVLA (quickstart's SFT), fp32 and bf16
    python bench/recompute_logprobs.py --steps 10 --num-envs 8

The rollout scores its actions as it samples them (KV-cached decoding, eval mode, the rollout's
batch shape); the update scores them again with a full forward pass in training mode on
minibatches. In exact arithmetic the two agree and the first minibatch's ratio is 1; in bf16 they
do not, so the clip band is partly spent before any step. Per dtype this collects one rollout on
the toy camera env with the quickstart policy (the shipped SFT checkpoint), then runs one GRPO
update on it from identical weights with ``recompute_old_logprobs`` false and true, and reports
``train/ratio_dev_first`` (mean |ratio - 1| over the first minibatch, before its step) and the
approx KL of the update. No Ray: the workers are plain objects here. Prints a table and writes
bench/results/recompute_logprobs.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlplat.batch import Batch
from rlplat.config import compose
from rlplat.workers.policy import PolicyWorker


def rollout(worker: PolicyWorker, env, steps: int, seed: int) -> Batch:
    """``steps`` sampled steps of every env, with random advantages (only the ratio is measured)."""
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(steps):
        obs_batch = Batch.from_numpy_dict(obs)
        out = worker.act(obs_batch)
        record = obs_batch.select(*obs.keys())
        record.update(out)
        rows.append(record)
        obs, *_ = env.step(out["actions"].numpy())
    batch = Batch.concat(rows)
    g = torch.Generator().manual_seed(seed)
    batch["advantages"] = torch.randn(len(batch), generator=g)
    batch["mask"] = torch.ones(len(batch), dtype=torch.bool)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="rollout steps per env")
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "recompute_logprobs.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = []
    for dtype in args.dtypes:
        cfg = compose(["experiment=quickstart", f"policy.dtype={dtype}", f"env.num_envs={args.num_envs}",
                       f"algo.num_minibatches={args.minibatches}", "algo.update_epochs=1"])
        env = instantiate(cfg.env)
        policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
        algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True)

        def worker(recompute: bool) -> PolicyWorker:
            return PolicyWorker(policy_cfg=policy_cfg, algo_cfg={**algo_cfg, "recompute_old_logprobs": recompute},
                                observation_space=env.single_observation_space, action_space=env.single_action_space,
                                roles=["rollout", "actor"], seed=args.seed)

        batch = rollout(worker(False), env, args.steps, args.seed)
        row = {"dtype": dtype, "rows": len(batch)}
        for recompute in (False, True):
            metrics = worker(recompute).update(batch.select(*batch.keys()), lr=float(algo_cfg["optim"]["lr"]))
            row[f"ratio_dev_first_{'on' if recompute else 'off'}"] = metrics["train/ratio_dev_first"]
            row[f"approx_kl_{'on' if recompute else 'off'}"] = metrics["train/approx_kl"]
        env.close()
        results.append(row)

    print(f"\n{'dtype':>9} {'rows':>5} {'mean |r-1| off':>15} {'on':>10} {'approx KL off':>14} {'on':>10}")
    for r in results:
        print(f"{r['dtype']:>9} {r['rows']:>5} {r['ratio_dev_first_off']:>15.2e} {r['ratio_dev_first_on']:>10.2e} "
              f"{r['approx_kl_off']:>14.2e} {r['approx_kl_on']:>10.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
