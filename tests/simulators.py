"""Skip-or-fail rule for tests of optional simulators (ManiSkill3, LIBERO).

Without the simulator installed a module's tests are skipped, so a plain ``pip install -e
".[dev]"`` checkout stays green. CI sets ``RLPLAT_REQUIRE_SIMULATORS=1`` (``.ci/run`` installs the
simulators and their system parts), and there a missing simulator fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_simulator(module: str) -> None:
    """Skips the calling test module when ``module`` is not importable (fails under CI)."""
    require_optional(module, "pip install -e '.[maniskill,libero]'; scripts/setup_system.sh")


def require_optional(module: str, install: str) -> None:
    """Skips the calling test (module) when the optional ``module`` is not importable; under CI
    (``RLPLAT_REQUIRE_SIMULATORS=1``, where every extra is installed) fails instead."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if found:
        return
    message = f"{module} is not installed ({install})"
    if os.environ.get("RLPLAT_REQUIRE_SIMULATORS") == "1":
        pytest.fail(f"RLPLAT_REQUIRE_SIMULATORS=1 but {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)
