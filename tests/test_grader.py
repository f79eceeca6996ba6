"""The shared grader (concise_rl/grader.py): agreement, pathological answers, faults, `concise-rl grade`."""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import pytest

from concise_rl.cli import EXIT_BAD_INPUT, main
from concise_rl.config import GraderConfig, RewardConfig
from concise_rl.evaluation.grade_file import GradeInputError, grade_file
from concise_rl.grader import MAX_ANSWER_CHARS, Grader
from concise_rl.training.reward import score_responses

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GRADER_DEV = SHARED / "grader" / "math_cot_50_dev.jsonl"
needs_dev = pytest.mark.skipif(not GRADER_DEV.is_file(), reason=f"shared grader data not found at {GRADER_DEV}")

# The timeout tests' limit; verdicts come from conftest's `grader`, whose limit is 60 s so that a
# sympy comparison that takes over 2 s on a busy 2-core machine is not graded wrong.
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def timed_grader():
    with Grader(workers=2, timeout_s=TIMEOUT_S) as g:
        yield g


@needs_dev
def test_agreement_with_the_reference_grader_on_400_real_responses(grader, tmp_path):
    report = grade_file(
        GRADER_DEV,
        tmp_path / "graded.jsonl",
        response_field="code",
        answer_field="gt",
        label_field="score",
        grader=grader,
        progress=False,
    )
    assert report.labelled == 400
    # The issue asks for >= 98%; we measured 400/400 (BENCHMARKS.md lists the review).
    assert report.agreement >= 0.98
    assert report.disagreements == []


@needs_dev
def test_against_the_raw_answer_field_the_only_disagreements_are_the_4_30_pm_row(grader, tmp_path):
    # Row idx 3 ("at what time will they arrive?") has gt "4:30p.." (mangled by the
    # reference harness' normalisation) and answer "\text{4:30 p.m.}". All 8 responses
    # box "4:30 \text{ p.m.}", which is right; the reference grader says wrong.
    report = grade_file(
        GRADER_DEV,
        tmp_path / "graded.jsonl",
        response_field="code",
        answer_field="answer",
        label_field="score",
        grader=grader,
        progress=False,
    )
    assert {(d["location"], d["ours"], d["label"]) for d in report.disagreements} == {("line 4", True, False)}
    assert len(report.disagreements) == 8


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("\\boxed{10^{10^{10^{10}}}}", "grading took longer than"),
        ("\\boxed{2^{99999999999}}", "grading took longer than"),
        ("\\boxed{" + "{" * 200 + "1" + "}" * 200 + "}", "nests braces deeper than"),
        ("\\boxed{" + "7" * 100_000 + "}", f"longer than {MAX_ANSWER_CHARS} characters"),
        ("The answer is \\boxed{\\frac{1}{2", "never closed"),
        ("I give up.", "no \\boxed{} answer"),
    ],
)
def test_pathological_answers_finish_within_the_timeout_and_are_wrong(timed_grader, response, reason):
    start = time.monotonic()
    g = timed_grader.grade(response, "5")
    assert time.monotonic() - start < TIMEOUT_S + 1.5
    assert not g.correct and reason in g.reason


def test_equivalent_forms_go_through_math_verify(grader):
    cases = [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{3}", "4", False),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", True),
        ("\\boxed{4:30 \\text{ p.m.}}", "\\text{4:30 p.m.}", True),
    ]
    grades = grader.grade_many([c[0] for c in cases], [c[1] for c in cases])
    assert [g.correct for g in grades] == [c[2] for c in cases], grades


@pytest.mark.parametrize(
    ("response", "reference", "correct"),
    [
        ("\\boxed{32348}", "\\$32,\\!348", True),  # MATH's thousands separator and currency
        ("\\boxed{32,348}", "32348", True),
        ("\\boxed{32,349}", "32348", False),
        ("\\boxed{1,2}", "12", False),  # a pair, not a thousands separator
        ("\\boxed{36}", "\\$36", True),
        ("\\boxed{\\$ 4.50}", "4.5", True),
        ("\\boxed{\\left[ 1, 2 \\right)}", "[1,2)", True),
    ],
)
def test_layout_and_separators_do_not_change_the_verdict(grader, response, reference, correct):
    assert grader.grade(response, reference).correct is correct


def test_timeouts_hold_when_grading_from_a_worker_thread(timed_grader):
    # math-verify's own (SIGALRM) timeouts do nothing off the main thread; the pool's do.
    out = {}

    def work():
        start = time.monotonic()
        out["grade"] = timed_grader.grade("\\boxed{10^{10^{10^{10}}}}", "5")
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "took longer" in out["grade"].reason and out["seconds"] < TIMEOUT_S + 1.5


def test_model_output_is_never_executed(grader, tmp_path):
    target = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {target}')}}",
        f"\\boxed{{(lambda: __import__('os').system('touch {target}'))()}}",
        f"\\boxed{{eval(\"open('{target}', 'w')\")}}",
    ]
    grades = grader.grade_many(payloads, ["5"] * len(payloads))
    _, rewards = score_responses(payloads, ["5"] * len(payloads), RewardConfig(), grader)
    assert [g.correct for g in grades] == [False] * 3 and rewards == [-0.5] * 3
    assert not target.exists()


def test_a_worker_that_dies_has_its_answer_regraded(tmp_path, monkeypatch):
    import grader_faults

    monkeypatch.setenv("GRADER_FAULT_DIR", str(tmp_path))

    class Flaky(Grader):
        check = staticmethod(grader_faults.crash_once)

    with Flaky(workers=2, timeout_s=10) as g:
        grades = g.grade_many(["\\boxed{\\frac{2}{4}}", "\\boxed{0.25}"], ["\\frac12", "\\frac{1}{3}"])
    assert [(x.correct, x.reason) for x in grades] == [(True, "equivalent"), (False, "not equivalent")]
    assert len(list(tmp_path.glob("seen-*"))) == 2  # each answer killed one worker first


def fraction_batch(n: int) -> tuple[list[str], list[str], list[bool]]:
    """``n`` answers that only math-verify can decide (k/2k is a half, k/3k is not), alternating wrong and right
    (from k = 2: 1/2 itself would be decided as an exact match, without the pool)."""
    responses, references, truth = [], [], []
    for k in range(2, n + 2):
        right = k % 2 == 1
        responses.append(f"so \\boxed{{\\frac{{{k}}}{{{2 * k if right else 3 * k}}}}}")
        references.append("\\frac12")
        truth.append(right)
    return responses, references, truth


def test_a_worker_crash_in_the_middle_of_a_batch_loses_nothing(tmp_path, monkeypatch):
    import grader_faults

    responses, references, truth = fraction_batch(24)
    monkeypatch.setenv("GRADER_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("GRADER_CRASH_ON", "\\frac{13}{26}")  # the 13th answer kills its worker

    class Flaky(Grader):
        check = staticmethod(grader_faults.crash_on_answer)

    with Flaky(workers=2, timeout_s=10) as g:
        grades = g.grade_many(responses, references)
    assert (tmp_path / "crashed").exists(), "a worker died mid-batch"
    assert len(grades) == len(responses)
    # Every answer graded by math-verify, in order: the crashed one regraded, none lost or timed out.
    assert [g.correct for g in grades] == truth
    assert [g.reason for g in grades] == ["equivalent" if t else "not equivalent" for t in truth]
    assert [g.extracted for g in grades] == [r[len("so \\boxed{"):-1] for r in responses]


def test_grade_cli_survives_a_worker_crash_and_writes_every_row(tmp_path, monkeypatch, capsys):
    import grader_faults

    responses, references, truth = fraction_batch(20)
    src = _write(tmp_path / "in.jsonl", [{"id": i, "response": r, "answer": a}
                                         for i, (r, a) in enumerate(zip(responses, references, strict=True))])
    monkeypatch.setenv("GRADER_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("GRADER_CRASH_ON", "\\frac{9}{18}")
    monkeypatch.setattr(Grader, "check", staticmethod(grader_faults.crash_on_answer))  # what the CLI's pool runs
    out = tmp_path / "graded.jsonl"
    assert main(["grade", str(src), "-o", str(out), "--workers", "2"]) == 0
    assert (tmp_path / "crashed").exists(), "a worker died mid-file"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(20))
    assert [r["correct"] for r in rows] == truth
    assert all(r["reason"] in ("equivalent", "not equivalent") for r in rows)
    assert "graded 20 responses in 20 rows: 10 correct" in capsys.readouterr().out


def test_an_answer_that_always_kills_its_worker_is_wrong_with_the_reason():
    import grader_faults

    class Broken(Grader):
        check = staticmethod(grader_faults.crash_always)

    with Broken(workers=1, timeout_s=10) as g:
        grades = g.grade_many(["\\boxed{\\frac{2}{4}}", "\\boxed{7}"], ["\\frac12", "7"])
    assert not grades[0].correct and "worker died" in grades[0].reason
    assert grades[1].correct  # decided without the pool


def test_in_process_grading_needs_no_pool():
    with Grader(workers=0) as g:
        assert g.grade("\\boxed{\\frac{2}{4}}", "0.5").correct
        assert g._pool is None


def test_a_grader_dropped_without_close_stops_its_workers():
    g = Grader(workers=1, timeout_s=60.0)
    assert g.grade("\\boxed{\\frac{2}{4}}", "0.5").correct  # math-verify: in the pool
    pool = g._pool
    assert pool.active
    del g
    gc.collect()
    assert not pool.active


def test_a_grader_from_the_config_section_has_its_workers_and_limit():
    with Grader.from_config(GraderConfig(workers=1, timeout_s=60.0)) as g:
        assert (g.workers, g.timeout_s) == (1, 60.0)
        assert g.grade("so \\boxed{\\frac{6}{8}}", "\\frac34").correct
    assert g._pool is None  # closed with the block


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_grade_cli_adds_the_three_fields(tmp_path, capsys):
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "response": "so \\boxed{\\frac12}", "answer": "0.5"},
            {"id": 2, "response": "no idea", "answer": "3"},
            {"id": 3, "response": ["\\boxed{3}", "\\boxed{4}"], "answer": "3"},
        ],
    )
    out = tmp_path / "out" / "graded.jsonl"
    assert main(["grade", str(src), "-o", str(out), "--workers", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["correct"], r["extracted"]) for r in rows[:2]] == [(True, "\\frac12"), (False, None)]
    assert rows[1]["reason"] == "no \\boxed{} answer" and rows[0]["id"] == 1
    assert rows[2]["correct"] == [True, False] and rows[2]["extracted"] == ["3", "4"]
    assert "graded 4 responses in 3 rows: 2 correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        (['{"response": "\\\\boxed{1}", "answer": "1"}', '{"response": '], [], "line 2: malformed JSON"),
        ([{"text": "\\boxed{1}", "answer": "1"}], [], "line 1: no field 'response'"),
        ([{"response": "\\boxed{1}"}], [], "no field 'answer'"),
        ([{"response": "\\boxed{1}", "answer": ""}], [], "must be a non-empty string"),
        ([{"response": 5, "answer": "1"}], [], "must be a string or a list of strings"),
        ([{"response": "\\boxed{1}", "answer": "1", "ok": "yes"}], ["--label-field", "ok"], "must hold 1 bool"),
        ([], [], "no rows to grade"),
    ],
)
def test_grade_cli_bad_input_names_the_input_and_writes_nothing(tmp_path, capsys, rows, args, message):
    src = _write(tmp_path / "in.jsonl", rows) if rows else tmp_path / "in.jsonl"
    if not rows:
        src.write_text("")
    out = tmp_path / "graded.jsonl"
    assert main(["grade", str(src), "-o", str(out), "--workers", "1", *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and str(src) in err
    assert not out.exists() and not list(tmp_path.glob(".graded.jsonl.*"))


def test_grade_refuses_to_overwrite_its_input(tmp_path, grader):
    src = _write(tmp_path / "in.jsonl", [{"response": "\\boxed{1}", "answer": "1"}])
    with pytest.raises(GradeInputError, match="overwrite the input"):
        grade_file(src, src, grader=grader, progress=False)


def test_non_utf8_input_reports_the_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"response": "\\\\boxed{1}", "answer": "1"}\n{"response": "\xff", "answer": "1"}\n')
    assert main(["grade", str(src), "-o", str(tmp_path / "o.jsonl"), "--workers", "1"]) == EXIT_BAD_INPUT
    assert "line 2: not valid UTF-8" in capsys.readouterr().err
