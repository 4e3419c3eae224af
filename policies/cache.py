"""Build-once model folders: a tiny preset is built with random weights into a cache folder
named by a hash of its build arguments, then always loaded from there with ``from_pretrained``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$RLPLAT_CACHE_DIR``, else ``<tmp>/rlplat-cache``."""
    return Path(cache_dir or os.environ.get("RLPLAT_CACHE_DIR") or Path(tempfile.gettempdir()) / "rlplat-cache")


def cached_folder(cache_dir: str | os.PathLike | None, prefix: str, build_args: Mapping[str, Any], version: int) -> Path:
    """``<root>/<prefix>-<hash of version + build_args>`` (not created here)."""
    digest = hashlib.sha1(
        json.dumps({"v": version, **build_args}, sort_keys=True, default=list).encode()
    ).hexdigest()[:12]
    return cache_root(cache_dir) / f"{prefix}-{digest}"


def build_once(target: Path, marker: str, build: Callable[[Path], Any]) -> Path:
    """``target``, after ``build(tmp)`` wrote it unless ``target/marker`` exists already.

    The build goes to a temporary sibling that is renamed into place, so concurrent workers
    never see a half-written model (the loser of the race discards its copy).
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
