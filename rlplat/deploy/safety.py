"""The last check between the policy and the motors: ``SafetyFilter``.

Every action the runtime applies passes through ``SafetyFilter.filter``:

1. a non-finite action (NaN / inf in any component) is refused: the robot holds;
2. each component is clipped to ``[low, high]`` (joint limits, or the command range);
3. the change from the previous applied action is clamped to ``max_delta`` per component
   (smooths a jump when the policy or the chunk changes; off when None);
4. with a workspace box and the robot's position, a delta command that would leave the box is
   shortened so the predicted position (``position + step_scale * action[dims]``) stays inside.

Each step's interventions are returned as event names (``nonfinite``, ``clipped``,
``rate_limited``, ``workspace``) so the runtime can count and record them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _vector(value: float | Sequence[float] | np.ndarray | None, dim: int, name: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.broadcast_to(np.asarray(value, np.float64), (dim,)).copy() if np.ndim(value) == 0 else \
        np.asarray(value, np.float64).reshape(-1)
    if array.shape != (dim,):
        raise ValueError(f"safety.{name}: expected {dim} values (one per action dimension), got {array.size}")
    if np.isnan(array).any():
        raise ValueError(f"safety.{name}: holds NaN")
    return array


@dataclass
class FilterResult:
    """An action after the filter (None: hold) and what the filter did to it."""

    action: np.ndarray | None
    events: tuple[str, ...]


class SafetyFilter:
    """Clips, rate-limits and workspace-limits actions; refuses non-finite ones (module docstring).

    Args:
        dim: action dimensions D.
        low, high: per-component bounds (a scalar applies to every component); None: unbounded.
        max_delta: largest change per component between consecutive applied actions (None: off).
        workspace_low, workspace_high: the box the position must stay in (None: no box).
        workspace_dims: the action components that move the position (default: the first
            ``len(workspace_low)``).
        step_scale: position change per unit of those action components in one step (delta
            control), e.g. the env's ``action_scale``.
    """

    def __init__(self, dim: int, *, low=None, high=None, max_delta=None, workspace_low=None, workspace_high=None,
                 workspace_dims: Sequence[int] | None = None, step_scale: float = 1.0) -> None:
        self.dim = int(dim)
        self.low = _vector(low, self.dim, "low")
        self.high = _vector(high, self.dim, "high")
        if self.low is not None and self.high is not None and (self.low > self.high).any():
            raise ValueError("safety.low must be <= safety.high in every component")
        self.max_delta = _vector(max_delta, self.dim, "max_delta")
        if self.max_delta is not None and (self.max_delta <= 0).any():
            raise ValueError("safety.max_delta must be > 0 (or null to switch the clamp off)")
        if (workspace_low is None) != (workspace_high is None):
            raise ValueError("safety.workspace_low and safety.workspace_high go together (set both or neither)")
        self.workspace_low = None if workspace_low is None else np.asarray(workspace_low, np.float64).reshape(-1)
        self.workspace_high = None if workspace_high is None else np.asarray(workspace_high, np.float64).reshape(-1)
        if self.workspace_low is not None:
            n = self.workspace_low.size
            if self.workspace_high.size != n or (self.workspace_low > self.workspace_high).any():
                raise ValueError("safety.workspace_low / workspace_high: same length, low <= high")
            self.workspace_dims = list(range(n)) if workspace_dims is None else [int(d) for d in workspace_dims]
            if len(self.workspace_dims) != n or not all(0 <= d < self.dim for d in self.workspace_dims):
                raise ValueError(f"safety.workspace_dims: {n} action indices below {self.dim} expected")
        self.step_scale = float(step_scale)

    def filter(self, action: np.ndarray, previous: np.ndarray | None = None,
               position: np.ndarray | None = None) -> FilterResult:
        """The action to apply (or None: hold) given the previous applied action and the position."""
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (self.dim,):
            raise ValueError(f"the server sent an action of {action.size} values; the robot takes {self.dim}")
        if not np.isfinite(action).all():
            return FilterResult(None, ("nonfinite",))
        events = []
        out = action
        if self.low is not None or self.high is not None:
            clipped = np.clip(out, self.low, self.high)
            if not np.array_equal(clipped, out):
                events.append("clipped")
            out = clipped
        if self.max_delta is not None and previous is not None:
            previous = np.asarray(previous, np.float64).reshape(-1)
            limited = np.clip(out, previous - self.max_delta, previous + self.max_delta)
            if not np.array_equal(limited, out):
                events.append("rate_limited")
            out = limited
        if self.workspace_low is not None and position is not None:
            out = out.copy()
            pos = np.asarray(position, np.float64).reshape(-1)[: len(self.workspace_dims)]
            moved = out[self.workspace_dims] * self.step_scale
            target = np.clip(pos + moved, self.workspace_low, self.workspace_high)
            if not np.allclose(target, pos + moved):
                events.append("workspace")
                out[self.workspace_dims] = (target - pos) / self.step_scale if self.step_scale else 0.0
        return FilterResult(out.astype(np.float32), tuple(events))
