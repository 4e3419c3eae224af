"""The config groups' options as users see them: ``rlplat-train --help`` and the check of
``group=option`` overrides before Hydra composes (whose own messages list internal ``*_schema``
entries).

An option is a YAML file of a group (``conf/<group>/<option>.yaml``, or one on
``hydra.searchpath``) or a registered part's name; its comment is the file's first comment line
(else the part's docstring).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from importlib.resources import files

#: Groups a run composes from, in the order --help lists them.
GROUPS = ("experiment", "policy", "env", "preference", "algo", "placement", "logger")
SCHEMA_SUFFIX = "_schema"


#: Longest comment --help shows on an option's line.
MAX_COMMENT = 96


def one_line(text: str) -> str:
    """The first sentence of ``text`` on one line, cut at a colon or a word when still long."""
    text = " ".join(text.split())
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > MAX_COMMENT and ": " in sentence[30:MAX_COMMENT]:
        sentence = sentence[: sentence.index(": ")]
    if len(sentence) > MAX_COMMENT:
        sentence = sentence[: sentence.rindex(" ", 0, MAX_COMMENT)] + " ..."
    return sentence


def _comment(group: str, option: str) -> str:
    path = files("rlplat.conf").joinpath(group, f"{option}.yaml")
    if path.is_file():
        block = []
        for line in path.read_text().splitlines():
            text = line.strip()
            if not text.startswith("#"):
                break
            text = text.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            if not text and block:
                break
            block.append(text)
        return one_line(" ".join(block))
    from rlplat import registry

    try:
        schema = registry.get(group, option).schema
    except (KeyError, ValueError, SystemExit):
        return ""
    doc = (schema.__doc__ or "").strip()
    # A dataclass without a docstring gets its signature as __doc__: not a comment.
    return "" if not doc or doc.startswith(f"{schema.__name__}(") else one_line(doc.split("\n\n")[0])


@cache
def group_options(searchpath: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """``{group: {option: one-line comment}}`` for every group of ``GROUPS`` (schema entries left
    out); ``searchpath``: ``hydra.searchpath=[...]`` overrides, whose folders add options."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rlplat.config import register_configs

    register_configs()
    with initialize_config_module("rlplat.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        extra = {"config_name": "train", "overrides": list(searchpath)} if searchpath else {}
        names = {g: [o for o in loader.get_group_options(g, **extra) if not o.endswith(SCHEMA_SUFFIX)]
                 for g in GROUPS}
    return {g: {o: _comment(g, o) for o in sorted(opts)} for g, opts in names.items()}


def help_text() -> str:
    """What ``rlplat-train --help`` prints."""
    lines = [
        "rlplat-train: a run is policy x env (or preference source) x algorithm, placed by Ray.",
        "",
        "usage: rlplat-train [group=option ...] [key=value ...]          one run (outputs/<name>/<date>_<time>)",
        "       rlplat-train -m [key=a,b ...]                             a sweep (multirun/<date>_<time>/<job>)",
        "       rlplat-train experiment=toy_mlp trainer.total_steps=30    e.g.",
        "       rlplat-train hydra.run.dir=RUN_DIR resume=true            continue a stopped run",
        "",
        "Config groups (group=option); the experiment presets set the others:",
    ]
    for group, options in group_options().items():
        lines.append("")
        lines.append(f"{group}:")
        width = max((len(o) for o in options), default=0)
        lines += [f"  {o.ljust(width)}  {comment}".rstrip() for o, comment in options.items()]
    lines += [
        "",
        "Every setting of the composed config can be overridden (key=value); unknown keys are refused.",
        "  rlplat-train [overrides] --cfg job     print the composed config (with its defaults) and exit",
        "  rlplat-train --hydra-help              Hydra's own options (launchers, sweepers, logging)",
    ]
    return "\n".join(lines) + "\n"


def check_group_choices(overrides: Sequence[str]) -> str | None:
    """The message for the first ``group=option`` override (swept values too) whose option does
    not exist, naming the options and the closest one; None when all exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException:  # Hydra reports syntax errors itself, with their position
        return None
    chosen = [o for o in parsed if o.key_or_group in GROUPS and not o.is_delete()]
    if not chosen:  # nothing to check: no need to list the options (a Hydra start-up of its own)
        return None
    # Folders added with hydra.searchpath=[...] bring their own options (plugins' YAML files).
    options = group_options(tuple(o for o in overrides if o.startswith("hydra.searchpath=")))
    for override in chosen:
        group = override.key_or_group
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if value is None or str(value) == "null" or str(value) in options[group]:
                continue
            close = difflib.get_close_matches(str(value), list(options[group]), n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return (f"{group}={value}: no such option in group {group}{hint}; its options are: "
                    f"{', '.join(options[group])}. `rlplat-train --help` lists them with what each does")
    return None
