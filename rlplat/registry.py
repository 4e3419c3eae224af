"""Registries: every algorithm, env, policy and preference source declares itself where it is defined.

A part is a class, its config dataclass (the schema of its Hydra group) and ``@register(kind,
name, Config)``, plus one YAML naming ``<name>_schema`` that holds only what its preset changes
(README, "Adding an algorithm ..."; tests/plugins/rlplat_example_parts.py). The schema is stored in
Hydra's ConfigStore with ``_target_`` set to the class, so a misspelt key or a wrong type stops the
run when the config is composed. Families whose module imports a model library register from a
light ``config`` module beside it with ``target="module.Class"``, so the controller composes and
checks a config without importing the model. Parts outside rlplat are found through
``RLPLAT_PLUGINS`` (comma-separated module names) or the ``rlplat.plugins`` entry points.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

#: The Hydra groups a part can belong to.
KINDS = ("policy", "env", "preference", "algo")

#: Modules that define rlplat's own parts (the only place the core names a concrete family).
BUILTIN_MODULES = (
    *(f"rlplat.algos.{name}" for name in ("ppo", "grpo", "sft", "d3po", "ddpo", "diffusion_sft", "dpo")),
    *(f"rlplat.envs.{name}" for name in ("toy", "maniskill", "libero", "preference.online", "preference.offline")),
    *(f"rlplat.policies.{name}" for name in ("mlp", "constant", "openvla.config", "diffusion.config")),
)

#: The contracts the core calls (envs/base.py, policies/base.py, rlplat/algos/base.py).
CONTRACTS = ("ActionPolicy", "DiffusionPolicy", "VectorEnv", "Algorithm", "PreferenceAlgorithm")

PLUGINS_ENV = "RLPLAT_PLUGINS"
PLUGINS_ENTRY_POINTS = "rlplat.plugins"

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Part:
    """One registered part: its group, name, config dataclass and the class the config builds."""

    kind: str
    name: str
    schema: type
    target: str
    # Old key -> new key, for settings that were renamed (the old key is refused, naming the new).
    renamed: tuple[tuple[str, str], ...] = ()
    # Checks what building the part needs from this machine (weights on disk), run before any
    # worker starts with the config's arguments; raises ValueError / FileNotFoundError naming the fix.
    preflight: Callable[..., None] | None = None
    # The contract the class implements (ActionPolicy, DiffusionPolicy, VectorEnv, ...), so the
    # core can check a config without importing the class.
    contract: str | None = None

    def node(self) -> type:
        """The schema with ``_target_`` naming the class (what the ConfigStore holds; one per part)."""
        if self not in _NODES:
            # Renamed keys stay in the schema as null, so setting one reaches refuse_renamed (a
            # message naming the new key) instead of Hydra's "not in" error.
            old_keys = [(old, Any, dataclasses.field(default=None)) for old, _ in self.renamed]
            _NODES[self] = dataclasses.make_dataclass(
                self.schema.__name__, [*old_keys, ("_target_", str, dataclasses.field(default=self.target))],
                bases=(self.schema,))
        return _NODES[self]


@dataclass(frozen=True)
class Check:
    """The valid values of one config field (``checked``); ``rlplat.validate`` applies it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """The requirement ``value`` fails (``">= 1"``, ``"one of a, b"``), None when it passes;
        null passes (the field's type decides on it)."""
        if value is None:
            return None
        if self.choices is not None:
            return None if value in self.choices else f"one of {', '.join(map(str, self.choices))}"
        failed = [f"{op} {bound}" for bound, op, ok in (
            (self.ge, ">=", lambda b: value >= b), (self.gt, ">", lambda b: value > b), (self.le, "<=", lambda b: value <= b))
            if bound is not None and not ok(bound)]
        return " and ".join(failed) or None


def checked(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            choices: tuple[Any, ...] | None = None) -> Any:
    """A config field whose valid range is declared beside it (checked before anything starts)::

        total_steps: int = checked(100, ge=1)
        advantage: str = checked("group", choices=("group", "per_prompt"))
    """
    return dataclasses.field(default=default, metadata={"check": Check(ge, gt, le, choices)})


_PARTS: dict[tuple[str, str], Part] = {}
_NODES: dict[Part, type] = {}


def register(kind: str, name: str, schema: type, *, target: str | None = None,
             renamed: dict[str, str] | None = None, preflight: Callable[..., None] | None = None,
             contract: str | None = None) -> Callable[[T], T] | None:
    """Declares a part.

    As a class decorator (``target`` omitted) the decorated class is the target. Called with
    ``target="package.module.Class"`` it registers at once and returns None (for families whose
    class lives in a heavy module). ``renamed`` maps settings' old names to their new ones: a
    config that still sets an old name stops with a message naming the new one. ``preflight``
    checks the machine before any worker starts; ``contract`` names the interface the class
    implements (derived from the class's bases in the decorator form).

    Raises:
        ValueError: unknown kind, a schema that is not a dataclass, or a name already taken by
            another class.
    """
    if kind not in KINDS:
        raise ValueError(f"register: kind {kind!r} must be one of {KINDS}")
    if not dataclasses.is_dataclass(schema):
        raise ValueError(f"register({kind!r}, {name!r}): the schema {schema!r} must be a dataclass")
    if any(f.name == "_target_" for f in dataclasses.fields(schema)):
        raise ValueError(f"register({kind!r}, {name!r}): {schema.__name__} must not declare _target_; "
                         f"the registry sets it to the registered class")

    def add(path: str, implements: str | None) -> None:
        old = _PARTS.get((kind, name))
        if old is not None and old.target != path:
            raise ValueError(f"{kind} {name!r} is registered twice: {old.target} and {path}; rename one")
        _PARTS[(kind, name)] = Part(kind, name, schema, path, tuple(sorted((renamed or {}).items())), preflight,
                                    implements)

    if target is not None:
        add(target, contract)
        return None

    def decorate(cls: T) -> T:
        add(f"{cls.__module__}.{cls.__qualname__}",
            contract or next((base.__name__ for base in cls.__mro__ if base.__name__ in CONTRACTS), None))
        return cls

    return decorate


def load_parts() -> None:
    """Imports the modules that register parts: rlplat's own, then plugins (idempotent).

    Raises:
        ImportError: a plugin module named in RLPLAT_PLUGINS or an entry point does not import;
            the message names where it was listed.
    """
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{PLUGINS_ENV} names module {module!r}, which does not import: {err}") from err
    for entry in entry_points(group=PLUGINS_ENTRY_POINTS):
        try:
            entry.load()
        except ImportError as err:
            raise ImportError(f"entry point {entry.name!r} ({PLUGINS_ENTRY_POINTS}) does not import: {err}") from err


def parts(kind: str | None = None) -> list[Part]:
    """Registered parts, sorted by kind and name (after ``load_parts``)."""
    return sorted((p for p in _PARTS.values() if kind is None or p.kind == kind), key=lambda p: (p.kind, p.name))


def get(kind: str, name: str) -> Part:
    """The part registered as ``kind`` ``name``.

    Raises:
        KeyError: not registered; the message lists the names that are.
    """
    try:
        return _PARTS[(kind, name)]
    except KeyError:
        known = ", ".join(p.name for p in parts(kind)) or "none"
        raise KeyError(f"no {kind} named {name!r} is registered (registered: {known})") from None


def part_for(kind: str, target: str) -> Part | None:
    """The part of ``kind`` whose class is at import path ``target`` (None: not registered)."""
    return next((p for p in _PARTS.values() if p.kind == kind and p.target == target), None)


def preflight(kind: str, node: Any) -> None:
    """Runs the preflight of the part a config group (``_target_`` + arguments) builds, if any."""
    from omegaconf import OmegaConf

    args = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    part = part_for(kind, args.pop("_target_", ""))
    if part is not None and part.preflight is not None:
        part.preflight(**args)


def refuse_renamed(cfg: Any) -> None:
    """Raises if a group of ``cfg`` (a composed run config) sets a renamed key; else drops the
    renamed keys' null placeholders, so saved configs hold only the current names.

    Raises:
        ValueError: ``<group>.<old>`` was renamed to ``<group>.<new>``.
    """
    from omegaconf import open_dict

    for part in _PARTS.values():
        node = cfg.get(part.kind)
        if node is None or node.get("_target_") != part.target:
            continue
        for old, new in part.renamed:
            if node.get(old) is not None:
                raise ValueError(f"{part.kind}.{old} was renamed to {part.kind}.{new}: "
                                 f"write {part.kind}.{new}={node.get(old)}")
            with open_dict(node):
                node.pop(old, None)
