"""``hydra/launcher=rlplat_ray``: sweep jobs as Ray tasks on the cluster the runs use.

Each job's controller runs as a Ray task (0 CPUs: it only coordinates) and places its own workers
in its own placement group, as a single run does. The launcher starts a job only when the
resources its placement declares (``placement``: devices x CPUs / GPUs per device) fit next to
the jobs already running, in job order, so concurrent jobs share the cluster (GPU fractions
included) and never oversubscribe it; a job that needs more than the whole cluster is refused
before anything starts. Results come back in job order, as Hydra's sweepers expect.

Why not hydra-ray-launcher: its last release (1.2.2) pins ``cloudpickle<3``, which LIBERO
(``cloudpickle>=3``) refuses, and it starts its own Ray rather than joining the runs' cluster.
"""

# No `from __future__ import annotations` here: Hydra executes plugin modules without entering
# them in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RlplatRayLauncherConf:
    _target_: str = "hydra_plugins.rlplat_launchers.ray_launcher.RlplatRayLauncher"
    # Ray to use: null starts a local one (cluster.num_cpus / num_gpus below), "auto" or
    # "ray://host:10001" joins a running cluster (the one `ray start --head` made).
    address: Any = None
    # CPUs / GPUs of a local Ray (null: all of this machine's).
    num_cpus: Any = None
    num_gpus: Any = None
    # Jobs running at once, besides the resource limit (null: as many as fit).
    max_concurrent: Any = None


ConfigStore.instance().store(group="hydra/launcher", name="rlplat_ray", node=RlplatRayLauncherConf, provider="rlplat")


def _run_job(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction,
             singleton_state: dict[Any, Any]) -> JobReturn:
    """One job inside its Ray task: Hydra's globals restored, then the job as Hydra runs it."""
    from hydra.core.hydra_config import HydraConfig

    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def job_resources(sweep_config: DictConfig) -> dict[str, float]:
    """What a job's placement group reserves: the sum of its bundles (CPU, GPU)."""
    from rlplat.runtime.placement import PlacementSpec

    needed: dict[str, float] = {}
    for bundle in PlacementSpec.from_config(sweep_config.placement).bundles():
        for key, value in bundle.items():
            needed[key] = needed.get(key, 0.0) + float(value)
    return needed


def fits(need: dict[str, float], used: dict[str, float], total: dict[str, float]) -> bool:
    return all(used.get(k, 0.0) + v <= total.get(k, 0.0) + 1e-9 for k, v in need.items())


class RlplatRayLauncher(Launcher):
    def __init__(self, address: Any = None, num_cpus: Any = None, num_gpus: Any = None,
                 max_concurrent: Any = None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.max_concurrent = max_concurrent
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _ray(self) -> Any:
        import ray

        from rlplat.runtime.cluster import ClusterConfig, init_ray_until_exit

        cluster = OmegaConf.to_container(self.config.cluster, resolve=True) if "cluster" in self.config else {}
        cluster |= {k: v for k, v in (("address", self.address), ("num_cpus", self.num_cpus),
                                      ("num_gpus", self.num_gpus)) if v is not None}
        init_ray_until_exit(ClusterConfig(**cluster))
        return ray

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        ray = self._ray()
        total = {k: float(v) for k, v in ray.cluster_resources().items()}
        remote = ray.remote(num_cpus=0, max_retries=0)(_run_job)

        jobs = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"rlplat_ray_{idx}"
                sweep_config.hydra.job.num = idx
            need = job_resources(sweep_config)
            if not fits(need, {}, total):
                raise RuntimeError(
                    f"sweep job #{idx} ({' '.join(filter_overrides(overrides))}) needs {need} for its placement; "
                    f"the Ray cluster has {({k: total.get(k, 0.0) for k in need})} in all. Lower placement.num_devices "
                    "or placement.cpus_per_device, or join a bigger cluster (hydra.launcher.address=auto)")
            jobs.append((idx, overrides, sweep_config, need))

        log.info(f"rlplat_ray: {len(jobs)} jobs on a cluster with {total}, sweep dir {self.config.hydra.sweep.dir}")
        results: dict[int, JobReturn] = {}
        running: dict[Any, tuple[int, dict[str, float]]] = {}
        used: dict[str, float] = {}
        pending = list(jobs)
        limit = self.max_concurrent or len(jobs) or 1
        while pending or running:
            # Start jobs in order while the next one fits beside those running.
            while pending and len(running) < limit and fits(pending[0][3], used, total):
                idx, overrides, sweep_config, need = pending.pop(0)
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}  ({need})")
                ref = remote.remote(self.hydra_context, sweep_config, self.task_function, Singleton.get_state())
                running[ref] = (idx, need)
                for k, v in need.items():
                    used[k] = used.get(k, 0.0) + v
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                idx, need = running.pop(ref)
                for k, v in need.items():
                    used[k] -= v
                results[idx] = ray.get(ref)
        return [results[idx] for idx, *_ in jobs]
