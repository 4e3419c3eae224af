"""Checkpoints: ``checkpoints/step_N/`` holds the policy (safetensors + optimizer + RNG) and
``trainer_state.pt`` (step, controller RNG, env states, current observations, cursors).

A checkpoint is written to ``step_N.tmp`` and renamed when complete, so a run killed mid-write
never leaves a half checkpoint behind; resuming from one continues the run exactly.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
POLICY = "policy"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder to write the checkpoint of ``step`` into."""
    tmp = Path(run_dir) / CHECKPOINTS / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, keep: int) -> Path:
    """Publishes a finished temporary checkpoint and prunes all but the newest ``keep``."""
    final = tmp.with_suffix("")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        for _, old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Writes the controller's state (tensors, numpy RNG states, Batches)."""
    torch.save(state, Path(folder) / TRAINER_STATE)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """Reads what ``save_trainer_state`` wrote (our own file, so full unpickling is allowed)."""
    return torch.load(Path(folder) / TRAINER_STATE, weights_only=False)


def capture_rng() -> dict[str, Any]:
    """The controller process's Python, NumPy and torch global RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def find_resume_checkpoint(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint folder that ``resume`` names, or None for a fresh run.

    ``resume=false``: None. ``resume=true``: the newest checkpoint of this run dir, else of the
    newest sibling run dir (same run name). ``resume=PATH``: a checkpoint folder, or a run dir
    whose newest checkpoint is used.
    """
    if resume in (False, None, "false", "False"):
        return None
    run_dir = Path(run_dir)
    if resume in (True, "true", "True"):
        candidates = list_checkpoints(run_dir)
        if not candidates:
            siblings = [d for d in run_dir.parent.iterdir() if d.is_dir() and d != run_dir]
            for sibling in sorted(siblings, key=lambda d: d.stat().st_mtime, reverse=True):
                candidates = list_checkpoints(sibling)
                if candidates:
                    break
        if not candidates:
            raise FileNotFoundError(
                f"resume=true found no checkpoint in {run_dir} or its sibling runs in "
                f"{run_dir.parent}; pass resume=<run dir or checkpoint folder>"
            )
        return candidates[-1][1]
    path = Path(str(resume)).expanduser()
    if (path / TRAINER_STATE).exists():
        return path
    candidates = list_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(
            f"resume={resume}: neither a checkpoint folder (no {TRAINER_STATE}) nor a run dir with "
            f"{CHECKPOINTS}/step_N; pass one of those"
        )
    return candidates[-1][1]
