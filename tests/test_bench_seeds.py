"""bench/seeds.py: the whole recipe per seed, the first base shared by the RL seeds, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline_e2e import ROOT, TINY

PERMISSIVE = ["gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0"]


@pytest.mark.slow
def test_seed_table_over_runs_with_the_base_built_once(tmp_path: Path, prefect_api: str) -> None:
    out = tmp_path / "seeds"
    args = [sys.executable, "-m", "bench.seeds", "--sft-seeds", "3", "--rl-seeds", "0", "5", "--out", str(out)]
    for change in [*TINY, *PERMISSIVE]:
        args += ["--set", change]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "seeds.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["sft 3, rl 0", "sft 3, rl 5"]
    first, second = (out / "sft3-rl0"), (out / "sft3-rl5")
    # The second run took the first one's base as built: no SFT, the same base figures.
    assert "train_runtime" in (first / "run.log").read_text()
    assert "train_runtime" not in (second / "run.log").read_text()
    for key in ("base_acc@0.0", "base_len@0.0", "base_acc@0.6", "base_len@0.6"):
        assert runs["sft 3, rl 0"][key] == runs["sft 3, rl 5"][key], key
    # ... and different RL: the PPO steps' statistics differ (the tiny model's answers may not).
    history = [(home / "checkpoints" / "phase1" / "metrics.jsonl").read_text() for home in (first, second)]
    assert history[0] != history[1]
    for r, home in zip(runs.values(), (first, second), strict=True):
        summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
        phase1, phase2 = (summary["models"][m]["eval"]["heldout"]["0.6"]["mean_length"] for m in ("phase1", "phase2"))
        assert r["cut@0.6"] == pytest.approx(100 * (phase1 - phase2) / phase1), "phase 2 against phase 1"
        assert r["meets_targets"] == all(r[f"cut@{t}"] >= 40 and r[f"change@{t}"] >= -1 and r[f"ci_low@{t}"] >= -3
                                         for t in ("0.0", "0.6"))

    # The same command again runs nothing: each finished run is recorded in its home.
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "running in" in again.stdout, again.stderr[-3000:]
    assert json.loads((out / "seeds.json").read_text())["runs"] == result["runs"]
    assert "train_runtime" in (first / "run.log").read_text(), "run.log is the first run's, not overwritten"

    table = (out / "seeds.md").read_text()
    assert table.count("\n| sft 3, rl ") == 2 and "| mean |" in table and "| min |" in table and "| max |" in table
    assert result["meta"]["cpu"] and result["meta"]["torch"] and "bench.seeds" in result["meta"]["command"]


def test_seed_bench_refuses_a_missing_config(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.seeds", "--config", str(tmp_path / "nope.yaml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--config" in done.stderr and "does not exist" in done.stderr
