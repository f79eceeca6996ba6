"""Benchmarks by name (concise_rl/benchmarks.py) and the prompt styles of the model families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from concise_rl.benchmarks import BENCHMARK_DIR_ENV, BENCHMARKS, CHOICE_INSTRUCTION, load_benchmark, parse_benchmarks
from concise_rl.config import DataSource, PromptConfig
from concise_rl.errors import ProblemLoadError
from concise_rl.training.models import format_prompt, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCH = SHARED / "benchmarks"
needs_data = pytest.mark.skipif(not BENCH.is_dir(), reason=f"shared benchmarks not found at {BENCH}")

EXPECTED = {  # rows, first answer
    "math500": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "aime24": (30, "204"),
    "amc23": (40, "27"),
    "mmlu_stem": (3018, "C"),
    "gsm8k": (1319, "18"),
    "minerva_math": (272, "1.6"),
    "olympiadbench": (675, "2"),
}


def test_the_papers_four_and_three_more_are_known_with_hub_ids():
    assert set(BENCHMARKS) == set(EXPECTED)
    for b in BENCHMARKS.values():
        assert "/" in b.hub_id and b.hub_split in ("test", "train")


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_benchmark_loads_by_name_from_a_local_directory(name):
    problems = load_benchmark(name, data_dir=BENCH)
    rows, first_answer = EXPECTED[name]
    assert len(problems) == rows
    assert problems[0].answer == first_answer
    assert all(p.source == name for p in problems)
    assert len({p.id for p in problems}) == rows


@needs_data
def test_the_directory_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(BENCH))
    assert [p.answer for p in load_benchmark("aime24", limit=3)] == ["204", "113", "371"]


def test_a_missing_local_file_names_the_file_and_the_hub_alternative(tmp_path):
    with pytest.raises(ProblemLoadError, match=r"aime24.jsonl does not exist.*HuggingFaceH4/aime_2024 from the hub"):
        load_benchmark("aime24", data_dir=tmp_path)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ProblemLoadError,
                       match=r"unknown benchmark 'math5000' \(did you mean 'math500'\?\); known benchmarks: math500, aime24"):
        parse_benchmarks("math500,math5000")
    with pytest.raises(ValidationError, match=r"kind 'benchmark' needs 'name', one of math500"):
        DataSource(kind="benchmark", name="math5000")
    with pytest.raises(ValidationError, match=r"few_shot applies to multiple-choice"):
        DataSource(kind="benchmark", name="aime24", few_shot=5)


@needs_data
def test_mmlu_stem_is_multiple_choice_with_the_letter_in_a_box(grader):
    p = load_benchmark("mmlu_stem", data_dir=BENCH, limit=1)[0]
    assert p.prompt.endswith(CHOICE_INSTRUCTION) and "\nC. reduce the carrying capacity" in p.prompt
    assert grader.grade("The answer is \\boxed{C}.", p.answer).correct
    assert grader.grade("\\boxed{(C)}", p.answer).correct and grader.grade("\\boxed{c}", p.answer).correct
    assert not grader.grade("\\boxed{B}", p.answer).correct
    assert grader.grade("\\boxed{B}", p.answer).reason == "different choice"


@needs_data
def test_mmlu_stem_five_shot_takes_other_questions_of_the_same_subject():
    problems = load_benchmark("mmlu_stem", data_dir=BENCH, few_shot=5, limit=40)
    assert len(problems) == 40
    rows = [json.loads(line) for line in (BENCH / "mmlu_stem.jsonl").read_text().splitlines()]
    for p in problems:
        shots = p.metadata["few_shot_ids"]
        assert len(shots) == 5 and p.id not in shots
        subjects = {rows[int(s.rsplit("-", 1)[1])]["type"] for s in shots}
        assert subjects == {p.metadata["type"]}
        assert p.prompt.count("Answer: \\boxed{") == 5
        assert p.prompt.endswith(p.metadata["question"] + "\n" + CHOICE_INSTRUCTION)


@needs_data
def test_qwen_math_style_reproduces_the_papers_qwen_prompt(tiny_model_dir):
    # The tiny model's tokenizer carries Qwen2's ChatML template.
    tok = load_tokenizer(str(tiny_model_dir))
    rows = json.loads((SHARED / "paper" / "math_level5_data_processed_with_qwen_prompt.json").read_text())
    for row in rows:
        ours = format_prompt(row["question"], tok, PromptConfig(style="qwen-math"))
        assert ours == row["input"] + "\n"  # the paper's file stops before the newline after "assistant"


def test_r1_style_puts_the_instruction_after_the_question_in_one_user_turn(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    text = format_prompt("What is 1+1?", tok, PromptConfig(style="r1"))
    assert text == (
        "<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = format_prompt("What is 1+1?", tok, PromptConfig(style="qwen-math", use_chat_template=False))
    assert plain == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
