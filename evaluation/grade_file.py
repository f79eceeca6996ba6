"""``concise-rl grade``: grade a JSONL file of responses with the answer grader.

Each row gains ``correct`` (bool), ``extracted`` (the boxed answer, or null) and
``reason``. A row whose response field holds a list of responses (several samples
of one problem, as in the Qwen2.5-Math harness' output) gets a list in each of the
three fields. With ``label_field`` the grades are compared with existing labels
(a bool, or a list of bools) and every disagreement is reported.

The output is written to a temporary file and renamed when complete, so a crash
never leaves half a file under the output name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concise_rl.errors import ProblemLoadError
from concise_rl.files import atomic_file
from concise_rl.grader import Grader
from concise_rl.problems import read_rows


class GradeInputError(ProblemLoadError):
    """A response file that cannot be graded as asked."""


@dataclass
class GradeReport:
    rows: int = 0
    responses: int = 0
    correct: int = 0
    labelled: int = 0
    agreed: int = 0
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.responses if self.responses else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.labelled if self.labelled else None


def _field(path: Path, location: str, row: dict, name: str, option: str) -> Any:
    if name not in row:
        raise GradeInputError(
            f"{path}, {location}: no field {name!r} (fields: {', '.join(sorted(row))}); "
            f"name the right one with {option}"
        )
    return row[name]


def _responses(path: Path, location: str, value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise GradeInputError(
        f"{path}, {location}: field {name!r} must be a string or a list of strings, found {type(value).__name__}"
    )


def _labels(path: Path, location: str, value: Any, name: str, n: int) -> list[bool]:
    labels = value if isinstance(value, list) else [value]
    if len(labels) != n or not all(isinstance(v, bool) for v in labels):
        raise GradeInputError(
            f"{path}, {location}: label field {name!r} must hold {n} bool(s), one per response; found {value!r}"
        )
    return labels


def grade_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    response_field: str = "response",
    answer_field: str = "answer",
    label_field: str | None = None,
    grader: Grader,
    progress: bool = True,
) -> GradeReport:
    """Grade every response in ``in_path`` and write the rows with their grades to ``out_path``."""
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.suffix != ".jsonl":
        raise GradeInputError(f"{in_path}: concise-rl grade reads JSONL (one object per line), not {in_path.suffix!r}")
    if in_path.resolve() == out_path.resolve():
        raise GradeInputError(f"{out_path}: the output would overwrite the input; choose another -o path")
    rows, flat_responses, flat_answers, spans = [], [], [], []
    for location, row in read_rows(in_path):
        responses = _responses(
            in_path, location, _field(in_path, location, row, response_field, "--response-field"), response_field
        )
        answer = _field(in_path, location, row, answer_field, "--answer-field")
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
            raise GradeInputError(
                f"{in_path}, {location}: answer field {answer_field!r} must be a non-empty string "
                f"or number, found {answer!r}"
            )
        labels = None
        if label_field is not None:
            labels = _labels(
                in_path,
                location,
                _field(in_path, location, row, label_field, "--label-field"),
                label_field,
                len(responses),
            )
        spans.append((location, len(flat_responses), len(responses), isinstance(row[response_field], list), labels))
        rows.append(row)
        flat_responses += responses
        flat_answers += [str(answer)] * len(responses)
    if not rows:
        raise GradeInputError(f"{in_path}: no rows to grade (the file is empty)")
    grades = grader.grade_many(flat_responses, flat_answers, desc="grading" if progress else None)
    report = GradeReport(rows=len(rows), responses=len(grades), correct=sum(g.correct for g in grades))
    with atomic_file(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for row, (location, start, n, is_list, labels) in zip(rows, spans):
            mine = grades[start : start + n]
            values = {
                "correct": [g.correct for g in mine],
                "extracted": [g.extracted for g in mine],
                "reason": [g.reason for g in mine],
            }
            out.write(
                json.dumps(
                    {**row, **(values if is_list else {k: v[0] for k, v in values.items()})}, ensure_ascii=False
                )
                + "\n"
            )
            for j, (g, label) in enumerate(zip(mine, labels or [])):
                report.labelled += 1
                if g.correct == label:
                    report.agreed += 1
                else:
                    report.disagreements.append(
                        {
                            "location": location,
                            "response_index": j if is_list else None,
                            "answer": flat_answers[start + j],
                            "extracted": g.extracted,
                            "ours": g.correct,
                            "label": label,
                            "reason": g.reason,
                        }
                    )
    return report
