"""Benchmarks by name: the paper's four (math500, aime24, amc23, mmlu_stem) and three more.

Each loads from a local directory holding ``NAME.jsonl`` (the layout of the
Qwen2.5-Math evaluation harness' data, which the shared reference data follows),
or, when no directory is given, from the Hugging Face hub. Both go through the
same ``datasets.load_dataset`` call (the ``json`` builder for a local file, the
dataset id for the hub) and the same row conversion (``concise_rl.problems``), so
the hub path is the code the tests run on local files.

The hub ids below are where each set is published; their rows carry the same
field names the converter already reads (problem/question, answer/final_answer,
choices with an integer answer). They are not reachable from CI, so a change of
layout on the hub shows up as a ``ProblemLoadError`` naming the dataset and fields.

MMLU-STEM is multiple choice: the prompt lists lettered options and asks for the
letter in ``\\boxed{}``; the reference is the letter. ``few_shot`` > 0 prepends that
many solved questions of the same subject (the paper ran it 5-shot). The local
file holds only the test split, so the shots are the first other questions of the
same subject in the file, never the question itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from concise_rl.errors import ProblemLoadError, did_you_mean
from concise_rl.problems import Problem, load_hf_dataset

BENCHMARK_DIR_ENV = "CONCISE_RL_BENCHMARK_DIR"
CHOICE_INSTRUCTION = "Answer with the letter of the correct option, and put the letter within \\boxed{}."


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_id: str
    hub_split: str
    hub_config: str | None = None
    kind: Literal["math", "choice"] = "math"
    subject_field: str | None = None

    @property
    def file_name(self) -> str:
        return f"{self.name}.jsonl"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test"),
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train"),
        Benchmark("amc23", "zwhe99/amc23", "test"),
        Benchmark("mmlu_stem", "TIGER-Lab/MMLU-STEM", "test", kind="choice", subject_field="type"),
        Benchmark("gsm8k", "openai/gsm8k", "test", hub_config="main"),
        Benchmark("minerva_math", "math-ai/minervamath", "test"),
        Benchmark("olympiadbench", "Hothan/OlympiadBench", "train", hub_config="OE_TO_maths_en_COMP"),
    )
}
PAPER_BENCHMARKS = ("math500", "aime24", "amc23", "mmlu_stem")


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ProblemLoadError(
            f"unknown benchmark {name!r}{did_you_mean(name, BENCHMARKS)}; known benchmarks: {', '.join(BENCHMARKS)} "
            "(any other set loads as a file: kind 'file' with a path)"
        ) from None


def parse_benchmarks(text: str) -> list[str]:
    """A comma-separated list of benchmark names, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ProblemLoadError("no benchmark named; give a comma-separated list such as math500,aime24")
    for n in names:
        benchmark(n)
    return names


def local_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The directory benchmarks load from: ``data_dir``, else $CONCISE_RL_BENCHMARK_DIR, else None (the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(BENCHMARK_DIR_ENV)
    return Path(chosen) if chosen else None


def load_benchmark(
    name: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None, few_shot: int = 0
) -> list[Problem]:
    """The problems of benchmark ``name``, from ``data_dir`` (or $CONCISE_RL_BENCHMARK_DIR) or the hub."""
    spec = benchmark(name)
    if few_shot < 0:
        raise ProblemLoadError(f"benchmark {name!r}: few_shot must be >= 0, got {few_shot}")
    if few_shot and spec.kind != "choice":
        raise ProblemLoadError(f"benchmark {name!r}: few-shot prompts are only built for multiple choice (mmlu_stem)")
    directory = local_dir(data_dir)
    if directory is not None:
        path = directory / spec.file_name
        if not path.is_file():
            raise ProblemLoadError(
                f"benchmark {name!r}: {path} does not exist; put {spec.file_name} in {directory} "
                f"or unset the directory (and ${BENCHMARK_DIR_ENV}) to load {spec.hub_id} from the hub"
            )
        # The same datasets call as the hub, with the json builder on the local file.
        # Few-shot needs the whole subject, so the limit applies after the shots are built.
        problems = load_hf_dataset(
            "json", split="train", source=name, data_files=str(path), limit=None if few_shot else limit
        )
    else:
        problems = load_hf_dataset(
            spec.hub_id, split=spec.hub_split, config=spec.hub_config, source=name, limit=None if few_shot else limit
        )
    if spec.kind == "choice":
        problems = [_choice_prompt(p) for p in problems]
        if few_shot:
            problems = _with_shots(problems, few_shot, spec.subject_field)[:limit]
    return problems


def _choice_prompt(p: Problem) -> Problem:
    return replace(p, prompt=f"{p.prompt}\n{CHOICE_INSTRUCTION}", metadata={**p.metadata, "question": p.prompt})


def _with_shots(problems: list[Problem], k: int, subject_field: str | None) -> list[Problem]:
    by_subject: dict[str, list[Problem]] = {}
    for p in problems:
        by_subject.setdefault(str(p.metadata.get(subject_field, "")), []).append(p)
    out = []
    for p in problems:
        pool = by_subject[str(p.metadata.get(subject_field, ""))]
        shots = [q for q in pool if q.id != p.id][:k]
        if len(shots) < k:
            raise ProblemLoadError(
                f"{p.source}: subject {p.metadata.get(subject_field)!r} has {len(shots)} other questions, "
                f"fewer than the {k} shots asked for; lower few_shot"
            )
        header = "".join(f"{q.metadata['question']}\nAnswer: \\boxed{{{q.answer}}}\n\n" for q in shots)
        out.append(replace(p, prompt=header + p.prompt, metadata={**p.metadata, "few_shot_ids": [q.id for q in shots]}))
    return out
