"""Where roles run: role -> device indices, one Ray placement group with a bundle per device.

A *device* is a GPU, or a CPU bundle when there are no GPUs, so the same specs run on a laptop
and on a GPU node::

    colocated:      {env: "0-1", rollout: "0-1", actor: "0-1"}
    disaggregated:  {env: "0",   rollout: "1",   actor: "1"}

Roles with identical device lists fuse into one worker group (rollout and actor above share
one policy worker, so no weights are synced), except roles the caller names in
``never_fuse`` (the env role: it is another worker class). Worker groups that share a device
each get an equal fraction of it. Fractions only schedule: Ray does not limit memory, and no
role is offloaded, so a role that does not fit fails when it loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlplat.registry import checked

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _resources(index: int, bundle: Any) -> dict[str, float]:
    """One device's resource mapping from placement.bundles, checked."""
    if not isinstance(bundle, Mapping) or not bundle:
        raise ValueError(f"placement.bundles[{index}] must be a resource mapping such as {{CPU: 4, GPU: 1}}, "
                         f"got {bundle!r}")
    out = {}
    for key, value in bundle.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"placement.bundles[{index}].{key}={value!r}: an amount >= 0 (e.g. CPU: 4)")
        out[str(key)] = float(value)
    if not any(out.values()):
        raise ValueError(f"placement.bundles[{index}] reserves nothing ({bundle!r}): give it CPUs or another resource")
    return out


def parse_devices(spec: str | int | Sequence[int]) -> list[int]:
    """Device indices of a spec: ``"0-1"`` -> [0, 1], ``"0,2-3"`` -> [0, 2, 3], ``1`` -> [1].

    Raises:
        ValueError: malformed spec, a descending range, a negative or repeated index.
    """
    if isinstance(spec, bool):
        raise ValueError(f"bad device spec {spec!r}: expected e.g. 0, '0-1' or '0,2-3'")
    if isinstance(spec, int):
        devices = [spec]
    elif isinstance(spec, str):
        devices = []
        for part in spec.split(","):
            match = _RANGE.match(part)
            if match is None:
                raise ValueError(f"bad device spec {spec!r}: expected e.g. '0', '0-1' or '0,2-3'")
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"bad device spec {spec!r}: range {part.strip()!r} is descending")
            devices.extend(range(lo, hi + 1))
    else:
        try:
            devices = [int(d) for d in spec]
        except (TypeError, ValueError):
            raise ValueError(
                f"bad device spec {spec!r}: expected e.g. 0, '0-1' or '0,2-3'"
            ) from None
    if not devices or any(d < 0 for d in devices):
        raise ValueError(f"bad device spec {spec!r}: needs at least one index, all >= 0")
    if len(set(devices)) != len(devices):
        raise ValueError(f"bad device spec {spec!r}: repeats a device")
    return devices


@dataclass
class PlacementConfig:
    """Where roles run: device indices per role (GPUs, or CPU bundles without GPUs)."""

    # Name shown in logs.
    name: str = "colocated"
    # Bundles in the Ray placement group (GPUs when use_gpu, else CPU bundles).
    num_devices: int = checked(1, ge=1)
    # Reserve one GPU per bundle.
    use_gpu: bool = False
    # Fraction of a GPU per bundle when use_gpu (e.g. 0.5: two sweep jobs share each GPU).
    gpus_per_device: float = checked(1.0, gt=0, le=1)
    # CPUs per bundle.
    cpus_per_device: float = checked(1.0, gt=0)
    # Resources of each bundle, one mapping per device, for layouts across nodes: e.g.
    # [{CPU: 8}, {CPU: 2, GPU: 1}] puts device 0 (the simulators) on a node with 8 free CPUs and
    # device 1 (rollout, actor) on a GPU node; custom resources (`ray start --resources`) pin a
    # bundle to the nodes that declare them. null: every bundle is cpus_per_device CPUs (and
    # gpus_per_device of a GPU with use_gpu).
    bundles: Any = None
    # Ray's placement strategy for the bundles: PACK (as few nodes as fit), SPREAD, STRICT_PACK
    # (one node), STRICT_SPREAD (one node each).
    strategy: str = checked("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    # Role -> device spec ("0", "0-1", "0,2"); roles with equal specs share one worker group.
    roles: dict[str, str] = field(
        default_factory=lambda: {"env": "0", "rollout": "0", "actor": "0"}
    )
    # Env pipeline stages: K > 1 splits the envs into K groups stepped in turn, so one stage
    # simulates while the policy acts for another (pipelined rollout); 1: all envs step together.
    pipeline_stages: int = checked(1, ge=1)
    # Each env worker holds a replica of the rollout policy and runs whole rollouts itself: one
    # call per rollout instead of two per env step, for policies cheap next to the simulator
    # (MLP/CNN on CPU). Replicas get weights after every update; each samples from its own
    # stream, so the sampled actions depend on the number of env workers. Not with stages > 1.
    rollout_in_env: bool = False


@dataclass
class PlacementSpec:
    """The layout of roles on devices; pure data, no Ray."""

    # Bundles in the placement group: GPUs when use_gpu, else CPU bundles.
    num_devices: int
    # Reserve gpus_per_device of a GPU per bundle (and cpus_per_device CPUs).
    use_gpu: bool = False
    # CPUs per bundle.
    cpus_per_device: float = 1.0
    # GPU (fraction) per bundle when use_gpu.
    gpus_per_device: float = 1.0
    # Role -> device spec ("0", "0-1", "0,2").
    roles: dict[str, str] = field(default_factory=dict)
    # Per-device resource mappings (None: uniform, from the fields above).
    bundle_resources: list[dict[str, float]] | None = None
    # Ray placement strategy.
    strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"placement num_devices must be >= 1, got {self.num_devices}")
        if self.cpus_per_device <= 0:
            raise ValueError(f"placement cpus_per_device must be > 0, got {self.cpus_per_device}")
        if not 0 < self.gpus_per_device <= 1:
            raise ValueError(f"placement gpus_per_device must be in (0, 1], got {self.gpus_per_device}")
        if self.bundle_resources is not None:
            self.bundle_resources = [_resources(i, b) for i, b in enumerate(self.bundle_resources)]
            if len(self.bundle_resources) != self.num_devices:
                raise ValueError(f"placement.bundles has {len(self.bundle_resources)} entries but num_devices is "
                                 f"{self.num_devices}: give one resource mapping per device")
        self.roles = dict(self.roles)
        self._devices = {}
        for role, spec in self.roles.items():
            devices = parse_devices(spec)
            bad = [d for d in devices if d >= self.num_devices]
            if bad:
                raise ValueError(
                    f"placement role {role!r} uses devices {spec!r}, but num_devices is "
                    f"{self.num_devices} (valid indices 0-{self.num_devices - 1})"
                )
            self._devices[role] = devices

    @classmethod
    def from_config(cls, cfg: Any) -> PlacementSpec:
        """Build from a placement config (dataclass, DictConfig or mapping); extra keys such
        as ``name`` are ignored."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
        roles = get("roles", None) or {}
        return cls(
            num_devices=int(get("num_devices")),
            use_gpu=bool(get("use_gpu", False)),
            cpus_per_device=float(get("cpus_per_device", 1.0)),
            gpus_per_device=float(get("gpus_per_device", 1.0)),
            roles={str(k): v for k, v in roles.items()},
            bundle_resources=None if get("bundles", None) is None else [dict(b) for b in get("bundles")],
            strategy=str(get("strategy", "PACK")),
        )

    def devices(self, role: str) -> list[int]:
        """Device indices of ``role``."""
        if role not in self._devices:
            raise KeyError(f"placement has no role {role!r}; roles: {list(self.roles)}")
        return list(self._devices[role])

    def roles_on(self, device: int) -> list[str]:
        """Roles with a worker on ``device``, in declaration order."""
        return [role for role, devices in self._devices.items() if device in devices]

    def fused_groups(self, never_fuse: Iterable[str] = ()) -> list[tuple[str, ...]]:
        """Roles grouped by identical device lists, each group one worker group.

        Groups are ordered by their first role's position in ``roles``; roles in ``never_fuse``
        always form a group of their own.
        """
        never_fuse = set(never_fuse)
        groups: dict[Any, list[str]] = {}
        for role, devices in self._devices.items():
            key = ("alone", role) if role in never_fuse else ("devices", tuple(devices))
            groups.setdefault(key, []).append(role)
        return [tuple(roles) for roles in groups.values()]

    def share(self, role: str, never_fuse: Iterable[str] = ()) -> float:
        """Fraction of a device each worker of ``role``'s group gets: 1 / (worker groups on
        the device), the smallest over the role's devices."""
        groups = self.fused_groups(never_fuse)
        per_device = [
            sum(1 for g in groups if device in self._devices[g[0]]) for device in self.devices(role)
        ]
        return 1.0 / max(per_device)

    def bundles(self) -> list[dict[str, float]]:
        """Ray resource bundles, one per device."""
        if self.bundle_resources is not None:
            return [dict(b) for b in self.bundle_resources]
        bundle = {"CPU": float(self.cpus_per_device)}
        if self.use_gpu:
            bundle["GPU"] = float(self.gpus_per_device)
        return [dict(bundle) for _ in range(self.num_devices)]


class Placement:
    """One Ray placement group (PACK) with a bundle per device, plus the role layout.

    Args:
        spec: The layout.
        never_fuse: Roles that never share a worker group with other roles (e.g. ``{"env"}``).
        timeout_s: How long to wait for Ray to reserve the bundles.

    Raises:
        RuntimeError: the cluster lacks the resources, or they did not free up in time.
    """

    def __init__(
        self, spec: PlacementSpec, never_fuse: Iterable[str] = (), timeout_s: float = 60.0
    ) -> None:
        import ray
        from ray.util import placement_group, remove_placement_group

        self.spec = spec
        self.never_fuse = frozenset(never_fuse)
        bundles = spec.bundles()
        needed: dict[str, float] = {}
        for bundle in bundles:
            for key, value in bundle.items():
                needed[key] = needed.get(key, 0.0) + value
        total = ray.cluster_resources()
        if any(total.get(k, 0.0) < v for k, v in needed.items()):
            raise RuntimeError(self._missing_message(needed, total, ray.available_resources()))
        self.placement_group = placement_group(bundles, strategy=spec.strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"timed out after {timeout_s:.0f} s waiting for resources; "
                + self._missing_message(needed, total, ray.available_resources())
            ) from None

    def _missing_message(self, needed: dict, total: dict, available: dict) -> str:
        def show(resources: dict) -> dict:
            return {k: resources.get(k, 0.0) for k in needed}

        return (
            f"placement needs {needed} ({self._bundles_text()}); the Ray cluster has {show(total)} in all, "
            f"{show(available)} free. Lower placement.num_devices or placement.cpus_per_device, "
            "or give Ray more resources (cluster.num_cpus / cluster.num_gpus)"
        )

    def devices(self, role: str) -> list[int]:
        """Device (= bundle) indices of ``role``."""
        return self.spec.devices(role)

    def _bundles_text(self) -> str:
        bundles = self.spec.bundles()
        if all(b == bundles[0] for b in bundles):
            return f"{len(bundles)} bundles of {bundles[0]}"
        return f"bundles {bundles}"

    def actor_resources(self, device: int, share: float) -> dict[str, Any]:
        """Ray actor options for a worker taking ``share`` of ``device``'s bundle."""
        bundle = self.spec.bundles()[device]
        options: dict[str, Any] = {"num_cpus": share * bundle.get("CPU", 0.0)}
        if bundle.get("GPU", 0.0) > 0:
            options["num_gpus"] = share * bundle["GPU"]
        custom = {k: share * v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory") and v > 0}
        if custom:
            options["resources"] = custom
        return options

    def describe(self) -> str:
        """Where each device's bundle landed and which roles it holds, one line per device."""
        from ray.util import placement_group_table

        nodes = placement_group_table(self.placement_group).get("bundles_to_node_id", {})
        lines = [f"placement ({self.spec.strategy}):"]
        for device, bundle in enumerate(self.spec.bundles()):
            roles = ", ".join(self.roles_on(device)) or "-"
            amounts = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
            lines.append(f"  device {device} ({amounts}) on node {str(nodes.get(device, '?'))[:12]}: {roles}")
        return "\n".join(lines)

    def roles_on(self, device: int) -> list[str]:
        """Roles with a worker on ``device``."""
        return self.spec.roles_on(device)

    def fused_groups(self) -> list[tuple[str, ...]]:
        """Roles grouped into worker groups (see ``PlacementSpec.fused_groups``)."""
        return self.spec.fused_groups(self.never_fuse)

    def share(self, role: str) -> float:
        """Fraction of a device each worker of ``role`` gets."""
        return self.spec.share(role, self.never_fuse)

    def remove(self) -> None:
        """Free the placement group (kill its actors first)."""
        from ray.util import remove_placement_group

        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
