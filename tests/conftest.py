"""Shared fixtures: one local Ray for the whole test session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Tests stay offline and out of the home directory; subprocesses inherit these.
_SANDBOX = tempfile.mkdtemp(prefix="rlplat-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MPLCONFIGDIR": os.path.join(_SANDBOX, "matplotlib"),
    "XDG_CACHE_HOME": os.path.join(_SANDBOX, "cache"),
    "WANDB_DIR": os.path.join(_SANDBOX, "wandb"),
    "OMP_NUM_THREADS": "1",
    # Simulators: ManiSkill's asset folder and prompt, Mesa's shader cache, MuJoCo off-screen.
    "MS_ASSET_DIR": os.path.join(_SANDBOX, "maniskill"),
    "MS_SKIP_ASSET_DOWNLOAD_PROMPT": "1",
    "MESA_SHADER_CACHE_DISABLE": "true",
})
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole session (started on first use, ~5 s).

    Tests must free what they reserve (``WorkerGroup.shutdown()``, ``Placement.remove()``):
    the next test gets the same 2 CPUs.
    """
    from rlplat.runtime.cluster import ClusterConfig, ray_session

    with ray_session(ClusterConfig(num_cpus=2)):
        yield
