"""bench/rollout.py runs end to end and its greedy check compares real tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.mechanism import tiny_random_model


def test_rollout_bench_reports_both_engines(tmp_path: Path) -> None:
    model = tiny_random_model(tmp_path / "tiny")
    out = subprocess.run(
        [sys.executable, "-m", "bench.rollout", "--model", str(model), "--prompts", "4", "--max-new-tokens", "8",
         "--repeats", "1"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    engines = {(x["engine"], x["temperature"]) for x in lines if "engine" in x}
    assert engines == {("hf", 0.0), ("kv", 0.0), ("hf", 0.6), ("kv", 0.6)}
    greedy = next(x for x in lines if x.get("temperature") == 0.0 and "greedy_rows_identical" in x)
    assert greedy["greedy_rows_identical"] == "4/4"
    assert all(x["tokens_per_s"] > 0 for x in lines if "engine" in x)
