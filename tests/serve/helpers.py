"""Helpers of the policy-server tests."""

from __future__ import annotations

from typing import Any

import numpy as np


def camera(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random uint8 camera image [H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def in_process(served: Any, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
    """Greedy actions [B, D] the served policy computes in this process, without the server."""
    import torch

    obs = {"image": np.stack(images), "instruction": np.array(prompts, dtype=object)}
    with torch.no_grad():
        return served.policy.act(obs, deterministic=True).actions.numpy()


def require_serve_packages() -> None:
    """Skips the calling test module without the server's packages (fails under CI, which installs them)."""
    from tests.simulators import require_optional

    for module in ("fastapi", "uvicorn", "json_numpy", "msgpack", "websockets"):
        require_optional(module, "pip install -e '.[serve]'")
    require_optional("openpi_client", "pip install --no-deps openpi-client==0.1.2")
