"""bench/grader.py runs end to end on the shared data and grades what it claims to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.grader import DEFAULT_DATA, verify_workload

needs_data = pytest.mark.skipif(
    not (DEFAULT_DATA / "grader").is_dir(), reason=f"shared data not found at {DEFAULT_DATA}"
)


@needs_data
def test_verify_workload_cannot_be_decided_by_text_matching():
    from concise_rl.grader import quick_grade

    responses, references = verify_workload(DEFAULT_DATA, limit=40)
    assert all(quick_grade(r, a)[0] is None for r, a in zip(responses, references))


@needs_data
def test_grader_bench_reports_every_workload():
    out = subprocess.run(
        [sys.executable, "-m", "bench.grader", "--repeats", "1", "--limit", "20", "--workers", "1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_name = {x["workload"]: x for x in lines if "workload" in x}
    assert set(by_name) == {"dev", "verify", "mixed"}
    assert by_name["dev"]["responses"] == 400 and by_name["dev"]["correct"] == 375
    assert by_name["verify"]["responses"] == 20 and all(x["responses_per_s"] > 0 for x in by_name.values())
