"""Bad input through the real CLI (issue 7, point 4): one table of cases, each run with `main()`.

Every case must exit 2 with one line that names the input and says what to change,
print no traceback, and leave nothing behind: no registered model version, no
checkpoint, curation, evaluation or store folder. The loaders' own unit tests
(test_problems.py, test_config.py, test_models.py, test_benchmarks.py,
test_curation.py) cover the messages in detail; this file checks that each case
reaches the user as bad input from the command line, before any work is kept.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_models import without_chat_template

from concise_rl.cli import EXIT_BAD_INPUT, main
from concise_rl.problems import save_problems
from concise_rl.synthetic import generate_problems

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# The tiny model's tokenizer spends more tokens on a prompt than the demo's; the cases that
# are not about prompt length must not trip over it.
ROOMY = ["--set", "prompt.max_prompt_tokens=512"]


def _lines(path: Path, *lines: str | dict) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _good_problems(path: Path) -> Path:
    save_problems(generate_problems(4, seed=0, min_level=1, max_level=2), path)
    return path


def _train(tiny: Path | str, problems: Path, *extra: str) -> list[str]:
    return ["train", "--phase", "1", "--config", DEMO, "--model", str(tiny), "--problems", str(problems), *ROOMY,
            *extra]


Case = Callable[[Path, Path], tuple[list[str], list[str]]]  # (tiny model, tmp dir) -> (argv, expected in message)

CASES: dict[str, Case] = {
    "malformed-jsonl-line": lambda tiny, d: (
        _train(tiny, _lines(d / "p.jsonl", {"problem": "1+1", "answer": "2"}, '{"problem": "2+2", "answer":')),
        ["p.jsonl, line 2: malformed JSON", "fix or remove the line"],
    ),
    "missing-answer-field": lambda tiny, d: (
        _train(tiny, _lines(d / "p.jsonl", {"id": "a", "problem": "1+1"})),
        ["p.jsonl, line 1: no answer found", "Pass answer_field="],
    ),
    "empty-problem-set": lambda tiny, d: (
        _train(tiny, _lines(d / "p.jsonl")),
        ["p.jsonl: contains no problems"],
    ),
    "duplicate-problem-ids": lambda tiny, d: (
        _train(tiny, _lines(d / "p.jsonl", {"id": "a", "problem": "1+1", "answer": "2"},
                            {"id": "a", "problem": "2+2", "answer": "4"})),
        ["duplicate id 'a' at line 1 and line 2", "remove or renumber"],
    ),
    "non-utf8-text": lambda tiny, d: (
        _train(tiny, _bytes(d / "p.jsonl", b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff", "answer": "2"}\n')),
        ["p.jsonl, line 2: not valid UTF-8", "re-encode the file as UTF-8"],
    ),
    "unknown-benchmark-option": lambda tiny, d: (
        ["evaluate", "--config", DEMO, "--model", str(tiny), "--benchmarks", "math500,math5000"],
        ["unknown benchmark 'math5000'", "known benchmarks: math500, aime24"],
    ),
    "unknown-benchmark-in-config": lambda tiny, d: (
        ["evaluate", "--config", DEMO, "--model", str(tiny),
         "--set", "evaluation.benchmarks={extra: {kind: benchmark, name: math5000}}"],
        ["evaluation.benchmarks.extra", "one of math500", "got 'math5000'"],
    ),
    "config-unknown-key": lambda tiny, d: (
        ["curate", "--config", str(_lines(d / "c.yaml", "ppo:", "  lamda: 1.0")), "--model", str(tiny)],
        ["c.yaml", "unknown key 'ppo.lamda'", "(did you mean 'ppo.lam'?)"],
    ),
    "config-wrong-type": lambda tiny, d: (
        ["curate", "--config", DEMO, "--model", str(tiny), "--set", "ppo.steps=many"],
        ["'ppo.steps'", "valid integer", "'many'"],
    ),
    "missing-model-path-option": lambda tiny, d: (
        _train(d / "no-such-model", _good_problems(d / "p.jsonl")),
        ["--model", "no-such-model: not a models:/ URI, not an s3:// checkpoint folder and not a model directory", "pass a local model folder"],
    ),
    "registry-uri-without-version": lambda tiny, d: (
        _train("models:/concise-rl-demo/", _good_problems(d / "p.jsonl")),
        ["--model models:/concise-rl-demo/: not a registry URI", "models:/NAME/VERSION (a number)"],
    ),
    "registry-version-that-does-not-exist": lambda tiny, d: (
        _train("models:/concise-rl-demo/7", _good_problems(d / "p.jsonl")),
        ["--model models:/concise-rl-demo/7: no registered model 'concise-rl-demo'", "`concise-rl models` lists"],
    ),
    "missing-model-path-in-config": lambda tiny, d: (
        ["curate", "--config", DEMO, "--set", f"model.name_or_path={d / 'no-such-model'}"],
        ["no-such-model does not exist", "set model.name_or_path"],
    ),
    "tokenizer-without-chat-template": lambda tiny, d: (
        _train(without_chat_template(tiny, d / "plain"), _good_problems(d / "p.jsonl")),
        ["plain has no chat template", "prompt.use_chat_template=false"],
    ),
    "max-length-too-small-for-the-prompt": lambda tiny, d: (
        _train(tiny, _good_problems(d / "p.jsonl"), "--set", "prompt.max_prompt_tokens=8"),
        ["over prompt.max_prompt_tokens=8", "4 of 4 prompts", "Raise prompt.max_prompt_tokens to at least"],
    ),
    "response-budget-past-the-model-context": lambda tiny, d: (
        _train(tiny, _good_problems(d / "p.jsonl"), "--set", "ppo.max_new_tokens=4096"),
        ["training problems: its longest prompt", "plus ppo.max_new_tokens=4096 needs",
         "over the model's 4096 (max_position_embeddings)", "lower ppo.max_new_tokens to at most"],
    ),
    "curation-budget-past-the-model-context": lambda tiny, d: (
        ["curate", "--config", DEMO, "--model", str(tiny), *ROOMY, "--set", "curation.max_new_tokens=5000"],
        ["curation candidates: its longest prompt", "plus curation.max_new_tokens=5000 needs"],
    ),
    # The random tiny model's pass rates with one sample are 0 or 1, so no candidate falls
    # in [0.4, 0.6]: curation stops before it writes a set, and nothing trains.
    "phase2-band-selects-nothing": lambda tiny, d: (
        ["curate", "--config", DEMO, "--model", str(tiny), *ROOMY,
         "--set", "curation.candidates.num_problems=3", "--set", "curation.samples_per_problem=1",
         "--set", "curation.max_new_tokens=4", "--set", "curation.phase2_band={low: 0.4, high: 0.6}"],
        ["curation.phase2_band [0.4, 0.6]", "(measured on 3 problems", "widen the band"],
    ),
}


def registered_versions(home: Path) -> int:
    db = home / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT count(*) FROM model_versions").fetchone()[0]
        except sqlite3.OperationalError:  # the registry tables were never created
            return 0


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message_and_keeps_nothing(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("CONCISE_RL_HOME", str(home))
    argv, expected = CASES[case](tiny_model_dir, tmp_path)

    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # MLflow may note that it created its tables; the CLI's own message is one line.
    ours = [line for line in err.splitlines() if line.startswith(f"concise-rl {argv[0]}: ")]
    assert len(ours) == 1 and "Traceback" not in err, err
    for piece in expected:
        assert piece in ours[0], f"{piece!r} not in {ours[0]!r}"
    # Nothing half-written: no model version, and of the home only the tracking store and the lock.
    assert registered_versions(home) == 0
    kept = sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()) if home.exists() else []
    assert all(f == "mlflow.db" or f.startswith("locks/") for f in kept), kept


@pytest.mark.slow
def test_run_stops_at_an_empty_phase2_band_before_either_phase_trains(tiny_model_dir, tmp_path):
    """The whole flow (Prefect, the real CLI in a subprocess): the base is registered first, then curation
    finds no phase-2 problem and the run stops with exit 2; no phase is trained or registered."""
    home = tmp_path / "home"
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", DEMO, "--set",
            f"model.name_or_path={tiny_model_dir}", *ROOMY]
    for item in ("curation.candidates.num_problems=3", "curation.samples_per_problem=1", "curation.max_new_tokens=4",
                 "curation.phase2_band={low: 0.4, high: 0.6}", "grader.workers=1"):
        args += ["--set", item]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("concise-rl run: ")]
    assert len(ours) == 1 and "curation.phase2_band [0.4, 0.6]" in ours[0] and "widen the band" in ours[0]
    with sqlite3.connect(home / "mlflow.db") as con:
        phases = con.execute("SELECT value FROM model_version_tags WHERE key = 'phase'").fetchall()
    assert registered_versions(home) == 1 and phases == [("base",)]
    assert not (home / "checkpoints").exists() and not (home / "curation" / "latest").exists()
