"""`concise-rl evaluate` on named benchmarks and `concise-rl compare` (issue 4 items 1, 5-8)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_cli import DEMO, run_cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared benchmarks not found at {SHARED}")
# The tiny random model writes 8 tokens; its prompts are long in its small vocabulary.
SMALL = ["--set", "prompt.max_prompt_tokens=8192", "--set", "evaluation.max_new_tokens=8"]


def _one(home: Path, pattern: str) -> Path:
    found = sorted(home.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@needs_data
def test_evaluate_named_benchmarks_writes_graded_responses_summary_and_report(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    code, out, err = run_cli(
        [
            "evaluate",
            "--config",
            str(DEMO),
            "--model",
            f"tiny={tiny_model_dir}",
            "--benchmarks",
            "math500,aime24,amc23,mmlu_stem",
            "--data-dir",
            str(SHARED),
            "--limit",
            "2",
            "--temperatures",
            "0,0.6",
            "--samples",
            "2",
            *SMALL,
        ],
        home,
    )
    assert code == 0, err
    assert "report:" in out
    folder = _one(home, "evaluations/local-*")
    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary) == ["math500", "aime24", "amc23", "mmlu_stem"]
    for by_t in summary.values():
        assert set(by_t) == {"0.0", "0.6"}
        m = by_t["0.6"]
        assert (m["n"], m["samples"], len(m["per_problem"])) == (2, 2, 2)
        for key in (
            "accuracy_ci",
            "median_length",
            "mean_length_correct",
            "median_length_incorrect",
            "truncation_rate",
            "problem_ids_hash",
        ):
            assert key in m
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * (2 + 2 * 2)
    assert {"correct", "extracted", "reason", "response", "length"} <= set(rows[0])
    mmlu = [r for r in rows if r["set"] == "mmlu_stem"]
    assert {r["answer"] for r in mmlu} <= set("ABCD")
    report = _one(home, "evaluations/reports/*")
    text = (report / "report.md").read_text()
    assert "## aime24: 2 problems, 2 samples at T > 0" in text and "## Macro average over sets" in text
    assert "| tiny | aime24 | 0.0 | 2 x 1 |" in text and "| tiny | aime24 | 0.6 | 2 x 2 |" in text
    for png in ("accuracy_vs_length.png", "length_histograms.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_unknown_benchmark_is_bad_input_naming_the_known_ones(tiny_model_dir, tmp_path):
    code, _, err = run_cli(
        ["evaluate", "--model", str(tiny_model_dir), "--benchmarks", "math500,math5000"], tmp_path / "home"
    )
    assert code == 2
    assert "unknown benchmark 'math5000'" in err and "aime24" in err


def test_compare_prints_the_gate_verdict_and_exits_3_on_failure(tiny_model_dir, tmp_path):
    # Two copies of one model: the same answers, so accuracy is non-inferior (difference
    # 0, CI [0, 0]) and the length is not 20% shorter: the gate fails on length alone.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    args = [
        "compare",
        str(tiny_model_dir),
        str(copy),
        "--config",
        str(DEMO),
        "--limit",
        "6",
        "--temperatures",
        "0",
        *SMALL,
    ]
    code, out, err = run_cli(args, tmp_path / "home")
    assert code == 3, err
    assert "FAILED" in out
    # In points and percent, as every table shows them; B's row carries its paired change and cut against A.
    assert re.search(r"^B\s+0\.0\s+\d+\.\d \[.*\]\s+\+0\.0 \[\+0\.0, \+0\.0\]\s+\d+\s+0\.0%", out, re.M), out
    assert re.search(r"heldout\s+0\.0\s+acc change, CI low\s+\+0\.0 pts\s+-3\.0 pts\s+yes", out), out
    assert re.search(r"heldout\s+0\.0\s+length cut\s+0\.0%\s+20\.0%\s+NO", out), out
    # Two local folders are two models: each has its own cached evaluation.
    assert len(list((tmp_path / "home").glob("evaluations/local-*"))) == 2
    code, out, err = run_cli([*args, "--set", "gate.min_length_reduction_pct=0"], tmp_path / "home")
    assert code == 0, err
    assert "PASSED" in out
