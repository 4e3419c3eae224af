"""What a robot offers the runtime: the ``Robot`` interface.

A robot driver subclasses ``Robot`` and implements five calls; the runtime (``rlplat.deploy.runtime``)
calls them from one thread at the loop's rate:

- ``reset(seed)``: get ready for an episode (a real robot: wait for the operator / move to the
  start pose; a simulator: reset with the seed);
- ``get_observation()``: a dict of numpy arrays and strings, keyed by the policy's observation
  names (``image`` uint8 [H, W, 3], ``wrist_image``, ``state``, ``instruction``) or directly by
  the server's client keys (``observation/image``, ...); the runtime maps the names through the
  server's metadata frame;
- ``apply_action(action)``: command one action (float32 [D], robot units, already filtered by the
  ``SafetyFilter``);
- ``hold()``: keep still now (the watchdog, a non-finite action, the e-stop): for delta / velocity
  control a zero command, for absolute joint control the current joint positions;
- ``home()``: move to the rest pose; called once when the runtime exits normally.

Optional: ``episode_done()`` (the robot knows the episode ended: a simulator's termination, an
operator's button), ``episode_info()`` (outcome to record, e.g. success), ``position()`` (the
end effector's position, for the safety filter's workspace box), ``estop()`` (what an emergency
stop does; by default ``hold``), ``close()``.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class Robot(abc.ABC):
    """A robot the runtime can drive (see the module docstring).

    Attributes:
        action_low, action_high: float32 [D] bounds of ``apply_action`` in robot units (joint
            limits for absolute joint control, the command range for delta control); the safety
            filter clips to them. None: the bounds the server announces are used.
        control_hz: the rate the robot is meant to be driven at (None: unknown).
    """

    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None
    control_hz: float | None = None

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> None:
        """Prepares an episode (``seed``: for simulators; real robots ignore it)."""

    @abc.abstractmethod
    def get_observation(self) -> dict[str, Any]:
        """The current observation (numpy arrays and strings, unbatched)."""

    @abc.abstractmethod
    def apply_action(self, action: np.ndarray) -> None:
        """Commands one action float32 [D]."""

    @abc.abstractmethod
    def hold(self) -> None:
        """Keeps the robot where it is for one control period."""

    @abc.abstractmethod
    def home(self) -> None:
        """Moves to the rest pose."""

    def episode_done(self) -> bool:
        """Whether the current episode has ended (the runtime then stops stepping it)."""
        return False

    def episode_info(self) -> dict[str, Any]:
        """What to record about the episode's outcome (e.g. ``success``); empty when unknown."""
        return {}

    def position(self) -> np.ndarray | None:
        """The end effector's position in the workspace frame, or None when not known."""
        return None

    def estop(self) -> None:
        """An emergency stop: stop moving now and stay (no homing afterwards)."""
        self.hold()

    def close(self) -> None:
        """Releases the hardware / simulator."""
