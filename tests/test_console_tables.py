"""The console's tables (issue 22, point 4): one table per set that fits 80 columns, every column filled,
percent and points throughout, through the real CLI and on a pipeline-shaped summary."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from concise_rl import console
from concise_rl.cli import EXIT_GATE_FAILED, main
from concise_rl.config import GateConfig
from concise_rl.evaluation.gate import evaluate_gate
from concise_rl.evaluation.metrics import summarise
from concise_rl.evaluation.tables import lineage
from concise_rl.training import prebuilt

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
BASE = prebuilt.PREBUILT / next(iter(prebuilt.manifest()))
ROW = re.compile(r"^(base|phase1|phase2|A|B|tiny)( v\d+)?\s+(0\.0|0\.6)\s+")  # a model's row in a set's table


def _fits(out: str) -> None:
    """Every line within 80 characters, but the ones naming a file (left whole, to be copied)."""
    long = [line for line in out.splitlines() if len(line) > 80 and not line.startswith(("summary written", "responses"))]
    assert not long, long


def _rows(out: str) -> list[list[str]]:
    """Each model row's cells: the columns are separated by two or more spaces (a cell holds at most one)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if ROW.match(line)]


def _eval(rng, accuracy: float, length: float) -> dict:
    figures = {}
    for bench, n in (("heldout", 500), ("hard", 300)):
        figures[bench] = {}
        for t in ("0.0", "0.6"):
            correct = rng.random((n, 1)) < accuracy
            lengths = rng.normal(length, 20, (n, 1)).clip(5)
            figures[bench][t] = summarise(correct, lengths, rng.random((n, 1)) < 0.05, n_boot=200, seed=0,
                                          problem_ids=[f"{bench}-{i}" for i in range(n)])
    return figures


def test_the_pipeline_summary_is_one_table_per_set_within_80_columns_with_every_figure(capsys, mlflow_home):
    rng = np.random.default_rng(0)
    # phase 1 answers everything: 100.0 [100.0, 100.0], the widest accuracy cell, must not fold the table.
    models = {"base": {"version": "1", "eval": _eval(rng, 0.97, 170)},
              "phase1": {"version": "2", "eval": _eval(rng, 1.0, 172)},
              "phase2": {"version": "3", "eval": _eval(rng, 0.975, 86)}}
    gate = GateConfig(max_accuracy_drop=0.03, sets=["heldout"], bootstrap_samples=200)
    verdict = evaluate_gate(models["phase2"]["eval"], models["phase1"]["eval"], gate)
    console.print_summary({"promoted": True, "registered_model": "concise-rl-demo", "champion_version": "3",
                           "models": models, "length_reduction_pct": {}, "gate": verdict}, gate)
    out = capsys.readouterr().out
    _fits(out)
    assert "heldout: 500 problems" in out and "hard: 300 problems" in out
    rows = _rows(out)
    assert len(rows) == 2 * 3 * 2, out  # sets x models x temperatures, each on one line
    assert [cells[0] for cells in rows[:6]] == ["base v1"] * 2 + ["phase1 v2"] * 2 + ["phase2 v3"] * 2, out
    assert "100.0 [100.0, 100.0]" in out
    for cells in rows:
        model = cells[0]
        # model, T, accuracy [CI], (change [CI], ) length, (cut, ) truncation
        assert len(cells) == (5 if model.startswith("base") else 7), cells
        assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", cells[2]), cells
        assert cells[-1].endswith("%"), cells
        if not model.startswith("base"):
            assert re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", cells[3]), cells
            assert cells[5].endswith("%"), cells
    assert "change and cut: phase1 vs base, phase2 vs phase1" in " ".join(out.split())
    # The gate in points and percent, one line per criterion.
    assert re.search(r"heldout\s+0\.0\s+acc change, CI low\s+[+-]\d+\.\d pts\s+-3\.0 pts\s+(yes|NO)", out), out
    assert re.search(r"heldout\s+0\.6\s+length cut\s+\d+\.\d%\s+20\.0%\s+yes", out), out


def test_the_pipeline_labels_compare_along_the_lineage():
    assert lineage(["base", "phase2", "phase1"]) == {"base": None, "phase1": "base", "phase2": "phase1"}
    assert lineage(["base", "phase2"]) == {"base": None, "phase2": "base"}
    assert lineage(["A", "B"]) == {"A": None, "B": "A"}
    assert lineage(["old", "new", "newer"]) == {"old": None, "new": "old", "newer": "old"}


def test_compare_and_evaluate_fill_every_column_within_80_columns(tiny_model_dir, capsys, mlflow_home):
    """Through the real CLI: the shipped demo base (A) against a random tiny model (B), 20 held-out and 20 hard
    problems. B fails the gate, so `compare` exits 3 after printing everything; `evaluate` then finds both
    evaluations cached in the home and only prints them."""
    settings = ["--config", DEMO, "--limit", "20", "--set", "prompt.max_prompt_tokens=512",
                "--set", "evaluation.max_new_tokens=64"]
    for command, models, expected in (("compare", [str(BASE), str(tiny_model_dir)], EXIT_GATE_FAILED),
                                      ("evaluate", ["--model", f"base={BASE}", "--model", f"tiny={tiny_model_dir}"], 0)):
        code = main([command, *models, *settings])
        out = capsys.readouterr().out
        assert code == expected, (command, out)
        _fits(out)
        assert "heldout: 20 problems" in out and "hard: 20 problems" in out
        rows = _rows(out)
        assert len(rows) == 2 * 2 * 2, out
        second = [cells for cells in rows if cells[0] in ("B", "tiny")]
        assert len(second) == 4 and all(len(cells) == 7 for cells in second), rows  # change and cut filled
        if command == "compare":
            assert "gate for B against A: FAILED" in out
            assert re.search(r"heldout\s+0\.0\s+acc change, CI low\s+-\d+\.\d pts\s+-3\.0 pts\s+NO", out), out
            assert not re.findall(r"-0\.\d{3,}", out), out  # no fractions such as -0.006
        else:
            assert "change and cut: tiny vs base" in " ".join(out.split()) and "report:" in out
