"""Answer grading: the last \\boxed{...} of a response against a reference answer.

Equivalence is decided by math-verify. Its timeouts are signal based and raise
outside the main thread, where math-verify then reports every answer as wrong (a
known cause of silent zero rewards): we only ask for a timeout where one can work.
Model text is never evaluated as Python; math-verify parses LaTeX into sympy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

from math_verify import parse, verify

from concise_rl.answers import extract_boxed

# A boxed answer longer than this is not a final answer; parsing it can take
# seconds, so it is wrong without being parsed.
MAX_ANSWER_CHARS = 1000


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    reason: str

    @property
    def boxed(self) -> bool:
        return self.extracted is not None


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_gold(reference: str):
    text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    return parse(text, parsing_timeout=_timeout())


def _normalise(s: str) -> str:
    return s.replace(" ", "").replace("\\!", "").replace("\\,", "").rstrip(".")


def grade(response: str, reference: str) -> Grade:
    """Grade one response against one reference answer."""
    extracted = extract_boxed(response)
    if extracted is None:
        return Grade(False, None, "no \\boxed{} answer")
    if len(extracted) > MAX_ANSWER_CHARS:
        return Grade(False, extracted[:MAX_ANSWER_CHARS], f"boxed answer longer than {MAX_ANSWER_CHARS} characters")
    if _normalise(extracted) == _normalise(reference):
        return Grade(True, extracted, "exact match")
    gold = _parse_gold(reference)
    if not gold:
        return Grade(False, extracted, f"reference answer {reference!r} could not be parsed")
    pred = parse(f"$\\boxed{{{extracted}}}$", parsing_timeout=_timeout())
    if not pred:
        return Grade(False, extracted, "boxed answer could not be parsed")
    if verify(gold, pred, timeout_seconds=_timeout()):
        return Grade(True, extracted, "equivalent")
    return Grade(False, extracted, "not equivalent")
