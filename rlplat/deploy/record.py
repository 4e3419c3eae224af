"""Recording what the robot saw and did: ``Recorder``.

Per episode one ``episode_<k>.npz`` (numpy only, compressed): every observation key stacked over
the episode's steps (``obs/<key>``; strings as a unicode array), the action the server sent
(``server_action``, NaN where none), the action applied after the safety filter (``action``,
NaN where the robot held), ``held`` (bool), ``t`` (seconds since the episode started) and
``events`` (the step's safety / watchdog events, ``;``-joined). A line per episode goes to
``episodes.jsonl`` (seed, steps, holds, events, the robot's ``episode_info``), so a session can be
read back with ``numpy.load`` and ``json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


class Recorder:
    """Buffers one episode's steps and writes them when it ends (module docstring).

    Args:
        directory: where the files go (created).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.episodes = sum(1 for _ in self.directory.glob("episode_*.npz"))
        self._steps: dict[str, list[Any]] = defaultdict(list)

    def add(self, observation: dict[str, Any], server_action: np.ndarray | None, action: np.ndarray | None,
            held: bool, t: float, events: tuple[str, ...] = ()) -> None:
        """One control step."""
        for key, value in observation.items():
            self._steps[f"obs/{key}"].append(value)
        self._steps["server_action"].append(server_action)
        self._steps["action"].append(action)
        self._steps["held"].append(bool(held))
        self._steps["t"].append(float(t))
        self._steps["events"].append(";".join(events))

    def end_episode(self, summary: dict[str, Any]) -> Path:
        """Writes the buffered episode and its summary line; returns the .npz path."""
        steps, self._steps = self._steps, defaultdict(list)
        arrays = {}
        for key, values in steps.items():
            if key in ("server_action", "action"):
                dim = next((np.size(v) for v in values if v is not None), 0)
                arrays[key] = np.stack([np.full(dim, np.nan, np.float32) if v is None else
                                        np.asarray(v, np.float32).reshape(dim) for v in values]) if values else \
                    np.zeros((0, 0), np.float32)
            elif values and isinstance(values[0], str):
                arrays[key] = np.array(values, dtype=str)
            else:
                arrays[key] = np.stack([np.asarray(v) for v in values]) if values else np.zeros(0)
        path = self.directory / f"episode_{self.episodes:04d}.npz"
        np.savez_compressed(path, **arrays)
        with open(self.directory / "episodes.jsonl", "a") as f:
            f.write(json.dumps({"episode": self.episodes, "file": path.name, **summary}, default=_plain) + "\n")
        self.episodes += 1
        return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
