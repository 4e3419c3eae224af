"""Ray runtime: cluster start/connect, placement of roles on devices, workers and worker groups.

Names are imported lazily, so ``import rlplat.runtime.cluster`` (done by ``rlplat.config``)
does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterConfig": "cluster",
    "init_ray": "cluster",
    "shutdown_ray": "cluster",
    "ray_session": "cluster",
    "Dispatch": "dispatch",
    "register": "dispatch",
    "Worker": "worker",
    "WorkerGroup": "worker_group",
    "GroupCall": "worker_group",
    "Placement": "placement",
    "PlacementSpec": "placement",
    "parse_devices": "placement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlplat.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlplat.runtime.{_EXPORTS[name]}"), name)
