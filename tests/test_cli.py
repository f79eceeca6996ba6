"""The `concise-rl` command line (concise_rl/cli.py): help, and bad input rejected before any heavy work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
COMMANDS = ["run", "curate", "train", "evaluate", "compare", "promote", "ablate", "grade"]


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CONCISE_RL_HOME"] = str(home)
    env.pop("PREFECT_HOME", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start(args: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "concise_rl.cli", *args],
        cwd=ROOT,
        env=env_for(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_cli(args: list[str], home: Path) -> tuple[int, str, str]:
    return finish(start(args, home))


def test_main_module_help(tmp_path):
    code, out, err = run_cli(["--help"], tmp_path)
    assert code == 0, err
    assert out.startswith("usage: concise-rl")
    for cmd in COMMANDS:
        assert cmd in out
    assert "exit codes" in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd, tmp_path):
    code, out, err = run_cli([cmd, "--help"], tmp_path)
    assert code == 0, err
    assert out.startswith(f"usage: concise-rl {cmd}")
    assert "--config" in out
    assert "--set" in out


def test_train_help_lists_phase(tmp_path):
    code, out, _ = run_cli(["train", "--help"], tmp_path)
    assert code == 0
    assert "--phase {1,2}" in out


def test_no_command_exits_2(tmp_path):
    code, _, err = run_cli([], tmp_path)
    assert code == 2
    assert "COMMAND" in err or "required" in err


def test_train_without_phase_exits_2(tmp_path):
    code, _, err = run_cli(["train", "--config", str(DEMO)], tmp_path)
    assert code == 2
    assert "--phase" in err


def test_bad_config_exits_2_quickly_and_before_heavy_work(tmp_path):
    """A missing file and an unknown key are both reported before anything heavy starts.

    The two processes run side by side to keep this file fast on two cores. The second
    runs the module exactly as ``python -m`` does (runpy, ``__main__``) and reports at
    exit which heavy pipeline libraries had been imported by then.
    """
    t0 = time.monotonic()
    missing = start(["run", "--config", "missing.yaml"], tmp_path / "a")
    typo = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import atexit, runpy, sys\n"
            "atexit.register(lambda: print('loaded:', sorted(m for m in ('prefect', 'mlflow', 'concise_rl.flows.pipeline') "
            "if m in sys.modules)))\n"
            "sys.argv = ['concise-rl', 'run', '--config', sys.argv[1], '--set', 'ppo.lamda=1']\n"
            "runpy.run_module('concise_rl.cli', run_name='__main__', alter_sys=True)\n",
            str(DEMO),
        ],
        cwd=ROOT,
        env=env_for(tmp_path / "b"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results = {"missing": finish(missing), "typo": finish(typo)}
    elapsed = time.monotonic() - t0

    code, out, err = results["missing"]
    assert code == 2, err
    assert "missing.yaml" in err
    assert "does not exist" in err
    assert err.startswith("concise-rl run:")
    assert "Traceback" not in err

    code, out, err = results["typo"]
    assert code == 2, err
    assert "ppo.lamda" in err
    assert "unknown key" in err
    assert err.startswith("concise-rl run:")
    assert "Traceback" not in err
    # Neither Prefect nor MLflow (nor the flow) was imported: validation came first.
    assert "loaded: []" in out

    # Nothing was started or written besides Prefect's (empty) home folder.
    for home in ("a", "b"):
        written = {p.name for p in (tmp_path / home).iterdir()} if (tmp_path / home).exists() else set()
        assert written <= {"prefect"}, written
    # Generous: a pipeline start (Prefect server, model build) takes far longer than this.
    assert elapsed < 60, f"bad-config runs took {elapsed:.1f}s"
