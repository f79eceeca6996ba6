"""Layering: imports point down only, and everything installs under the one ``concise_rl`` namespace.

The layers, lowest first: the core (``concise_rl``: config, grader, problems and benchmarks,
store, files), ``training``, ``evaluation``, ``tasks`` (the stages), ``flows`` (Prefect), and
the command line on top (``concise_rl.cli`` and what only it uses: its help text, its printing,
``deploy``). A module may import its own layer and the layers below it, never one above.
training/ and evaluation/ are plain libraries besides: no Prefect, no MLflow.
"""

from __future__ import annotations

import ast
import os
import shutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject.toml's package-dir), in layer order after the core.
LAYER_DIRS = {"training": "concise_rl.training", "evaluation": "concise_rl.evaluation", "tasks": "concise_rl.tasks",
              "flows": "concise_rl.flows"}
LAYERS = ("core", "training", "evaluation", "tasks", "flows", "cli")
CLI_MODULES = ("concise_rl.cli", "concise_rl.cli_text", "concise_rl.console", "concise_rl.deploy")
LIBRARY_DIRS = ("training", "evaluation")
FORBIDDEN = ("prefect", "mlflow")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    package = "concise_rl" if rel.parts[0] == "concise_rl" else LAYER_DIRS[rel.parts[0]]
    name = ".".join([package, *rel.with_suffix("").parts[1:]])
    return name.removesuffix(".__init__")


def layer_of(module: str) -> str | None:
    """The layer of a project module, or None for anything else (the standard library, torch, ...)."""
    parts = module.split(".")
    if parts[0] != "concise_rl":
        return None
    if len(parts) > 1 and parts[1] in LAYER_DIRS:
        return parts[1]
    if any(module == m or module.startswith(m + ".") for m in CLI_MODULES):
        return "cli"
    return "core"


def project_files() -> list[Path]:
    return sorted(p for d in ("concise_rl", *LAYER_DIRS) for p in (ROOT / d).rglob("*.py"))


def imported_modules(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, functions included; ``from pkg import name``
    counts as ``pkg.name`` (it may be a module) and relative imports are resolved against nothing
    (the project does not use them, and the checker reports them)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module:
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(source: str, filename: str, module: str) -> list[str]:
    """Every import that points up a layer, leaves the namespace (a bare ``training``) or is relative."""
    mine = LAYERS.index(layer_of(module))
    bad = []
    for line, name in imported_modules(source, filename):
        if name.startswith("."):
            bad.append(f"{filename}:{line}: relative import {name}")
        elif name.split(".")[0] in LAYER_DIRS:
            bad.append(f"{filename}:{line}: {name} is outside the namespace; import concise_rl.{name}")
        elif (theirs := layer_of(name)) is not None and LAYERS.index(theirs) > mine:
            bad.append(f"{filename}:{line}: {module} ({LAYERS[mine]}) imports {name} ({theirs})")
    return bad


def forbidden_imports(source: str, filename: str) -> list[str]:
    """Every import of a forbidden top-level package, anywhere in the file (functions included)."""
    return [f"{filename}:{line}: {name}" for line, name in imported_modules(source, filename)
            if name.split(".")[0] in FORBIDDEN]


def test_the_layer_checker_catches_every_upward_import():
    src = (
        "import concise_rl.tasks.stages\n"
        "from concise_rl.flows import pipeline\n"
        "def f():\n"
        "    from concise_rl import cli\n"
        "from concise_rl import config, grader\n"  # the core: fine
        "from concise_rl.training.ppo import gae\n"  # its own layer: fine
        "from training import ppo\n"  # the old top-level name: a second copy of the module
        "from . import ppo\n"
        "import torch\n"
    )
    assert upward_imports(src, "x.py", "concise_rl.training.trainer") == [
        "x.py:1: concise_rl.training.trainer (training) imports concise_rl.tasks.stages (tasks)",
        "x.py:2: concise_rl.training.trainer (training) imports concise_rl.flows.pipeline (flows)",
        "x.py:7: training.ppo is outside the namespace; import concise_rl.training.ppo",
        "x.py:8: relative import .",
        "x.py:4: concise_rl.training.trainer (training) imports concise_rl.cli (cli)",
    ]
    # The core importing evaluation (as config.py once did for the benchmark names) is upward too.
    assert upward_imports("from concise_rl.evaluation.benchmarks import BENCHMARKS\n", "c.py", "concise_rl.config") == [
        "c.py:1: concise_rl.config (core) imports concise_rl.evaluation.benchmarks.BENCHMARKS (evaluation)"
    ]
    assert upward_imports("from concise_rl.flows import pipeline\n", "d.py", "concise_rl.deploy") == []


def test_every_project_file_has_a_layer():
    names = {module_name(p) for p in project_files()}
    assert {"concise_rl.config", "concise_rl.grader", "concise_rl.benchmarks", "concise_rl.training.trainer",
            "concise_rl.evaluation.gate", "concise_rl.tasks.stages", "concise_rl.flows.pipeline", "concise_rl.cli"} <= names
    assert all(layer_of(n) in LAYERS for n in names)


@pytest.mark.parametrize("path", project_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_point_down(path):
    src = path.read_text(encoding="utf-8")
    assert upward_imports(src, path.relative_to(ROOT).as_posix(), module_name(path)) == []


@pytest.mark.parametrize("path", sorted(p for d in ("tests", "bench") for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_tests_and_benchmarks_import_the_namespace(path):
    """A test importing ``training.trainer`` would load a second copy of the module beside the
    code's ``concise_rl.training.trainer`` (pytest puts the repository root on the path)."""
    src = path.read_text(encoding="utf-8")
    bare = [f"{line}: {name}" for line, name in imported_modules(src, path.name) if name.split(".")[0] in LAYER_DIRS]
    assert bare == []


def test_the_checker_catches_every_prefect_or_mlflow_import():
    src = (
        "import prefect\n"
        "import os, mlflow.tracking\n"
        "from prefect.tasks import task\n"
        "from mlflow import log_metric\n"
        "def f():\n"
        "    import mlflow\n"
        "import prefectx\n"  # a different package
        "from . import prefect\n"  # a relative import of a local module
    )
    assert forbidden_imports(src, "x.py") == [
        "x.py:1: prefect",
        "x.py:2: mlflow.tracking",
        "x.py:3: prefect.tasks.task",
        "x.py:4: mlflow.log_metric",
        "x.py:6: mlflow",
    ]


@pytest.mark.parametrize("path", sorted(p for d in LIBRARY_DIRS for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_prefect_or_mlflow_import(path):
    assert forbidden_imports(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()) == []


def test_importing_trainer_and_evaluate_loads_neither():
    code = (
        "import sys\n"
        "import concise_rl.training.trainer, concise_rl.evaluation.evaluate\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_wheel_installs_every_layer_under_concise_rl(tmp_path):
    """What `pip install .` puts in site-packages: concise_rl/ with training/, evaluation/, tasks/
    and flows/ inside it, and no top-level package of those names."""
    # Built from a copy: setuptools builds in the source tree (build/), which must stay clean.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("concise_rl", *LAYER_DIRS):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(src)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("concise_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"concise_rl"}
    # Besides the sources, the one data folder: the demo's shipped base (training/prebuilt.py).
    data = {p.relative_to(ROOT / "training").as_posix() for p in (ROOT / "training" / "prebuilt").rglob("*")
            if p.is_file()}
    assert "prebuilt/manifest.json" in data
    for folder, package in LAYER_DIRS.items():
        sources = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")}
        sources |= data if folder == "training" else set()
        assert {n.removeprefix(package.replace(".", "/") + "/") for n in names
                if n.startswith(package.replace(".", "/") + "/")} == sources, folder


def test_the_readme_quotes_no_measured_figure_of_the_demo():
    """BENCHMARKS.md is the one place for the demo's measured figures (issue 22, point 6): the README
    links to it and quotes none, so the two cannot drift apart again."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    accuracies = re.findall(r"\d+\.\d+ ?/ ?\d+\.\d+%|\d+\.\d+% \[", readme)  # "99.0 / 97.4%", "98.8% ["
    timings = re.findall(r"\b\d+(?:\.\d+)? min(?:utes?)?\b", readme)  # "18.2 minutes", but not "15-minute target"
    assert not accuracies and not timings, (accuracies, timings)
    assert "BENCHMARKS.md#make-demo-end-to-end" in readme
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "## `make demo`, end to end" in benchmarks
