"""Dependency direction (ARCHITECTURE.md): the core calls the contracts, families stand alone.

- No module of the core (``rlplat/``) imports a concrete env or policy family; it may import the
  contracts ``rlplat.envs.base`` and ``rlplat.policies.base``. Which families exist is known
  only to ``rlplat/registry.py``, as module names it imports at start.
- No family (``envs/``, ``policies/``) imports the core beyond the data types the contracts name
  (``rlplat.batch``, the pair-data format ``rlplat.pairs``) and the registry it declares itself
  in; envs and policies do not import each other's families.

Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {"rlplat.envs.base", "rlplat.policies.base"}
CORE_TYPES_FOR_FAMILIES = {"rlplat", "rlplat.batch", "rlplat.registry", "rlplat.pairs"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("envs", "policies"):
        parts.insert(0, "rlplat")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from rlplat.policies import openvla" imports a submodule.
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names
                      if name in ("rlplat.envs", "rlplat.policies", "rlplat.envs.preference")]
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "assets" not in p.parts)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    # The rule below is only as good as the scan: a lazy import must be found too.
    sample = ROOT / "rlplat" / "train.py"
    names = [name for _, name in imports_of(sample)]
    assert "rlplat.loops.embodied" in names  # imported inside run()


@pytest.mark.parametrize("path", files("rlplat"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_family(path):
    bad = [f"line {line}: {name}" for line, name in imports_of(path)
           if (within(name, "rlplat.envs") or within(name, "rlplat.policies"))
           and name not in CONTRACTS and name not in ("rlplat.envs", "rlplat.policies")]
    assert not bad, f"{path.relative_to(ROOT)} imports concrete families (use the contracts or the registry): {bad}"


@pytest.mark.parametrize("path", files("envs", "policies"), ids=lambda p: str(p.relative_to(ROOT)))
def test_families_import_only_the_core_types_their_contracts_name(path):
    own = "rlplat.envs" if path.relative_to(ROOT).parts[0] == "envs" else "rlplat.policies"
    other = "rlplat.policies" if own == "rlplat.envs" else "rlplat.envs"
    bad = []
    for line, name in imports_of(path):
        if not within(name, "rlplat") or within(name, own):
            continue
        if within(name, other):
            if name not in CONTRACTS:
                bad.append(f"line {line}: {name} (another family)")
        elif name not in CORE_TYPES_FOR_FAMILIES:
            bad.append(f"line {line}: {name} (the core)")
    assert not bad, f"{path.relative_to(ROOT)} reaches outside its family: {bad}"


def test_the_controller_imports_no_model_or_simulator_code():
    """Composing and checking env and preference runs, and importing everything the controller
    runs, leaves transformers, diffusers, peft and the simulators out of the process: the
    families' heavy modules load only in the workers."""
    code = (
        "import sys\n"
        "from rlplat.config import compose\n"
        "from rlplat.loops.embodied import check_config\n"
        "from rlplat.loops.preference import check_preference_config\n"
        "import rlplat.train, rlplat.eval, rlplat.loops.skeleton, rlplat.workers.env, rlplat.workers.policy, "
        "rlplat.workers.diffusion\n"
        "check_config(compose(['experiment=quickstart']))\n"
        "check_config(compose(['experiment=toy_mlp']))\n"
        "check_preference_config(compose(['experiment=d3po_tiny']))\n"
        "print(sorted(m for m in ('transformers', 'diffusers', 'peft', 'mani_skill', 'sapien', 'libero') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
