"""Placement across nodes: a simulated 3-node Ray cluster (ray.cluster_utils.Cluster) on this machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from rlplat.runtime.placement import PlacementSpec

# A head with 1 CPU, a CPU-only node with 3 and a node with 2 CPUs and one unit of a custom
# accelerator resource; a toy PPO run joins it (cluster.address) with the simulators' bundle on
# CPUs and the policy's bundle on the accelerator.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ray.cluster_utils import Cluster
    from rlplat.config import compose
    from rlplat.train import run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cpu_node = cluster.add_node(num_cpus=3)
    accel_node = cluster.add_node(num_cpus=2, resources={"accel": 1})
    cluster.wait_for_nodes()
    try:
        cfg = compose(["experiment=toy_mlp", "trainer.total_steps=2", "trainer.eval_episodes=2", "env.num_envs=4",
                       "trainer.save_video=false", "placement=disaggregated",
                       "placement.bundles=[{CPU: 2}, {CPU: 1, accel: 1}]", f"cluster.address={cluster.address}"])
        metrics = run(cfg, Path(sys.argv[1]))
        print("NODES", json.dumps({"cpu": cpu_node.node_id, "accel": accel_node.node_id,
                                   "steps": metrics["env_steps"]}))
    finally:
        cluster.shutdown()
""")


def test_env_workers_land_on_the_cpu_node_and_the_policy_on_the_accelerator_node(tmp_path):
    script = tmp_path / "three_nodes.py"  # a file, not -c: Ray's workers import the driver's module by path
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    nodes = json.loads(re.search(r"^NODES (.*)$", proc.stdout, re.MULTILINE).group(1))
    assert nodes["steps"] > 0
    log = (tmp_path / "run" / "train.log").read_text()
    env_line = re.search(r"device 0 \(CPU 2\) on node (\w+): env$", log, re.MULTILINE)
    policy_line = re.search(r"device 1 \(CPU 1, accel 1\) on node (\w+): rollout, actor$", log, re.MULTILINE)
    assert env_line and policy_line, log
    assert nodes["cpu"].startswith(env_line.group(1)) and nodes["accel"].startswith(policy_line.group(1)), (nodes, log)


def test_bundles_are_checked_and_name_the_field():
    spec = PlacementSpec(num_devices=2, roles={"env": "0", "actor": "1"},
                         bundle_resources=[{"CPU": 4}, {"CPU": 1, "GPU": 0.5, "accel": 1}])
    assert spec.bundles() == [{"CPU": 4.0}, {"CPU": 1.0, "GPU": 0.5, "accel": 1.0}]
    with pytest.raises(ValueError, match="placement.bundles has 1 entries but num_devices is 2"):
        PlacementSpec(num_devices=2, bundle_resources=[{"CPU": 1}])
    with pytest.raises(ValueError, match=r"placement.bundles\[1\].GPU=-1"):
        PlacementSpec(num_devices=2, bundle_resources=[{"CPU": 1}, {"GPU": -1}])
    with pytest.raises(ValueError, match=r"placement.bundles\[0\] reserves nothing"):
        PlacementSpec(num_devices=1, bundle_resources=[{"CPU": 0}])
