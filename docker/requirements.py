"""Prints requirement lines from pyproject.toml for the images' dependency layers.

The images install their dependencies before the source is copied (a source change then reuses
the cached layer), so they cannot ``pip install .``; this script reads the same lists pip would,
so every version range stays in pyproject.toml alone.

    python requirements.py --core all                          # [project] dependencies
    python requirements.py --core none --extra maniskill       # only an extra
    python requirements.py --core torch,numpy --extra serve    # named core deps + an extra
    python requirements.py --core none --extra maniskill,libero  # several extras

Standard library only: it runs in a fresh Python before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ("ray[default]>=2" -> "ray")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(project: dict, core: str, extras: list[str]) -> list[str]:
    """Requirement lines: the core deps chosen by ``core`` ("all", "none" or comma-separated
    names), then each extra's (an extra naming the project itself is expanded).

    Raises:
        ValueError: a name that is not a core dependency, or an extra that does not exist.
    """
    dependencies = project.get("dependencies", [])
    if core == "all":
        lines = list(dependencies)
    elif core == "none":
        lines = []
    else:
        by_name = {dist_name(d): d for d in dependencies}
        wanted = [dist_name(n) for n in core.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"--core names {unknown}, not in pyproject.toml's [project] dependencies "
                             f"({sorted(by_name)}): fix the name in docker/Dockerfile")
        lines = [by_name[n] for n in wanted]
    optional = project.get("optional-dependencies", {})
    self_name = dist_name(project["name"])
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise ValueError(f"--extra {extra}: pyproject.toml has no such extra (it has {sorted(optional)})")
        for line in optional[extra]:
            if dist_name(line) == self_name:  # "rlplat[dev,serve]": the named extras instead
                pending.extend(e.strip() for e in line.split("[", 1)[1].split("]", 1)[0].split(","))
            else:
                lines.append(line)
    return list(dict.fromkeys(lines))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one requirement a line, or the problem on stderr (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--core", default="all", help='"all", "none" or comma-separated core dependency names')
    parser.add_argument("--extra", action="append", default=[],
                        help="extras to add, comma-separated (repeatable)")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    extras = [e.strip() for group in args.extra for e in group.split(",") if e.strip()]
    try:
        lines = requirements(project, args.core, extras)
    except ValueError as err:
        print(f"requirements.py: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
