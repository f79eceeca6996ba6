"""bench/seeds.py: the whole recipe per seed, the first base shared by the RL seeds, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.seeds import cpu_kernels
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
    assert "## Every evaluation of run sft 3, rl 0" in table and table.count("\n| heldout | ") == 6
    assert result["meta"]["cpu"] and result["meta"]["torch"] and "bench.seeds" in result["meta"]["command"]
    assert (out / "seeds.png").read_bytes().startswith(b"\x89PNG")

    # --combine makes one table of earlier benches' runs without running anything.
    combined = tmp_path / "combined"
    done = subprocess.run([sys.executable, "-m", "bench.seeds", "--combine", str(out), "--out", str(combined)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((combined / "seeds.json").read_text())["runs"] == result["runs"]
    merged = (combined / "seeds.md").read_text()
    assert "Runs combined from `python -m bench.seeds --sft-seeds 3" in merged
    assert f"{cpu_kernels()} kernels)" in merged, "each source bench says which kernels it ran"
    assert merged.split("## Every evaluation")[1] == table.split("## Every evaluation")[1]
    assert (combined / "seeds.png").is_file() and not list(combined.glob("sft*"))

    # bench.phase2 reruns phase 2 from a finished home's phase-1 model, leaving the home as it was.
    before = sorted(p.relative_to(first) for p in first.rglob("*"))
    args = [sys.executable, "-m", "bench.phase2", str(first), "--out", str(tmp_path / "p2"), "--set",
            *TINY, "phase2.ppo.steps=3", "phase2.ppo.actor_lr=1e-3"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(line["train_lengths"]) == 3 and set(line["phase2"]) == {"0.0", "0.6"}
    for t, (acc, length) in line["phase2"].items():
        assert line["cut_pct"][t] == pytest.approx(100 * (1 - length / line["phase1"][t][1]), abs=0.1)
        assert line["acc_change_pts"][t] == pytest.approx(acc - line["phase1"][t][0], abs=0.1)
        low, high = line["acc_change_ci_pts"][t]
        assert low <= line["acc_change_pts"][t] <= high
    # The phase-1 model's figures are the pipeline's own evaluation of it.
    summary = json.loads((first / "reports" / "latest" / "summary.json").read_text())
    greedy = summary["models"]["phase1"]["eval"]["heldout"]["0.0"]
    assert line["phase1"]["0.0"] == [round(100 * greedy["accuracy"], 1), round(greedy["mean_length"], 1)]
    assert json.loads((tmp_path / "p2" / "results.jsonl").read_text().splitlines()[-1]) == line
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before


def test_seed_bench_refuses_a_missing_config(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.seeds", "--config", str(tmp_path / "nope.yaml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--config" in done.stderr and "does not exist" in done.stderr


def test_phase2_bench_refuses_a_home_without_phase_1(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.phase2", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "no finished phase 1" in done.stderr and str(tmp_path) in done.stderr


def test_full_table_shows_every_set_and_the_gates_own_comparison() -> None:
    from bench.seeds import full_table
    from concise_rl.config import GateConfig
    from concise_rl.evaluation.metrics import paired_difference

    def result(per_problem: list[float], length: float) -> dict:
        return {"accuracy": sum(per_problem) / len(per_problem), "accuracy_ci": [0.5, 1.0], "mean_length": length,
                "truncation_rate": 0.25, "n": len(per_problem), "per_problem": per_problem}

    answers = {"base": [1.0, 0.0, 1.0, 1.0], "phase1": [1.0, 1.0, 1.0, 1.0], "phase2": [1.0, 1.0, 0.0, 1.0]}
    lengths = {"base": 200.0, "phase1": 180.0, "phase2": 90.0}
    summary = {"models": {m: {"eval": {s: {t: result(answers[m], lengths[m]) for t in ("0.0", "0.6")}
                                       for s in ("heldout", "hard")}} for m in answers}}
    gate = GateConfig(bootstrap_samples=200)
    table = full_table("sft 0, rl 0", summary, gate)
    rows = [line for line in table.splitlines() if line.startswith(("| heldout", "| hard"))]
    assert len(rows) == 2 * 2 * 3
    diff = paired_difference(answers["phase2"], answers["phase1"], n_boot=200, alpha=0.05, seed=0)
    low, high = (100 * x for x in diff["ci"])
    change = f"-25.0 [{low:+.1f}, {high:+.1f}]"
    assert f"| hard | 0.6 | phase2 | 75.0% [50.0, 100.0] | 90 | 25.0% | 50.0% | {change} | 4 |" in rows
    assert rows[0] == "| heldout | 0.0 | base | 75.0% [50.0, 100.0] | 200 | 25.0% |  |  | 4 |"
    assert "| heldout | 0.0 | phase1 | 100.0% [50.0, 100.0] | 180 | 25.0% | 10.0% | +25.0 [" in rows[1]


def test_seed_bench_combine_refuses_a_folder_without_a_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.seeds", "--combine", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert f"--combine {tmp_path / 'nothing'} has no seeds.json" in done.stderr


def test_seed_plot_draws_every_run(tmp_path: Path) -> None:
    from bench.seeds import TARGET_LINES
    from concise_rl.evaluation.plots import plot_seeds

    rows = [{"run": f"sft {i}, rl 0", **{f"{k}@{t}": v for t in ("0.0", "0.6")
                                          for k, v in (("cut", 50.0 - i), ("change", -0.5 * i),
                                                       ("ci_low", -0.5 * i - 1), ("ci_high", -0.5 * i + 1))}}
            for i in range(3)]
    out = plot_seeds(rows, TARGET_LINES, tmp_path / "seeds.png")
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
