"""One validation pass, before anything starts: every entry point (train, eval, serve) calls
``validate(cfg)`` first, so a bad config fails in well under a second, before Ray, workers or
models, with a message naming the key the user set, its value and the fix.

What it checks, in order:
1. keys: every group is compared with its schema (the registered part's dataclass, the
   top-level ``TrainConfig``); a key the schema does not have is refused even when added with
   ``+`` (Hydra lets ``+`` add keys to any group), naming the closest existing key;
2. ranges declared beside the fields (``rlplat.registry.checked``);
3. renamed keys (``register(..., renamed=...)``);
4. cross-field arithmetic, paths and weights: the loop's ``check_config`` (the algorithm's batch
   arithmetic, roles, the policy's preflight), the warm start's, and the checkpoint ``resume``
   names (it exists, is intact, and comes from the same algorithm and policy family).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlplat import registry

#: Top-level settings that were renamed: old key -> new key.
RENAMED = {"trainer.keep_checkpoints": "trainer.keep_last"}


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the fix."""


@dataclass
class Validated:
    """What validation built and found, for the entry point to use."""

    algo: Any
    # The SFT warm start's config and algorithm (None: no warm start).
    warm_cfg: DictConfig | None = None
    warm_algo: Any = None
    # The checkpoint folder to resume from (None: a fresh run).
    resume_from: Path | None = None


def validate(cfg: DictConfig, run_dir: Path) -> Validated:
    """Checks ``cfg`` (a composed run config) for a run in ``run_dir``; raises ``ConfigError``."""
    from hydra.errors import InstantiationException

    from rlplat.config import TrainConfig

    try:
        errors = [*renamed_errors(cfg), *schema_errors(cfg, TrainConfig, "")]
        if errors:
            raise ConfigError("\n  ".join(errors))
        registry.refuse_renamed(cfg)
        return _cross_checks(cfg, run_dir)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, InstantiationException) as err:
        raise ConfigError(str(err)) from None


def _cross_checks(cfg: DictConfig, run_dir: Path) -> Validated:
    from rlplat import checkpoint
    from rlplat.loops.embodied import check_config
    from rlplat.loops.preference import check_preference_config
    from rlplat.runtime.placement import PlacementSpec
    from rlplat.train import warm_start_config

    has_env, has_preference = cfg.get("env") is not None, cfg.get("preference") is not None
    if has_env and has_preference:
        raise ConfigError(
            f"env={cfg.env._target_} and preference={cfg.preference._target_} are both set; a run has one of them: "
            f"drop the env with ~env on the command line (in an experiment: '- override /env: null')")
    if not has_env and not has_preference:
        raise ConfigError("the run has neither an env nor a preference source: choose env=<name> (e.g. env=toy) "
                          "or preference=<name> (e.g. preference=shapes_fidelity)")
    PlacementSpec.from_config(cfg.placement)  # roles on devices, bundles: ValueError naming the key
    result = Validated(check_preference_config(cfg) if has_preference else check_config(cfg))
    if has_env:
        result.warm_cfg = warm_start_config(cfg, run_dir)
        if result.warm_cfg is not None:
            result.warm_algo = check_config(result.warm_cfg)
    result.resume_from = checkpoint.find_resume_checkpoint(cfg.resume, run_dir)
    if result.resume_from is not None:
        checkpoint.check_same_parts(result.resume_from, cfg)
    return result


def renamed_errors(cfg: DictConfig) -> list[str]:
    """Top-level keys that were renamed (``RENAMED``), with the new name."""
    errors = []
    for old, new in RENAMED.items():
        value = OmegaConf.select(cfg, old, default=None)
        if value is not None:
            errors.append(f"{old} was renamed to {new}: write {new}={value}")
    return errors


def schema_errors(node: DictConfig, schema: type, path: str) -> list[str]:
    """Keys of ``node`` that ``schema`` lacks, and values outside their declared ranges (recursive)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    try:
        types = typing.get_type_hints(schema)
    except (NameError, TypeError):
        types = {}
    where = path or "the top level"
    errors = []
    for key in node:
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key == "_target_" or full in RENAMED:
            continue
        if key not in fields:
            known = sorted(k for k in fields if k != "_target_")
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {path + '.' if path else ''}{near[0]}? " if near else ""
            errors.append(f"{full} is not a setting of {where} ({schema.__name__}): {hint}"
                          f"remove it (settings: {', '.join(known)})")
            continue
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        check = fields[key].metadata.get("check")
        if check is not None and (needed := check.problem(value)) is not None:
            errors.append(f"{full}={value} must be {needed}: set {full} to {'' if needed.startswith('one of') else 'a value '}{needed} "
                          f"(the default is {fields[key].default})")
        sub = _schema_of(key, value, types.get(key), path)
        if sub is not None:
            errors += schema_errors(value, sub, full)
    return errors


def _schema_of(key: str, value: Any, declared: Any, path: str) -> type | None:
    """The dataclass a sub-node is checked against: its declared type, or for a part group
    (policy, env, algo, ...) the schema registered for its ``_target_``."""
    if not isinstance(value, DictConfig):
        return None
    if dataclasses.is_dataclass(declared):
        return declared
    kind = key if not path else None
    if kind in registry.KINDS and "_target_" in value:
        part = registry.part_for(kind, value._target_)
        return part.node() if part is not None else None
    return None
