"""Layering: training/ and evaluation/ are plain libraries, free of orchestration (Prefect) and tracking (MLflow)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("training", "evaluation")
FORBIDDEN = ("prefect", "mlflow")


def library_files() -> list[Path]:
    return sorted(p for d in LIBRARY_DIRS for p in (ROOT / d).rglob("*.py"))


def forbidden_imports(source: str, filename: str) -> list[str]:
    """Every import of a forbidden top-level package, anywhere in the file (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_checker_catches_every_import_form():
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
        "x.py:3: prefect.tasks",
        "x.py:4: mlflow",
        "x.py:6: mlflow",
    ]


def test_library_folders_have_python_files():
    names = {p.relative_to(ROOT).as_posix() for p in library_files()}
    assert {"training/trainer.py", "training/curation.py", "evaluation/evaluate.py", "evaluation/gate.py"} <= names


@pytest.mark.parametrize("path", library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_prefect_or_mlflow_import(path):
    assert forbidden_imports(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()) == []


def test_importing_trainer_and_evaluate_loads_neither():
    code = (
        "import sys\n"
        "import training.trainer, evaluation.evaluate\n"
        "assert 'training.trainer' in sys.modules and 'evaluation.evaluate' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
