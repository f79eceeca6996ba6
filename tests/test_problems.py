"""Loaders of concise_rl.problems, checked against the real shared benchmark files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from concise_rl.answers import extract_boxed
from concise_rl.problems import (
    Problem,
    ProblemLoadError,
    load_hf_dataset,
    load_problems,
    problems_hash,
    save_problems,
)

# tests/ -> repository root -> /work -> /work/shared/data (read-only, never copied here).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = SHARED_DATA / "benchmarks"
PAPER = SHARED_DATA / "paper"

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"shared reference data not found at {SHARED_DATA}",
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- the shared benchmark and training files ---------------------------------------


@requires_shared_data
@pytest.mark.parametrize(
    ("relative_path", "rows"),
    [
        ("benchmarks/math500.jsonl", 500),
        ("benchmarks/aime24.jsonl", 30),
        ("benchmarks/amc23.jsonl", 40),
        ("benchmarks/mmlu_stem.jsonl", 3018),
        ("benchmarks/gsm8k.jsonl", 1319),
        ("benchmarks/minerva_math.jsonl", 272),
        ("benchmarks/olympiadbench.jsonl", 675),
        ("grader/math_cot_50_dev.jsonl", 50),
    ],
)
def test_every_row_of_the_shared_files_loads(relative_path: str, rows: int) -> None:
    problems = load_problems(SHARED_DATA / relative_path)
    assert len(problems) == rows
    assert len({problem.id for problem in problems}) == rows
    assert all(problem.prompt.strip() and problem.answer.strip() for problem in problems)
    assert {problem.source for problem in problems} == {Path(relative_path).stem}


@requires_shared_data
def test_math500_keeps_latex_answer_unique_id_and_subject() -> None:
    first = load_problems(BENCHMARKS / "math500.jsonl")[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.prompt.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert first.source == "math500"
    assert first.metadata["subject"] == "Precalculus"
    assert first.metadata["level"] == 2
    assert "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}" in first.metadata["solution"]


@requires_shared_data
def test_aime24_answers_stay_strings_with_leading_zeros() -> None:
    problems = load_problems(BENCHMARKS / "aime24.jsonl")
    assert (problems[0].id, problems[0].answer) == ("60", "204")
    assert problems[7].answer == "025"


@requires_shared_data
def test_amc23_float_answers_render_as_integers() -> None:
    problems = load_problems(BENCHMARKS / "amc23.jsonl")
    assert (problems[0].id, problems[0].answer) == ("0", "27")
    assert [problem.answer for problem in problems[1:4]] == ["36", "45", "3159"]
    assert not any(problem.answer.endswith(".0") for problem in problems)


@requires_shared_data
def test_gsm8k_answer_is_the_number_after_the_marker_without_commas() -> None:
    problems = load_problems(BENCHMARKS / "gsm8k.jsonl")
    assert (problems[0].id, problems[0].answer) == ("0", "18")
    assert problems[0].prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert problems[146].answer == "2125"
    assert problems[201].answer == "114200"


@requires_shared_data
def test_mmlu_stem_prompt_lists_lettered_choices_and_answer_is_a_letter() -> None:
    problems = load_problems(BENCHMARKS / "mmlu_stem.jsonl")
    first = problems[0]
    assert first.answer == "C"
    assert first.id == "mmlu_stem-0"
    lines = first.prompt.split("\n")
    assert lines[0].startswith("Based on the characteristic population curves")
    assert lines[1] == (
        "A. maintain the population at a point corresponding to the midpoint of its logistic curve"
    )
    assert [line[:3] for line in lines[1:]] == ["A. ", "B. ", "C. ", "D. "]
    assert lines[3] == "C. reduce the carrying capacity cif the environment to lower the K value"
    assert first.metadata["type"] == "college_biology"
    assert len(first.metadata["choices"]) == 4
    assert {problem.answer for problem in problems} == {"A", "B", "C", "D"}


@requires_shared_data
def test_minerva_answer_is_the_last_boxed_content_with_nested_braces() -> None:
    problems = load_problems(BENCHMARKS / "minerva_math.jsonl")
    assert [problem.answer for problem in problems[:3]] == ["1.6", "4.5e33", "41.8"]
    assert problems[12].answer == (
        "\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[e^{h c /(\\lambda k T)}-1\\right] d^{2}}"
    )
    assert "\\boxed{1.6}" in problems[0].metadata["solution"]
    assert problems[0].metadata["type"] == "Introduction to Astronomy (8.282J Spring 2006)"


@requires_shared_data
def test_olympiadbench_answers_drop_dollar_signs_and_keep_unit_and_type() -> None:
    problems = load_problems(BENCHMARKS / "olympiadbench.jsonl")
    assert (problems[0].id, problems[0].answer) == ("1606", "2")
    assert problems[1].answer == "\\frac{1}{2 n+2}"
    assert problems[5].answer == "(1,8,19), (2,7,13), (4,5,7)"
    assert problems[5].metadata["answer_type"] == "Tuple"
    assert (problems[137].answer, problems[137].metadata["unit"]) == ("45", "minute")
    assert problems[0].metadata["unit"] is None


@requires_shared_data
def test_grader_file_uses_the_normalised_gt_and_keeps_the_raw_answer() -> None:
    problems = load_problems(SHARED_DATA / "grader" / "math_cot_50_dev.jsonl")
    assert (problems[0].answer, problems[0].id) == ("420", "0")
    assert problems[1].answer == "\\frac{1}{9}"
    assert problems[1].metadata["answer"] == "\\dfrac{1}{9}"
    assert len(problems[0].metadata["score"]) == 8


@requires_shared_data
def test_paper_file_keeps_plain_question_and_formatted_prompt() -> None:
    problems = load_problems(PAPER / "math_level5_data_processed_with_r1_prompt.json")
    assert len(problems) == 8
    first = problems[0]
    assert first.prompt.startswith("Find the sum of the coefficients in the polynomial")
    assert first.prompt.endswith("when it is fully simplified.")
    assert first.answer == "5"
    assert first.id == "math_level5_data_processed_with_r1_prompt-0"
    assert first.metadata["subject"] == "Algebra"
    for problem in problems:
        formatted = problem.metadata["formatted_prompt"]
        assert formatted.startswith(problem.prompt)
        assert "output the final answer within \\boxed{}" in formatted
    assert sorted(problem.metadata["level"] for problem in problems) == [4] + [5] * 7


@requires_shared_data
def test_paper_qwen_file_carries_the_chat_formatted_prompt() -> None:
    first = load_problems(PAPER / "math_level5_data_processed_with_qwen_prompt.json")[0]
    assert first.metadata["formatted_prompt"].startswith("<|im_start|>system\n")
    assert "<|im_start|>" not in first.prompt


@requires_shared_data
def test_hf_json_builder_gives_the_same_problems_as_the_file_loader(tmp_path: Path) -> None:
    path = BENCHMARKS / "math500.jsonl"
    from_hub_loader = load_hf_dataset(
        "json", data_files=str(path), split="train", source="math500", cache_dir=str(tmp_path)
    )
    assert from_hub_loader == load_problems(path)


@requires_shared_data
def test_limit_keeps_the_first_problems() -> None:
    path = BENCHMARKS / "gsm8k.jsonl"
    assert load_problems(path, limit=5) == load_problems(path)[:5]


@requires_shared_data
def test_round_trip_through_save_problems(tmp_path: Path) -> None:
    problems = (
        load_problems(BENCHMARKS / "mmlu_stem.jsonl", limit=3)
        + load_problems(BENCHMARKS / "gsm8k.jsonl", limit=3)
        + load_problems(BENCHMARKS / "olympiadbench.jsonl", limit=3)
        + load_problems(PAPER / "math_level5_data_processed_with_r1_prompt.json")
    )
    saved = tmp_path / "run" / "problems.jsonl"
    save_problems(problems, saved)
    assert load_problems(saved) == problems
    assert problems_hash(load_problems(saved)) == problems_hash(problems)


# --- format detection and overrides on small files ---------------------------------


def test_generic_fields_and_fallback_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "1+1?", "answer": 2, "note": "x"}])
    assert load_problems(path) == [
        Problem(id="mine-0", prompt="1+1?", answer="2", source="mine", metadata={"note": "x"})
    ]
    assert load_problems(path, source="custom")[0].id == "custom-0"


def test_explicit_prompt_and_answer_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "a": "Paris"}])
    [problem] = load_problems(path, prompt_field="q", answer_field="a")
    assert (problem.prompt, problem.answer) == ("Capital of France?", "Paris")
    assert problem.metadata == {}


def test_explicit_field_that_is_absent_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "a": "Paris"}])
    with pytest.raises(
        ProblemLoadError, match=r"qa\.jsonl, line 1: prompt_field='question'.*present: a, q"
    ):
        load_problems(path, prompt_field="question", answer_field="a")


@pytest.mark.parametrize("key", ["data", "problems", "examples"])
def test_json_object_with_a_list_of_rows(tmp_path: Path, key: str) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({key: [{"question": "Q?", "target": "7"}]}), encoding="utf-8")
    assert [(p.prompt, p.answer) for p in load_problems(path)] == [("Q?", "7")]


def test_json_of_another_shape_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(ProblemLoadError, match=r"odd\.json: expected a JSON list"):
        load_problems(path)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(
        '\n{"problem": "P", "answer": "1", "id": 1}\n\n{"problem": "P"}\n', encoding="utf-8"
    )
    with pytest.raises(ProblemLoadError, match=r"gaps\.jsonl, line 4: no answer"):
        load_problems(path)


def test_limit_stops_before_a_bad_row_further_down(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text('{"problem": "P", "answer": "1"}\nnot json\n', encoding="utf-8")
    assert len(load_problems(path, limit=1)) == 1


def test_limit_must_be_positive(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"problem": "P", "answer": "1"}])
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_problems(path, limit=0)


def test_multiple_choice_index_outside_the_choices_is_reported(tmp_path: Path) -> None:
    row = {"question": "Q", "choices": ["x", "y"], "answer": 2}
    path = write_jsonl(tmp_path / "mc.jsonl", [row])
    with pytest.raises(ProblemLoadError, match=r"mc\.jsonl, line 1: answer index 2 is outside"):
        load_problems(path)


def test_solution_without_boxed_answer_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sol.jsonl", [{"problem": "P", "solution": "It is 4."}])
    with pytest.raises(ProblemLoadError, match=r"sol\.jsonl, line 1: no answer.*answer_field="):
        load_problems(path)


# --- errors ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProblemLoadError, match=r"nowhere\.jsonl: no such file.*check the path"):
        load_problems(tmp_path / "nowhere.jsonl")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("problem,answer\n", encoding="utf-8")
    with pytest.raises(ProblemLoadError, match=r"table\.csv: unsupported file type '\.csv'"):
        load_problems(path)


def test_malformed_json_line_reports_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"problem": "A", "answer": "1"}\n{"problem": "B", "answer": "2"}\n{"problem": "C", \n',
        encoding="utf-8",
    )
    with pytest.raises(ProblemLoadError, match=r"broken\.jsonl, line 3: malformed JSON") as error:
        load_problems(path)
    assert "fix or remove the line" in str(error.value)


def test_malformed_json_file_reports_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n{"problem": "A", "answer": "1"},\n{"problem": }\n]', encoding="utf-8")
    with pytest.raises(ProblemLoadError, match=r"broken\.json, line 3: malformed JSON"):
        load_problems(path)


def test_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('["problem", "answer"]\n', encoding="utf-8")
    with pytest.raises(ProblemLoadError, match=r"list\.jsonl, line 1: expected a JSON object"):
        load_problems(path)


def test_non_utf8_bytes_report_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    first = b'{"problem": "A", "answer": "1"}\n'
    path.write_bytes(first + '{"problem": "caf\u00e9", "answer": "2"}\n'.encode("latin-1"))
    offset = len(first) + len(b'{"problem": "caf')
    with pytest.raises(
        ProblemLoadError,
        match=rf"latin1\.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at byte offset {offset}\)",
    ):
        load_problems(path)


def test_non_utf8_bytes_in_json_file_report_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('[\n{"problem": "caf\u00e9", "answer": "2"}\n]'.encode("latin-1"))
    with pytest.raises(ProblemLoadError, match=r"latin1\.json, line 2: not valid UTF-8"):
        load_problems(path)


def test_row_without_answer_names_file_line_fields_and_override(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "noanswer.jsonl",
        [{"problem": "A", "answer": "1"}, {"problem": "B", "response": "2", "level": 3}],
    )
    with pytest.raises(ProblemLoadError) as error:
        load_problems(path)
    message = str(error.value)
    assert "noanswer.jsonl, line 2: no answer" in message
    assert "fields present: level, problem, response" in message
    assert "answer_field=" in message


def test_row_without_prompt_mentions_prompt_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"text": "A", "answer": "1"}])
    with pytest.raises(
        ProblemLoadError, match=r"noprompt\.jsonl, line 1: no prompt.*answer, text.*prompt_field="
    ):
        load_problems(path)


def test_empty_answer_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [{"problem": "A", "answer": " "}])
    with pytest.raises(
        ProblemLoadError, match=r"blank\.jsonl, line 1: answer field 'answer' is empty"
    ):
        load_problems(path, answer_field="answer")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_file_without_problems(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProblemLoadError, match=r"empty\.jsonl?: contains no problems"):
        load_problems(path)


def test_duplicate_ids_name_the_id_and_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "dupes.jsonl",
        [
            {"id": 7, "problem": "A", "answer": "1"},
            {"id": 8, "problem": "B", "answer": "2"},
            {"id": "7", "problem": "C", "answer": "3"},
        ],
    )
    with pytest.raises(
        ProblemLoadError, match=r"dupes\.jsonl: duplicate id '7' at line 1 and line 3"
    ):
        load_problems(path)


def test_hf_dataset_that_cannot_be_loaded(tmp_path: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(
        ProblemLoadError, match=r"dataset 'json'.*absent\.jsonl.*could not be loaded"
    ):
        load_hf_dataset("json", data_files=str(missing), split="train", cache_dir=str(tmp_path))


def test_save_problems_requires_a_jsonl_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"use a \.jsonl file name"):
        save_problems([], tmp_path / "problems.json")


# --- hashing and boxed extraction --------------------------------------------------

SAMPLE = [
    Problem(id="a", prompt="1+1?", answer="2", source="toy", metadata={"level": 1}),
    Problem(id="b", prompt="caf\u00e9?", answer="3", source="toy"),
]


def test_problems_hash_is_the_sha256_of_the_canonical_json() -> None:
    # Spelled out so that any change to the canonical form, which would make hashes
    # recorded by earlier runs incomparable, fails here.
    canonical = (
        '[{"answer":"2","id":"a","metadata":{"level":1},"prompt":"1+1?","source":"toy"},'
        '{"answer":"3","id":"b","metadata":{},"prompt":"caf\u00e9?","source":"toy"}]'
    )
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert expected == "3f1bb374f9d6033fcabe1e1ee436b99866dc37d659faa56bd4ee6b17ceaa5a80"
    assert problems_hash(SAMPLE) == expected
    assert problems_hash(list(SAMPLE)) == expected


def test_problems_hash_changes_with_content_and_order() -> None:
    changed = [SAMPLE[0], Problem(id="b", prompt="caf\u00e9?", answer="4", source="toy")]
    relabelled = [
        SAMPLE[0],
        Problem(id="b", prompt="caf\u00e9?", answer="3", source="toy", metadata={"x": 1}),
    ]
    hashes = {
        problems_hash(SAMPLE),
        problems_hash(changed),
        problems_hash(relabelled),
        problems_hash(SAMPLE[::-1]),
    }
    assert len(hashes) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{1} and finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("no box here", None),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed{3} then a truncated \\boxed{\\frac{1}{2}", "3"),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected
