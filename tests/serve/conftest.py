"""Shared fixtures of the policy-server tests: one tiny OpenVLA loaded per session, servers on
free ports in a background thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_vla() -> Any:
    """The untrained tiny OpenVLA as ``policy=openvla_tiny`` serves it (32x32 images, 2-dim actions)."""
    from rlplat.serve.config import compose
    from rlplat.serve.loading import load

    return load(compose(["policy=openvla_tiny", "policy.value_head=false"]))


@pytest.fixture
def start_server() -> Iterator[Callable[..., Any]]:
    """``start_server(served, host=..., **PolicyApp options)`` -> a running PolicyServer on a free port."""
    from rlplat.serve.app import PolicyApp, PolicyServer
    from rlplat.serve.config import ServeConfig

    running = []

    def start(served: Any, host: str = "127.0.0.1", **options: Any) -> Any:
        options.setdefault("api_key", None)
        options.setdefault("client_keys", ServeConfig().client_keys)
        server = PolicyServer(PolicyApp(served, **options), host, 0).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()

