"""Shared fixtures: one local Ray for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole session (started on first use, ~5 s).

    Tests must free what they reserve (``WorkerGroup.shutdown()``, ``Placement.remove()``):
    the next test gets the same 2 CPUs.
    """
    from rlplat.runtime.cluster import ClusterConfig, ray_session

    with ray_session(ClusterConfig(num_cpus=2)):
        yield
