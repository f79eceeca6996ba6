"""The kill soak (bench/killsoak.py) at a small size, and the crash points it kills at (concise_rl/faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from concise_rl import faults

ROOT = Path(__file__).resolve().parents[1]


def _reach(spec: str | None, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if spec is not None:
        env[faults.ENV] = spec
    return subprocess.run([sys.executable, "-c", f"from concise_rl import faults\n{code}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_crash_point_kills_the_process_at_its_nth_passage_and_no_other() -> None:
    code = "for i in range(3):\n    faults.point('before-alias'); print(i, flush=True)\nfaults.point('after-upload')"
    assert _reach(None, code).stdout.split() == ["0", "1", "2"]
    first = _reach("before-alias", code)
    assert first.returncode == -9 and first.stdout == ""
    second = _reach("before-alias@2", code)
    assert second.returncode == -9 and second.stdout.split() == ["0"]
    other = _reach("after-upload", code)
    assert other.returncode == -9 and other.stdout.split() == ["0", "1", "2"]


@pytest.mark.parametrize("spec", ["before-alais", "before-alias@0", "before-alias@x"])
def test_a_bad_crash_point_is_refused_with_the_names_there_are(spec: str) -> None:
    done = _reach(spec, "pass")
    assert done.returncode == 1 and f"CONCISE_RL_CRASH_AT={spec!r}" in done.stderr
    assert all(name in done.stderr for name in faults.POINTS)


@pytest.mark.slow
def test_kills_at_every_crash_point_and_at_random_moments_converge_to_the_uninterrupted_registry(
        tmp_path: Path) -> None:
    """Issue 23, points 2 and 3, in CI at a small size: every crash point once, then 3 kills at random
    moments, each SIGTERM or SIGKILL at even odds (a new seed each run, printed first: a failure is replayed
    with it)."""
    done = subprocess.run([sys.executable, "-m", "bench.killsoak", "--kills", "3", "--out", str(tmp_path)], cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != faults.ENV}, capture_output=True,
                          text=True, timeout=1500)
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]
    assert out.startswith("kill schedule seed: ")
    for name in faults.POINTS:
        assert f"crash point {name} ({faults.POINTS[name]}): exit -9" in out
    assert "crash points: the run after them got to the end (exit 0" in out
    assert f"{len(faults.POINTS)} crash points and 3 kills over " in out.splitlines()[-1]
