"""bench/trace_errors.py: traces of the built-in task checked step by step, and its command on real files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from bench.trace_errors import STEP, StepError, check_pass, pass_kinds, split_passes
from concise_rl.config import load_config
from concise_rl.synthetic import RECHECK, _parse_question, generate_problems, reasoning_trace
from concise_rl.tasks.stages import evaluation_sets

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Start with 4. Steps: A *5, B +7, C -3, D +4, E stop. Keep only the last digit after each step. " \
    "What is the final digit?"
STEPS = _parse_question(QUESTION)
RIGHT = "Start with 4. A *5: 4*5=20->0. B +7: 0+7=7->7. C -3: 7-3=4->4. D +4: 4+4=8->8. E stop."


def test_every_generated_trace_passes_both_passes() -> None:
    rng = random.Random(0)
    for p in generate_problems(40, seed=3, min_level=2, max_level=8):
        steps = _parse_question(p.prompt)
        for verbosity in range(3):
            first, second = split_passes(reasoning_trace(p.prompt, rng, verbosity))
            assert check_pass(first, steps) is None
            assert (second is None) == (verbosity == 0)
            if verbosity == 2:  # every step re-checked
                assert check_pass(second, steps) is None
            elif verbosity == 1:  # the first few steps re-checked, all of them right
                error = check_pass(second, steps)
                assert error is None or (error.kind == "missing" and error.step > 0)


def test_each_kind_of_slip_is_named_at_its_step() -> None:
    assert check_pass(RIGHT, STEPS) is None
    slips = {
        "C -4: 7-4=3->3.": StepError("copy", 2),   # a neighbour's operand
        "C -3: 7-4=3->3.": StepError("copy", 2),   # right label, other operand in the work
        "C -3: 8-3=5->5.": StepError("carry", 2),
        "C -3: 7-3=5->5.": StepError("calc", 2),
        "C -3: 7-3=4->3.": StepError("digit", 2),
    }
    for slip, expected in slips.items():
        assert check_pass(RIGHT.replace("C -3: 7-3=4->4.", slip), STEPS) == expected, slip
    assert check_pass(RIGHT.replace(" D +4: 4+4=8->8.", ""), STEPS) == StepError("missing", 3)


def test_pass_kinds_reads_both_passes() -> None:
    answer = " So the answer is \\boxed{8}."
    checks = " ".join("Check " + line + "." for line in RIGHT.split(". ")[1:5]).replace("0+7=7", "0+7=8")
    assert pass_kinds(RIGHT + answer, STEPS) == "exact/none"
    assert pass_kinds(RIGHT + answer + " Let me check each step. " + checks + " All steps check out.", STEPS) == "exact/calc"


def _evaluation(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    with open(folder / "responses.jsonl", "w") as f:
        f.writelines(json.dumps({"set": "hard", "temperature": 0.0, "sample": 0, **r}) + "\n" for r in rows)
    return folder


def test_command_counts_and_compares_real_evaluation_files(tmp_path: Path) -> None:
    hard = evaluation_sets(load_config(ROOT / "configs" / "demo.yaml"))["hard"][:3]
    rng = random.Random(1)
    traces = [reasoning_trace(p.prompt, rng, 2) for p in hard]
    # The base carries a wrong value into problem 0's first step; the model drops the re-check and is right.
    first = STEP.search(traces[0])
    slipped = traces[0][: first.start(4)] + str((int(first.group(4)) + 1) % 10) + traces[0][first.end(4):]
    base = _evaluation(tmp_path / "base", [
        {"problem_id": hard[0].id, "response": slipped, "correct": False},
        *({"problem_id": p.id, "response": t, "correct": True} for p, t in zip(hard[1:], traces[1:], strict=True)),
    ])
    model = _evaluation(tmp_path / "model", [
        {"problem_id": p.id, "response": t.split(" Let me check")[0], "correct": True}
        for p, t in zip(hard, traces, strict=True)
    ])
    done = subprocess.run([sys.executable, "-m", "bench.trace_errors", str(model), "--base", str(base)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    base_line, model_line = (json.loads(line) for line in done.stdout.splitlines())
    assert base_line["first_pass"] == {"carry": 1, "exact": 2} and base_line["no_second_pass"] == 0
    assert model_line["first_pass"] == {"exact": 3} and model_line["no_second_pass"] == 3
    assert model_line["gained"] == 1 and model_line["lost"] == 0
    assert model_line["gained_base_errors"] == {"carry/exact": 1}

    wrong_set = subprocess.run([sys.executable, "-m", "bench.trace_errors", str(model), "--set", "nope"],
                               check=False, capture_output=True, text=True, cwd=ROOT)
    assert wrong_set.returncode == 1 and "the config has no evaluation set 'nope'" in wrong_set.stderr


def test_a_slip_in_the_recheck_cannot_change_the_graded_answer(grader) -> None:
    """The re-check is pure length: the graded answer is the first pass's, whatever the re-check writes.

    An earlier trace boxed the answer again after the re-check; the base then copied the
    last re-checked step into it and RL in both phases dropped the re-check to stop that.
    """
    rng = random.Random(2)
    problems = generate_problems(20, seed=5, min_level=3, max_level=8)
    traces = [reasoning_trace(p.prompt, rng, 2) for p in problems]
    slipped = []
    for t in traces:
        first, second = split_passes(t)
        last = list(STEP.finditer(second))[-1]  # the last re-checked step ends on a wrong digit
        wrong = str((int(last.group(8)) + 1) % 10)
        slipped.append(first + RECHECK + second[: last.start(8)] + wrong + second[last.end(8):])
        assert check_pass(split_passes(slipped[-1])[1], _parse_question(problems[len(slipped) - 1].prompt)).kind == "digit"
    answers = [p.answer for p in problems]
    assert all(g.correct for g in grader.grade_many(traces, answers))
    assert all(g.correct for g in grader.grade_many(slipped, answers))
    assert all(t.count("\\boxed{") == 1 for t in traces)
