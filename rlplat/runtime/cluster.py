"""Start or connect to Ray, leaving nothing in the home directory.

Single machine: ``init_ray(ClusterConfig())`` starts a local Ray with its temp dir under
/tmp; ``shutdown_ray`` stops it and deletes that dir. Multi-node: ``ray start --head`` on
the head node, then ``ClusterConfig(address="auto")`` (or ``"ray://host:10001"``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Ray's unix socket paths (<temp_dir>/session_<date>_<pid>/sockets/plasma_store) must stay
# below 107 characters; the part after temp_dir takes up to ~65.
MAX_TEMP_DIR_CHARS = 40
# Object store size of a local Ray unless set: small enough for test machines and laptops.
DEFAULT_OBJECT_STORE_BYTES = 256 * 2**20

# Printed when init_ray starts a local Ray (tests look for it to tell that Ray started).
STARTED_MESSAGE = "started a local Ray"

# The temp dir init_ray created for the local Ray it started; shutdown_ray deletes it.
_owned_temp_dir: str | None = None


@dataclass
class ClusterConfig:
    """How to get a Ray cluster."""

    # null: start a local Ray in this process; "auto" or "ray://host:port": connect to one.
    address: str | None = None
    # CPUs of a local Ray (null: all of this machine's).
    num_cpus: int | None = None
    # GPUs of a local Ray (null: all visible ones).
    num_gpus: int | None = None
    # Temp dir of a local Ray, at most 40 characters (null: a fresh /tmp/rlplat-ray-* dir,
    # deleted at shutdown).
    temp_dir: str | None = None
    # Start Ray's dashboard with a local Ray.
    include_dashboard: bool = False
    # Print the workers' stdout/stderr in the driver.
    log_to_driver: bool = True
    # Level of the workers' Python logging (their INFO lines stay in Ray's log files).
    worker_log_level: str = "WARNING"
    # Object store bytes of a local Ray (null: 256 MiB).
    object_store_memory: int | None = None


def init_ray(cfg: ClusterConfig | None = None) -> bool:
    """Start a local Ray or connect to a cluster, unless Ray is already initialised here.

    Sets ``RAY_AUTH_MODE=disabled`` (Ray 2.60 otherwise writes ``~/.ray/auth_token``) and
    ``RAY_USAGE_STATS_ENABLED=0`` unless they are set already.

    Returns:
        True if this call initialised Ray in this process (then ``shutdown_ray(True)`` stops
        the local Ray, or disconnects from the cluster); False if Ray was already up.

    Raises:
        ValueError: ``temp_dir`` is too long for Ray's socket paths.
    """
    global _owned_temp_dir
    cfg = cfg or ClusterConfig()
    if cfg.address is None and cfg.temp_dir is not None:
        temp_dir = os.path.abspath(cfg.temp_dir)
        if len(temp_dir) > MAX_TEMP_DIR_CHARS:
            raise ValueError(
                f"cluster.temp_dir {temp_dir!r} has {len(temp_dir)} characters; Ray's socket "
                f"paths under it must stay below 107, so use at most {MAX_TEMP_DIR_CHARS} "
                "(e.g. a dir under /tmp), or null for a fresh one"
            )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers' output reaches the driver's console: no progress bars from the model libraries,
    # and no colour codes when the console is a file or a pipe.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray

    if ray.is_initialized():
        return False
    if cfg.address is not None:
        ray.init(address=cfg.address, log_to_driver=cfg.log_to_driver, logging_config=_worker_logging(cfg))
        return True

    if cfg.temp_dir is None:
        temp_dir = owned = tempfile.mkdtemp(prefix="rlplat-ray-", dir="/tmp")
    else:
        os.makedirs(temp_dir, exist_ok=True)
        owned = None
    try:
        ray.init(
            # "local" always starts a new Ray, even when RAY_ADDRESS points at a cluster.
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory or DEFAULT_OBJECT_STORE_BYTES,
            include_dashboard=cfg.include_dashboard,
            log_to_driver=cfg.log_to_driver,
            logging_config=_worker_logging(cfg),
            _temp_dir=temp_dir,
        )
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    _owned_temp_dir = owned
    print(f"{STARTED_MESSAGE} (temp dir {temp_dir}; dashboard {'on' if cfg.include_dashboard else 'off'})",
          flush=True)
    return True


def _worker_logging(cfg: ClusterConfig) -> Any:
    """Workers log at ``cluster.worker_log_level`` (WARNING: their warnings and errors reach the
    driver's console, their info lines stay in Ray's log files)."""
    import ray

    return ray.LoggingConfig(log_level=cfg.worker_log_level)


def shutdown_ray(started: bool) -> None:
    """Undo ``init_ray`` when it returned True: shut Ray down and delete the temp dir it made."""
    global _owned_temp_dir
    if not started:
        return
    import ray

    ray.shutdown()
    if _owned_temp_dir is not None:
        shutil.rmtree(_owned_temp_dir, ignore_errors=True)
        _owned_temp_dir = None


def init_ray_until_exit(cfg: ClusterConfig | None = None) -> None:
    """``init_ray`` for the rest of this process (a sweep's jobs share it): a Ray this call
    starts is shut down when the process exits."""
    import atexit

    if init_ray(cfg):
        atexit.register(shutdown_ray, True)


@contextmanager
def ray_session(cfg: ClusterConfig | None = None) -> Iterator[bool]:
    """``init_ray`` on entry, ``shutdown_ray`` on exit; yields whether this session started Ray."""
    started = init_ray(cfg)
    try:
        yield started
    finally:
        shutdown_ray(started)
