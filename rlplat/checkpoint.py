"""Checkpoints: ``checkpoints/step_N/`` holds the policy (safetensors + optimizer + RNG),
``trainer_state.pt`` (step, controller RNG, env states, current observations, cursors) and
``manifest.json`` (every file's size and sha256, the run's algorithm and policy).

A checkpoint is written to ``step_N.tmp``, its files fsynced and the manifest written last, then
renamed, so a run killed mid-write never leaves a half checkpoint behind. Loading verifies the
manifest; a damaged newest checkpoint is skipped with a warning naming the file, and the previous
intact one is used. Resuming from a checkpoint continues the run exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
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
MANIFEST = "manifest.json"
#: The run's env spaces (``write_env_spec``), beside config.yaml.
ENV_SPEC = "env_spec.json"
log = logging.getLogger(__name__)
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


def commit(tmp: Path, keep: int, parts: dict[str, str] | None = None) -> Path:
    """Publishes a finished temporary checkpoint: fsyncs its files, writes the manifest (sizes,
    sha256, ``parts``: the run's algorithm and policy), renames it to ``step_N`` and prunes all
    but the newest ``keep`` (0: keep all)."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path, fsync=True)}
    _write_synced(tmp / MANIFEST, json.dumps({"files": files, "parts": parts or {}}, indent=1))
    _fsync_dir(tmp)
    final = tmp.with_suffix("")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if keep > 0:
        for _, old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def disk_full_message(err: BaseException, folder: Path) -> str | None:
    """A message naming the folder and its free space when ``err`` (or its cause) is a full disk."""
    text = f"{err!r} {getattr(err, 'cause', '')!r}"
    if not (isinstance(err, OSError) and err.errno == errno.ENOSPC) and "os error 28" not in text \
            and "No space left" not in text:
        return None
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    return (f"the disk is full: writing the checkpoint {folder} failed with {free / 2**20:.1f} MiB free there; "
            f"nothing half-written was kept. Free space (or set trainer.keep_last lower), then resume")


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (None: intact). A folder without a manifest (written
    before manifests existed) is accepted if its trainer state is there."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return None if (Path(folder) / TRAINER_STATE).exists() else f"{folder / TRAINER_STATE} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, want in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want['size']} (truncated)"
        if _sha256(path) != want["sha256"]:
            return f"{path} does not match its sha256 in the manifest (damaged)"
    return None


def parts_of(folder: Path) -> dict[str, str]:
    """The algorithm and policy a checkpoint was written by (its manifest; empty when unknown)."""
    manifest = Path(folder) / MANIFEST
    return json.loads(manifest.read_text()).get("parts", {}) if manifest.exists() else {}


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_env_spec(run_dir: Path, spec: dict[str, Any]) -> None:
    """Writes the env's single observation / action spaces, control rate and episode limit to
    ``run_dir/env_spec.json``, so the policy can be rebuilt (``rlplat-serve``) without building
    the env, i.e. without the simulator installed."""
    from rlplat.envs.base import space_to_json

    data = {"observation_space": space_to_json(spec["observation_space"]),
            "action_space": space_to_json(spec["action_space"]),
            "control_hz": spec.get("control_hz"), "max_episode_steps": spec.get("max_episode_steps")}
    tmp = run_dir / f".{ENV_SPEC}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, run_dir / ENV_SPEC)


def read_env_spec(run_dir: Path) -> dict[str, Any] | None:
    """The spaces ``write_env_spec`` saved (gymnasium spaces again), or None for runs without the file."""
    from rlplat.envs.base import space_from_json

    path = run_dir / ENV_SPEC
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {**data, "observation_space": space_from_json(data["observation_space"]),
            "action_space": space_from_json(data["action_space"])}


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

    ``resume=false``: None. ``resume=true``: the newest intact checkpoint of this run dir (never
    another run's). ``resume=PATH``: that checkpoint folder, or the newest intact checkpoint of
    that run dir. A damaged checkpoint is skipped with a warning naming the file.

    Raises:
        FileNotFoundError: nothing to resume, naming what was looked at and what to pass.
    """
    if resume in (False, None, "false", "False"):
        return None
    run_dir = Path(run_dir)
    if resume in (True, "true", "True"):
        found = newest_intact(run_dir)
        if found is None:
            raise FileNotFoundError(
                f"resume=true continues this run dir ({run_dir}), which has no intact checkpoint. To continue "
                f"another run, pass resume=<its run dir or checkpoint folder>{_newest_sibling_hint(run_dir)}; "
                f"to reuse a run dir, start with hydra.run.dir=<that dir> resume=true")
        return found
    path = Path(str(resume)).expanduser()
    if (path / TRAINER_STATE).exists() or (path / MANIFEST).exists():
        problem = verify(path)
        if problem:
            raise FileNotFoundError(f"resume={resume}: the checkpoint is damaged: {problem}; pass its run dir "
                                    f"(resume={path.parent.parent}) to use the newest intact checkpoint")
        return path
    found = newest_intact(path)
    if found is None:
        raise FileNotFoundError(
            f"resume={resume}: neither a checkpoint folder (no {TRAINER_STATE}) nor a run dir with an intact "
            f"{CHECKPOINTS}/step_N; pass one of those, or resume=false for a fresh run")
    return found


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; warns about each damaged one skipped."""
    for step, folder in reversed(list_checkpoints(run_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("checkpoint step %d is damaged and skipped: %s", step, problem)
        print(f"warning: checkpoint step {step} is damaged and skipped: {problem}")
    return None


def _newest_sibling_hint(run_dir: Path) -> str:
    if not run_dir.parent.is_dir():
        return ""
    siblings = sorted((d for d in run_dir.parent.iterdir() if d.is_dir() and d != run_dir and list_checkpoints(d)),
                      key=lambda d: d.stat().st_mtime)
    return f" (the newest run beside this one: resume={siblings[-1]})" if siblings else ""


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in ``run_dir`` (its overrides, as Hydra saved them)."""
    import shlex

    import yaml

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").exists() and (run_dir.parent / "config.yaml").exists():
        run_dir = run_dir.parent  # a phase inside a run (the warm start): the run resumes it
    saved = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(saved.read_text()) or []) if saved.exists() else ["<the same overrides>"]
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    return "resume with: rlplat-train " + " ".join(
        [*(shlex.quote(o) for o in keep), shlex.quote(f"hydra.run.dir={run_dir}"), "resume=true"])


def check_same_parts(folder: Path, cfg: Any) -> None:
    """Refuses a checkpoint written by another algorithm or policy family than ``cfg``'s.

    Raises:
        ValueError: naming both.
    """
    saved = parts_of(folder)
    for kind in ("algo", "policy"):
        mine = str(cfg[kind]._target_)
        if saved.get(kind) and saved[kind] != mine:
            raise ValueError(f"resume={folder} was written by {kind} {saved[kind].rsplit('.', 1)[-1]}, but this run's "
                             f"{kind} is {mine.rsplit('.', 1)[-1]}: resume a run of the same {kind}, or resume=false")
