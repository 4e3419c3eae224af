"""Rollout throughput: raw simulator vs the platform, and sequential vs pipelined rollout.

    python bench/rollout.py                 # ManiSkill3 PushCube on CPU (needs mani_skill + Vulkan)
    python bench/rollout.py --env toy       # the numpy toy task, no simulator needed

Three measurements in one run, all in env steps per second (one env step = one env advancing once):

1. **raw**: the env class alone in this process (``instantiate(env)``), ``reset`` + one episode of
   zero actions, as fast as the simulator goes, for each ``--noop-envs`` pair of ``env.num_envs``
   and ``env.envs_per_process`` (ManiSkill/LIBERO CPU: 1 = a subprocess per scene).
2. **platform, no-op policy**: the same env config as an EnvWorker behind Ray, driven by
   ``EnvCollector.collect_rollout`` with ``policy=constant`` (zero actions) on the colocated
   placement: the same reset + episode, plus Ray calls, Batch transfers and record assembly.
   ``overhead ratio`` = platform / raw (goal >= 0.9). The controller's waits per env step are
   split into ``act`` (the policy round trip) and ``env`` (the env worker round trip). For scale,
   a bare Ray actor call is timed too (no payload, and a Batch of the first config's rows each way).
   The same again with ``placement.rollout_in_env=true`` (**in env**): the env worker holds the
   policy and runs the whole rollout, one Ray call per rollout instead of two per step (``act``:
   the env worker's time in its policy replica).
3. **sequential vs pipelined, tiny VLA on camera images**: ``policy=openvla_tiny`` with the env in
   rgb mode, the env on one device and the policy on the other (``placement=disaggregated``) vs
   the same with ``placement.pipeline_stages=2`` (``placement=pipelined``: stage 0 simulates while
   the policy acts for stage 1). ``speedup`` = pipelined / sequential (goal >= 1.6 on 2 cores).
   Overlap can at best hide the shorter of the two waits: ``bound`` = (act + env) / max(act, env)
   from the sequential run.

Every number is the median over ``--repeats`` rounds after one warm-up round; the raw run of a
config stays open while each platform variant is open beside it in turn, and the two take turns
within each round, so a slow spell of the machine (these 2-core machines have them) falls on
both; each ratio divides by the raw rounds its variant took turns with. Prints a table and writes
bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import ray
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlplat.batch import Batch
from rlplat.config import compose
from rlplat.loops.embodied import embodied_run
from rlplat.runtime.cluster import ClusterConfig, ray_session

ENVS = {
    "maniskill": ["env=maniskill_pushcube"],
    "toy": ["env=toy"],
}
# Every platform run: GRPO's episodic rollouts (reset + one episode, like the raw loop; the update
# is never run here, one minibatch keeps the batch arithmetic valid at any size; two eval envs, the
# fewest a 2-stage pipeline builds, since every eval env is a simulator process), no
# evaluation or checkpoints.
COMMON = ["algo=grpo", "algo.group_size=2", "algo.num_minibatches=1", "trainer.eval_episodes=2", "trainer.save_video=false", "logger.progress_bar=false"]


class RawRun:
    """The env class alone in this process; ``once()``: reset + one episode of zero actions."""

    def __init__(self, overrides: list[str]) -> None:
        cfg = compose(overrides)
        self.env = instantiate(OmegaConf.to_container(cfg.env, resolve=True))
        self.zeros = np.zeros(self.env.action_space.shape, np.float32)
        self.rounds = 0

    def once(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.env.reset(seed=self.rounds * self.env.num_envs)
        for _ in range(self.env.max_episode_steps):
            self.env.step(self.zeros)
        self.rounds += 1
        return {"steps_per_s": self.env.num_envs * self.env.max_episode_steps / (time.perf_counter() - t0)}

    def close(self) -> None:
        self.env.close()


class PlatformRun:
    """``EnvCollector.collect_rollout`` on ``overrides``; ``once()``: one rollout, with the
    controller's waits per env step in ms (``act_ms``, ``env_ms``)."""

    def __init__(self, overrides: list[str]) -> None:
        self.loop = embodied_run(compose(overrides), Path(tempfile.mkdtemp(prefix="rlplat-bench-rollout-")))

    def once(self) -> dict[str, float]:
        loop = self.loop
        t0 = time.perf_counter()
        _, metrics = loop.collector.collect_rollout()
        return {"steps_per_s": loop.collector.num_envs * loop.collector.num_steps / (time.perf_counter() - t0),
                "act_ms": 1e3 * metrics["perf/rollout_act_s"] / loop.collector.num_steps,
                "env_ms": 1e3 * metrics["perf/rollout_env_s"] / loop.collector.num_steps}

    def close(self) -> None:
        self.loop.shutdown()


def measure(runs: list[RawRun | PlatformRun], repeats: int) -> list[dict[str, float]]:
    """Medians over ``repeats`` rounds after a warm-up round; within a round the runs take turns,
    so a slower or faster spell of the machine falls on all of them alike."""
    rows: list[list[dict[str, float]]] = [[] for _ in runs]
    for r in range(repeats + 1):
        for run, mine in zip(runs, rows):
            row = run.once()
            if r > 0:  # the first round is a warm-up
                mine.append(row)
    return [{key: statistics.median(row[key] for row in mine) for key in mine[0]} for mine in rows]


@ray.remote(num_cpus=0)
class _Echo:
    """A bare actor: what one Ray round trip costs before any platform code runs."""

    def ping(self) -> int:
        return 1

    def act(self, obs: Batch) -> Batch:
        rows = len(obs["state"])
        return Batch({"actions": torch.zeros(rows, 8), "logprobs": torch.zeros(rows)})


def ray_round_trip_ms(rows: int, calls: int = 300) -> dict[str, float]:
    """Median ms of a bare actor call: ``ping`` (no payload) and ``act`` (a ``rows``-row Batch
    each way, the shape of a no-op policy step), after 50 warm-up calls each."""
    actor = _Echo.remote()
    obs = Batch({"state": torch.zeros(rows, 42)})
    result = {}
    try:
        for name, call in (("ping_ms", actor.ping.remote), ("act_ms", lambda: actor.act.remote(obs))):
            times = []
            for i in range(50 + calls):
                t0 = time.perf_counter()
                ray.get(call())
                if i >= 50:
                    times.append(time.perf_counter() - t0)
            result[name] = 1e3 * statistics.median(times)
    finally:
        ray.kill(actor)
    return result


def platform_steps_per_s(overrides: list[str], repeats: int) -> dict[str, float]:
    """One platform config alone: medians of ``PlatformRun.once`` over repeats after a warm-up."""
    with closing(PlatformRun(overrides)) as run:
        return measure([run], repeats)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=sorted(ENVS), default="maniskill")
    parser.add_argument("--sim-backend", choices=["physx_cpu", "physx_cuda"], default="physx_cpu",
                        help="ManiSkill only: physx_cuda runs one batched GPU env per worker")
    parser.add_argument("--gpu", action="store_true", help="placements reserve a GPU per bundle (GPU machines)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--parts", nargs="+", choices=["noop", "vla"], default=["noop", "vla"])
    parser.add_argument("--noop-envs", nargs="+", default=["16x1", "16x8", "64x32"],
                        help="raw vs platform comparisons as NUM_ENVSxENVS_PER_PROCESS (CPU simulators; "
                             "the toy env ignores the grouping)")
    parser.add_argument("--episode-steps", type=int, default=50, help="env.max_episode_steps (steps per rollout)")
    parser.add_argument("--vla-num-envs", type=int, default=8, help="envs of the sequential vs pipelined comparison")
    parser.add_argument("--vla-episode-steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32, help="camera side for the VLA part (the tiny VLA's input)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every config")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout.json")
    args = parser.parse_args()

    backend = [f"env.sim_backend={args.sim_backend}"] if args.env == "maniskill" else []
    placement_gpu = ["placement.use_gpu=true"] if args.gpu else []
    env = [*ENVS[args.env], *backend, f"env.max_episode_steps={args.episode_steps}", *args.set]
    camera = "env.obs_mode=rgb" if args.env == "maniskill" else "env.obs_mode=state+rgb"
    vla = [*ENVS[args.env], *backend, f"env.max_episode_steps={args.vla_episode_steps}", f"env.num_envs={args.vla_num_envs}",
           camera, f"env.image_size={args.image_size}", "policy=openvla_tiny", *args.set]
    result: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    configs = []
    for spec in args.noop_envs:
        num_envs, _, per_process = spec.partition("x")
        if not (num_envs.isdigit() and per_process.isdigit()):
            parser.error(f"--noop-envs: {spec!r} is not NUM_ENVSxENVS_PER_PROCESS (e.g. 16x8)")
        configs.append((int(num_envs), int(per_process)))

    with ray_session(ClusterConfig(num_cpus=args.num_cpus)):
        if "noop" in args.parts:
            result["noop"] = []
            for num_envs, per_process in configs:
                noop = [*env, f"env.num_envs={num_envs}"]
                noop += [f"env.envs_per_process={per_process}"] if args.env != "toy" else []
                platform = [*noop, *COMMON, "policy=constant", "placement=colocated", *placement_gpu]
                row = {"num_envs": num_envs, "envs_per_process": per_process}
                # The raw env stays open; each platform variant takes turns with it in its own pair
                # (three sets of simulator processes at once would not fit 16 subprocess envs in memory).
                with closing(RawRun(noop)) as raw_run:
                    for key, overrides in (("platform", platform),
                                           ("platform_in_env", [*platform, "placement.rollout_in_env=true"])):
                        with closing(PlatformRun(overrides)) as platform_run:
                            raw, row[key] = measure([raw_run, platform_run], args.repeats)
                        suffix = key.removeprefix("platform")
                        row[f"raw_steps_per_s{suffix}"] = raw["steps_per_s"]
                        row[f"overhead_ratio{suffix}"] = row[key]["steps_per_s"] / raw["steps_per_s"]
                        print(f"{num_envs} envs, {per_process}/process: raw {raw['steps_per_s']:9.1f}, {key} "
                              f"{row[key]['steps_per_s']:9.1f} env steps/s", flush=True)
                result["noop"].append(row)
            result["ray_round_trip"] = ray_round_trip_ms(configs[0][0])
            print(f"bare Ray actor call: {result['ray_round_trip']['ping_ms']:.2f} ms, with a {configs[0][0]}-row "
                  f"Batch each way {result['ray_round_trip']['act_ms']:.2f} ms", flush=True)
        if "vla" in args.parts:
            seq = platform_steps_per_s([*vla, *COMMON, "placement=disaggregated", *placement_gpu], args.repeats)
            print(f"tiny VLA, sequential:      {seq['steps_per_s']:9.1f} env steps/s", flush=True)
            pipe = platform_steps_per_s([*vla, *COMMON, "placement=pipelined", *placement_gpu], args.repeats)
            print(f"tiny VLA, pipelined (K=2): {pipe['steps_per_s']:9.1f} env steps/s", flush=True)
            result["vla"] = {"sequential": seq, "pipelined": pipe,
                             "pipeline_speedup": pipe["steps_per_s"] / seq["steps_per_s"],
                             "overlap_bound": (seq["act_ms"] + seq["env_ms"]) / max(seq["act_ms"], seq["env_ms"])}

    print(f"\n{'measurement':<40} {'env steps/s':>12} {'act ms':>8} {'env ms':>8} {'ratio':>7} {'goal':>6}")
    for row in result.get("noop", []):
        for label, suffix in (("platform, no-op policy", ""), ("platform, no-op policy, in env", "_in_env")):
            name, p = f"raw, {row['num_envs']} envs, {row['envs_per_process']} per process", row[f"platform{suffix}"]
            print(f"{name:<40} {row[f'raw_steps_per_s{suffix}']:>12.1f}")
            print(f"{label:<40} {p['steps_per_s']:>12.1f} {p['act_ms']:>8.2f} {p['env_ms']:>8.2f} "
                  f"{row[f'overhead_ratio{suffix}']:>7.2f} {'>=0.9':>6}")
    if "ray_round_trip" in result:
        trip = result["ray_round_trip"]
        print(f"{'bare Ray actor call: ping / act-sized':<40} {'':>12} {trip['act_ms']:>8.2f} {'':>8} "
              f"(ping {trip['ping_ms']:.2f} ms)")
    if "vla" in result:
        v = result["vla"]
        for name, key in (("tiny VLA rgb, sequential", "sequential"), ("tiny VLA rgb, pipelined (2 stages)", "pipelined")):
            r = v[key]
            ratio = f"{v['pipeline_speedup']:>7.2f} {'>=1.6':>6}" if key == "pipelined" else ""
            print(f"{name:<40} {r['steps_per_s']:>12.1f} {r['act_ms']:>8.2f} {r['env_ms']:>8.2f} {ratio}")
        print(f"{'overlap bound (act+env)/max(act,env)':<40} {'':>12} {'':>8} {'':>8} {v['overlap_bound']:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
