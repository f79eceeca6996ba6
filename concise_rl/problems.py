"""The one problem record of the pipeline, and loaders for every source it reads."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from string import ascii_uppercase
from typing import Any

from concise_rl.answers import extract_boxed
from concise_rl.errors import ProblemLoadError


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer.

    ``prompt`` is the question text without any chat formatting; the rollout code
    applies the model's chat template and the configured instruction. Sources that
    ship an already formatted prompt (the paper's training files) keep the plain
    question in ``prompt`` and the formatted text in ``metadata["formatted_prompt"]``.
    """

    id: str
    prompt: str
    answer: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


PROMPT_FIELDS = ("prompt", "problem", "question")
# `target` (the paper's training files) and `gt` (the grader file) are the normalised
# references that the reference code scored against, so they win over a raw `answer`
# when a row carries both.
ANSWER_FIELDS = ("target", "gt", "answer", "final_answer")
ID_FIELDS = ("id", "unique_id", "idx")

# Minerva ships only a worked solution; its reference answer is the last \boxed{...}.
_SOLUTION_FIELD = "solution"
# The paper's training files carry the chat-formatted prompt in `input`.
_FORMATTED_PROMPT_FIELD = "input"
_GSM8K_MARKER = "####"
_JSON_LIST_KEYS = ("data", "problems", "examples")
_SAVED_FIELDS = frozenset({"id", "prompt", "answer", "source", "metadata"})


def load_problems(
    path: str | PathLike[str],
    *,
    source: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load problems from a local ``.jsonl`` or ``.json`` file.

    Every supported benchmark and training file is recognised row by row from its
    field names (see ``problem_from_row``), so one loader serves all of them and a
    new file in a known layout needs no code. ``prompt_field``/``answer_field``
    name the fields explicitly when the guess is wrong. ``source`` defaults to the
    file stem (``math500`` for ``math500.jsonl``); ``limit`` keeps the first N rows
    and stops reading there.
    """
    path = Path(path)
    return _problems_from_rows(
        read_rows(path),
        origin=str(path),
        default_source=path.stem,
        source=source,
        prompt_field=prompt_field,
        answer_field=answer_field,
        limit=limit,
    )


def load_hf_dataset(
    name: str,
    *,
    split: str = "test",
    config: str | None = None,
    source: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[Problem]:
    """Load problems with ``datasets.load_dataset(name, config, split=split, **load_kwargs)``.

    Rows go through the same ``problem_from_row`` as local files, so a benchmark
    gives the same problems whether it comes from the hub or from a JSONL copy.
    ``source`` defaults to the last part of ``name`` (``MATH-500`` for
    ``HuggingFaceH4/MATH-500``); pass it explicitly for generic builders such as
    ``"json"``.
    """
    # Imported here so that reading local files neither needs nor pays for `datasets`.
    import datasets

    origin = _describe_hf_dataset(name, config, split, load_kwargs)
    try:
        dataset = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except (OSError, ValueError) as exc:
        raise ProblemLoadError(
            f"{origin}: could not be loaded ({exc}). Check the dataset name, config and "
            "split, network access to the Hugging Face hub (or a local cache), and "
            "data_files when loading a local file."
        ) from exc
    rows = ((f"row {number}", dict(row)) for number, row in enumerate(dataset, start=1))
    return _problems_from_rows(
        rows,
        origin=origin,
        default_source=name.rstrip("/").rsplit("/", 1)[-1],
        source=source,
        prompt_field=prompt_field,
        answer_field=answer_field,
        limit=limit,
    )


def save_problems(problems: Iterable[Problem], path: str | PathLike[str]) -> None:
    """Write problems as JSONL that ``load_problems`` reads back unchanged.

    Runs save the exact problem set they used next to their results, so a later
    evaluation can reload it without re-running any source conversion.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: problems are saved as JSONL; use a .jsonl file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for problem in problems:
            out.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")


def problems_hash(problems: Iterable[Problem]) -> str:
    """Return the sha256 hex digest of the problems' canonical JSON.

    Run records store it so two runs can be checked to have used the very same
    problems, in the same order; sorted keys and fixed separators keep it stable
    across processes and Python versions.
    """
    canonical = json.dumps(
        [asdict(problem) for problem in problems],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def problem_from_row(
    row: Mapping[str, Any],
    *,
    index: int,
    default_source: str,
    source: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    where: str | None = None,
) -> Problem:
    """Convert one source row to a ``Problem``; the one conversion every loader uses.

    The prompt comes from ``prompt_field`` or the first of ``PROMPT_FIELDS`` that
    is present, the answer from ``answer_field`` or the first of ``ANSWER_FIELDS``,
    falling back to the last ``\\boxed{}`` of ``solution``. Answers are rendered
    the way each benchmark states them: GSM8K's text after ``####``, multiple-choice
    indices as letters, integral floats without ``.0``, lists joined with ``", "``.
    The id comes from ``ID_FIELDS`` or is ``f"{source}-{index}"``. Every other field
    is kept in ``metadata`` (the paper's ``input`` as ``formatted_prompt``) so
    nothing the source offers is lost. Rows written by ``save_problems`` are taken
    as they are. ``where`` names the row in error messages.
    """
    where = where or f"row {index + 1}"
    if prompt_field is None and answer_field is None and _is_saved_row(row):
        return Problem(
            id=row["id"],
            prompt=row["prompt"],
            answer=row["answer"],
            source=source or row["source"],
            metadata=dict(row["metadata"]),
        )
    source = source or default_source
    prompt_key = _pick_field(row, prompt_field, PROMPT_FIELDS, "prompt", where)
    answer_key = _pick_field(
        row, answer_field, ANSWER_FIELDS + (_SOLUTION_FIELD,), "answer", where
    )
    id_key = next((key for key in ID_FIELDS if _has_value(row.get(key))), None)
    # A solution only contains the answer, so it stays in metadata as the worked solution.
    consumed = {prompt_key, id_key} | ({answer_key} - {_SOLUTION_FIELD})
    return Problem(
        id=str(row[id_key]) if id_key else f"{source}-{index}",
        prompt=_prompt_text(row, prompt_key, where),
        answer=_answer_text(row, answer_key, where),
        source=source,
        metadata=_metadata(row, consumed=consumed),
    )


def _problems_from_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    origin: str,
    default_source: str,
    source: str | None,
    prompt_field: str | None,
    answer_field: str | None,
    limit: int | None,
) -> list[Problem]:
    """Convert located rows to problems, enforcing unique ids and a non-empty result."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems, got {limit}.")
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for index, (location, row) in enumerate(rows):
        problem = problem_from_row(
            row,
            index=index,
            default_source=default_source,
            source=source,
            prompt_field=prompt_field,
            answer_field=answer_field,
            where=f"{origin}, {location}",
        )
        if problem.id in first_seen:
            raise ProblemLoadError(
                f"{origin}: duplicate id {problem.id!r} at {first_seen[problem.id]} and "
                f"{location}; ids must be unique, so remove or renumber one of the rows."
            )
        first_seen[problem.id] = location
        problems.append(problem)
        if len(problems) == limit:
            break
    if not problems:
        raise ProblemLoadError(
            f"{origin}: contains no problems; check that this is the intended file "
            "and that it is not empty."
        )
    return problems


def _describe_hf_dataset(
    name: str, config: str | None, split: str, load_kwargs: Mapping[str, Any]
) -> str:
    """Name a dataset in messages; for builders such as "json" the data files are the name."""
    parts = [f"config={config!r}"] if config else []
    parts.append(f"split={split!r}")
    if "data_files" in load_kwargs:
        parts.append(f"data_files={load_kwargs['data_files']!r}")
    return f"dataset {name!r} ({', '.join(parts)})"


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Check the file up front, then return its rows with their locations."""
    if path.suffix not in (".jsonl", ".json"):
        raise ProblemLoadError(
            f"{path}: unsupported file type {path.suffix!r}; load_problems reads .jsonl "
            "and .json files (use load_hf_dataset with data_files= for other formats)."
        )
    if not path.is_file():
        raise ProblemLoadError(
            f"{path}: no such file (looked at {path.resolve()}); check the path and "
            "the working directory."
        )
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, data)
    return _json_rows(path, data)


def _jsonl_rows(path: Path, data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield one object per non-blank line, parsing lazily so ``limit`` stops early."""
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode_utf8(path, raw, first_line=number, first_offset=offset)
        offset += len(raw) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProblemLoadError(
                f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                "each line must hold one complete JSON object, so fix or remove the line."
            ) from None
        yield f"line {number}", _require_object(path, f"line {number}", row)


def _json_rows(path: Path, data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the objects of a JSON list, or of the list under a data/problems/examples key."""
    text = _decode_utf8(path, data, first_line=1, first_offset=0)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProblemLoadError(
            f"{path}, line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
            "fix the file so it parses as JSON."
        ) from None
    for number, item in enumerate(_json_items(path, document), start=1):
        yield f"item {number}", _require_object(path, f"item {number}", item)


def _json_items(path: Path, document: Any) -> list[Any]:
    """Find the list of rows in a parsed JSON document."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        for key in _JSON_LIST_KEYS:
            if isinstance(document.get(key), list):
                return document[key]
    raise ProblemLoadError(
        f"{path}: expected a JSON list of objects, or an object with a list under "
        f"one of {', '.join(repr(key) for key in _JSON_LIST_KEYS)}; found "
        f"{type(document).__name__}. Store the problems in one of those shapes or as JSONL."
    )


def _decode_utf8(path: Path, data: bytes, *, first_line: int, first_offset: int) -> str:
    """Decode UTF-8, reporting the line and file byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise ProblemLoadError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte "
            f"offset {first_offset + exc.start}); re-encode the file as UTF-8."
        ) from None


def _require_object(path: Path, location: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ProblemLoadError(
            f"{path}, {location}: expected a JSON object, found {type(row).__name__}; "
            "each problem must be an object with a prompt and an answer field."
        )
    return row


def _is_saved_row(row: Mapping[str, Any]) -> bool:
    """Whether the row has exactly the shape ``save_problems`` writes."""
    return (
        set(row) == _SAVED_FIELDS
        and all(isinstance(row[key], str) for key in ("id", "prompt", "answer", "source"))
        and isinstance(row["metadata"], dict)
    )


def _has_value(value: Any) -> bool:
    """Whether a field carries content; datasets pad missing columns with None or ''."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return bool(value)
    return value is not None


def _fields(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(row)) or "none"


def _pick_field(
    row: Mapping[str, Any],
    explicit: str | None,
    candidates: tuple[str, ...],
    role: str,
    where: str,
) -> str:
    """Return the explicit field if given, else the first candidate with content."""
    if explicit is not None:
        if explicit not in row:
            raise ProblemLoadError(
                f"{where}: {role}_field={explicit!r} is not a field of this row; "
                f"fields present: {_fields(row)}."
            )
        return explicit
    for candidate in candidates:
        if _has_value(row.get(candidate)):
            return candidate
    raise ProblemLoadError(
        f"{where}: no {role} found (looked for {', '.join(candidates)}); fields present: "
        f"{_fields(row)}. Pass {role}_field= to name the field that holds the {role}."
    )


def _choices(row: Mapping[str, Any], where: str) -> list[Any] | None:
    """Return the options of a multiple-choice row (MMLU), or None for other rows."""
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    if len(choices) > len(ascii_uppercase):
        raise ProblemLoadError(
            f"{where}: {len(choices)} choices cannot be labelled A-Z; "
            "split the question or drop the 'choices' field."
        )
    return choices


def _prompt_text(row: Mapping[str, Any], key: str, where: str) -> str:
    """Return the question, followed by lettered options for multiple-choice rows."""
    question = row[key]
    if not isinstance(question, str) or not question.strip():
        raise ProblemLoadError(
            f"{where}: prompt field {key!r} holds {question!r}, not question text; "
            "pass prompt_field= to name the field that holds the question."
        )
    choices = _choices(row, where)
    if choices is None:
        return question
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(ascii_uppercase, choices))
    return f"{question}\n{options}"


def _answer_text(row: Mapping[str, Any], key: str, where: str) -> str:
    """Render the reference answer the way the benchmark's graders expect it."""
    value = row[key]
    if key == _SOLUTION_FIELD:
        boxed = extract_boxed(value) if isinstance(value, str) else None
        if boxed is None:
            raise ProblemLoadError(
                f"{where}: no answer: no {'/'.join(ANSWER_FIELDS)} field, and "
                f"{key!r} has no complete \\boxed{{...}}; fields present: {_fields(row)}. "
                "Pass answer_field= to name the field that holds the answer."
            )
        text = boxed
    elif isinstance(value, list):
        text = ", ".join(str(item).strip().strip("$").strip() for item in value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else str(value)
    elif isinstance(value, int) and (choices := _choices(row, where)) is not None:
        text = _choice_letter(value, choices, where)
    elif isinstance(value, str) and _GSM8K_MARKER in value:
        text = _gsm8k_final_answer(value)
    else:
        text = "" if value is None else str(value)
    if not text.strip():
        raise ProblemLoadError(
            f"{where}: answer field {key!r} is empty ({value!r}); fill it in or pass "
            "answer_field= to name the field that holds the answer."
        )
    return text.strip()


def _choice_letter(index: int, choices: list[Any], where: str) -> str:
    if not 0 <= index < len(choices):
        raise ProblemLoadError(
            f"{where}: answer index {index} is outside the {len(choices)} choices; "
            "answers of multiple-choice rows must be 0-based indices into 'choices'."
        )
    return ascii_uppercase[index]


def _gsm8k_final_answer(solution: str) -> str:
    """GSM8K answers end in ``#### 1,600``; graders compare the plain number ``1600``."""
    final = solution.rpartition(_GSM8K_MARKER)[2]
    return re.sub(r"(?<=\d),(?=\d)", "", final)


def _metadata(row: Mapping[str, Any], *, consumed: set[str | None]) -> dict[str, Any]:
    """Keep every field not consumed as id, prompt or answer, under a stable name."""
    return {
        ("formatted_prompt" if key == _FORMATTED_PROMPT_FIELD else key): value
        for key, value in row.items()
        if key not in consumed
    }
