"""Placement: device specs, fused worker groups, shares, Ray resource errors, a clean $HOME."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlplat.runtime.cluster import MAX_TEMP_DIR_CHARS, ClusterConfig, init_ray
from rlplat.runtime.placement import Placement, PlacementSpec, parse_devices

COLOCATED = {"env": "0-1", "rollout": "0-1", "actor": "0-1"}
DISAGGREGATED = {"env": "0", "rollout": "1", "actor": "1"}


@pytest.mark.parametrize(
    ("spec", "devices"),
    [
        ("0-1", [0, 1]),
        ("0", [0]),
        ("0,2-3", [0, 2, 3]),
        (" 1 - 2 , 5", [1, 2, 5]),
        (1, [1]),
        ([3, 1], [3, 1]),
    ],
)
def test_parse_devices(spec: str | int | list[int], devices: list[int]) -> None:
    assert parse_devices(spec) == devices


@pytest.mark.parametrize(
    "spec", ["", "a", "1-0", "-1", "0,,1", "0-1-2", "0,0", -1, True, [], ["x"]]
)
def test_parse_devices_rejects_bad_specs(spec: object) -> None:
    with pytest.raises(ValueError, match="bad device spec " + re.escape(repr(spec))):
        parse_devices(spec)


def test_colocated_fuses_rollout_and_actor_but_never_env() -> None:
    spec = PlacementSpec(num_devices=2, roles=COLOCATED)
    assert spec.fused_groups(never_fuse={"env"}) == [("env",), ("rollout", "actor")]
    assert spec.fused_groups() == [("env", "rollout", "actor")]
    assert spec.roles_on(0) == spec.roles_on(1) == ["env", "rollout", "actor"]
    # Two worker groups (env, policy) on each device: half a device each.
    assert [spec.share(r, never_fuse={"env"}) for r in COLOCATED] == [0.5, 0.5, 0.5]
    assert spec.share("env") == 1.0


def test_disaggregated_gives_each_group_a_whole_device() -> None:
    spec = PlacementSpec(num_devices=2, roles=DISAGGREGATED)
    assert spec.fused_groups(never_fuse={"env"}) == [("env",), ("rollout", "actor")]
    assert spec.roles_on(0) == ["env"] and spec.roles_on(1) == ["rollout", "actor"]
    assert [spec.share(r, never_fuse={"env"}) for r in DISAGGREGATED] == [1.0, 1.0, 1.0]
    assert spec.devices("rollout") == [1]


def test_partial_overlap_takes_the_most_crowded_device() -> None:
    roles = {"env": "0-1", "rollout": "1", "actor": "1", "ref": "0"}
    spec = PlacementSpec(num_devices=2, roles=roles)
    assert spec.fused_groups(never_fuse={"env"}) == [("env",), ("rollout", "actor"), ("ref",)]
    # env has devices 0 (env, ref) and 1 (env, policy): 2 groups on each.
    assert spec.share("env", never_fuse={"env"}) == 0.5
    assert spec.share("ref", never_fuse={"env"}) == 0.5


def test_out_of_range_device_names_role_spec_and_num_devices() -> None:
    with pytest.raises(ValueError, match=r"role 'actor' uses devices '1-2', but num_devices is 2"):
        PlacementSpec(num_devices=2, roles={"env": "0", "actor": "1-2"})
    with pytest.raises(ValueError, match="num_devices must be >= 1"):
        PlacementSpec(num_devices=0)
    with pytest.raises(KeyError, match="no role 'critic'"):
        PlacementSpec(num_devices=1, roles={"env": "0"}).devices("critic")


def test_bundles_and_from_config() -> None:
    cfg = OmegaConf.create(
        {
            "name": "disaggregated",
            "num_devices": 2,
            "use_gpu": True,
            "cpus_per_device": 4,
            "roles": DISAGGREGATED,
        }
    )
    spec = PlacementSpec.from_config(cfg)
    assert spec == PlacementSpec(
        num_devices=2, use_gpu=True, cpus_per_device=4.0, roles=DISAGGREGATED
    )
    assert spec.bundles() == [{"CPU": 4.0, "GPU": 1.0}] * 2
    plain = PlacementSpec.from_config({"num_devices": 1, "roles": {"env": 0}})
    assert plain.bundles() == [{"CPU": 1.0}]


def test_placement_reports_missing_resources(ray_local: None) -> None:
    spec = PlacementSpec(num_devices=3, cpus_per_device=1.0, roles={"env": "0-2"})
    expected = "needs {'CPU': 3.0} (3 bundles of {'CPU': 1.0}); the Ray cluster has {'CPU': 2.0}"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        Placement(spec)
    gpu = PlacementSpec(num_devices=1, use_gpu=True, roles={"env": "0"})
    with pytest.raises(RuntimeError, match=r"'GPU': 1.0.*has \{'CPU': 2.0, 'GPU': 0.0\}"):
        Placement(gpu)


def test_placement_reserves_and_frees_bundles(ray_local: None) -> None:
    import ray

    placement = Placement(PlacementSpec(num_devices=2, roles=COLOCATED), never_fuse={"env"})
    try:
        assert placement.fused_groups() == [("env",), ("rollout", "actor")]
        assert placement.share("actor") == 0.5
        assert placement.roles_on(1) == ["env", "rollout", "actor"]
        assert ray.util.placement_group_table(placement.placement_group)["state"] == "CREATED"
    finally:
        placement.remove()


def test_temp_dir_must_be_short() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_TEMP_DIR_CHARS}"):
        init_ray(ClusterConfig(temp_dir="/tmp/" + "x" * MAX_TEMP_DIR_CHARS))


def test_ray_session_leaves_home_empty_and_removes_its_temp_dir(tmp_path: Path) -> None:
    """A separate process (its own Ray) with HOME pointed at an empty folder."""
    home = tmp_path / "home"
    home.mkdir()
    script = textwrap.dedent(
        """
        import json, os
        import ray
        from rlplat.runtime import cluster

        with cluster.ray_session(cluster.ClusterConfig(num_cpus=1)) as started:
            temp_dir = cluster._owned_temp_dir
            value = ray.get(ray.remote(lambda: 41 + 1).remote())
        print(json.dumps({"started": started, "value": value, "temp_dir": temp_dir,
                          "auth": os.environ["RAY_AUTH_MODE"]}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XDG_"))}
    env["HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["started"] is True and result["value"] == 42 and result["auth"] == "disabled"
    assert result["temp_dir"].startswith("/tmp/rlplat-ray-")
    assert not os.path.exists(result["temp_dir"])
    assert sorted(p.name for p in home.rglob("*")) == []
