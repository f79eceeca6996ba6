"""Answer grading: the last \\boxed{...} of a response against a reference answer.

One grader serves training rewards, curation and evaluation. Equivalence is decided
by math-verify, run in a pool of worker processes (pebble) with a hard per-answer
timeout:

- math-verify's own timeouts use SIGALRM, which only works in a process's main
  thread; called from any other thread it times nothing out and its failure mode
  is to report the answer as wrong (a known cause of silent zero rewards). In a
  pool worker the grading runs in the worker's main thread, so they work.
- A C-level computation (a huge power) cannot be interrupted by a signal at all.
  The pool kills a worker that overruns ``timeout_s`` and the answer counts as
  wrong with that reason; a worker that dies is replaced and its answer regraded.

Model text is never evaluated as Python: answers are parsed as LaTeX only
(math-verify's ``LatexExtractionConfig``; its plain-expression extractor goes
through sympy's ``parse_expr``, which is ``eval`` underneath, so it is not used).

There is no module-level grader: whatever grades (the reward, curation, evaluation, the
``grade`` command) takes a :class:`Grader`, and each pipeline stage builds one from the
config's ``grader`` section (:meth:`Grader.from_config`) and closes it when it ends.

Cheap verdicts are decided in the calling process without the pool: no box, a
box too long or nested too deep to be a final answer, the same text, or two plain
integers. Everything else goes to math-verify.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache

from concise_rl.answers import extract_boxed
from concise_rl.config import GraderConfig

# A boxed answer longer than this is not a final answer; parsing it can take
# seconds, so it is wrong without being parsed.
MAX_ANSWER_CHARS = 1000
# Deeper brace nesting than this is not a final answer either (and deep nesting is
# where LaTeX parsers recurse).
MAX_BRACE_DEPTH = 24
DEFAULT_TIMEOUT_S = 5.0
# A worker that dies (killed by the OOM killer, a crash in a native library) is
# replaced and its answer regraded this many times before it counts as wrong.
CRASH_RETRIES = 1

# An integer, optionally with thousands separators ("32,348", as MATH writes "32,\\!348").
_INTEGER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_LETTER = re.compile(r"[A-Z]")
_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?[.:]?")


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    reason: str

    @property
    def boxed(self) -> bool:
        return self.extracted is not None


# Text wrappers that do not change an answer's meaning. math-verify does not see
# through them in answers such as "4:30 \\text{ p.m.}" (which it calls unparsable),
# so the exact-match path unwraps them first.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\left", "\\right", "\\$", "$", " ", "~")


def _normalise(s: str) -> str:
    """The answer as text with layout removed; two answers equal here are the same answer."""
    s = _TEXT_WRAPPER.sub(r"\1", s)
    for token in _SPACING:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for char in s:
        if char == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif char == "}":
            depth -= 1
    return deepest


def quick_grade(response: str, reference: str) -> tuple[Grade | None, str | None]:
    """The verdicts that need no parser, or (None, extracted) when math-verify must decide."""
    extracted = extract_boxed(response)
    if extracted is None:
        if "\\boxed{" in response or "\\fbox{" in response:
            return Grade(False, None, "\\boxed{ is never closed (unbalanced braces)"), None
        return Grade(False, None, "no \\boxed{} answer"), None
    if len(extracted) > MAX_ANSWER_CHARS:
        return Grade(
            False, extracted[:MAX_ANSWER_CHARS], f"boxed answer longer than {MAX_ANSWER_CHARS} characters"
        ), None
    if _brace_depth(extracted) > MAX_BRACE_DEPTH:
        return Grade(False, extracted, f"boxed answer nests braces deeper than {MAX_BRACE_DEPTH} levels"), None
    a, b = _normalise(extracted), _normalise(reference)
    if a == b:
        return Grade(True, extracted, "exact match"), None
    if _LETTER.fullmatch(b):
        # Multiple choice: the reference is a letter and so must the answer be ("(B)", "B." count).
        letter = _LETTER_ANSWER.fullmatch(a)
        chosen = letter.group(1).upper() if letter else None
        return Grade(chosen == b, extracted, "same choice" if chosen == b else "different choice"), None
    if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):
        same = int(a.replace(",", "")) == int(b.replace(",", ""))
        return Grade(same, extracted, "equal integers" if same else "different integers"), None
    return None, extracted


# --- the math-verify part: runs in a pool worker (or, with workers=0, in this process)


def _signal_timeout(timeout_s: float | None) -> int | None:
    """math-verify's timeouts are whole seconds of SIGALRM, usable only in the main thread."""
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(timeout_s))


@lru_cache(maxsize=65536)
def _parse_latex(text: str, timeout: int | None):
    from math_verify import LatexExtractionConfig, parse

    return parse(text, extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)


# Layout that math-verify's LaTeX parser trips over without changing the value:
# escaped dollar signs (currency), thin spaces, \left/\right, \dfrac/\tfrac.
_LAYOUT = re.compile(r"\\\$|\\[!,;:](?![a-zA-Z])|\\(?:left|right)(?![a-zA-Z])")


def _clean_latex(s: str) -> str:
    return _LAYOUT.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def verify_extracted(extracted: str, reference: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Whether a boxed answer equals the reference, by math-verify; (correct, reason).

    ``timeout_s`` arms math-verify's SIGALRM timeouts (main thread only); when one
    fires, math-verify logs it and answers "not equivalent". The pool passes None
    and kills an overrunning worker instead, so that a timeout is reported as one.
    """
    from math_verify import verify

    timeout = _signal_timeout(timeout_s)
    reference, extracted = _clean_latex(reference), _clean_latex(extracted)
    gold_text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    gold = _parse_latex(gold_text, timeout)
    if not gold:
        return False, f"reference answer {reference!r} could not be parsed"
    pred = _parse_latex(f"$\\boxed{{{extracted}}}$", timeout)
    if not pred:
        return False, "boxed answer could not be parsed"
    if verify(gold, pred, timeout_seconds=timeout):
        return True, "equivalent"
    return False, "not equivalent"


def _init_worker() -> None:
    """In each pool worker: the pool provides the timeout, so math-verify's note that
    its own is off (once per process, on stderr) is noise."""
    import logging

    class _NoTimeoutNote(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("Timeout is disabled")

    for name in ("math_verify.grader", "math_verify.parser"):
        logging.getLogger(name).addFilter(_NoTimeoutNote())


def _stop_pool(pool) -> None:
    pool.stop()
    pool.join()


class Grader:
    """Grades responses against reference answers; math-verify runs in ``workers`` processes.

    ``workers=0`` grades in the calling process: no hard timeout, and math-verify's
    own only from the main thread. The pool starts on the first answer that needs it
    and lives until :meth:`close` (or interpreter exit).
    """

    # What a worker runs for one answer: (extracted, reference, timeout_s) -> (correct, reason).
    check = staticmethod(verify_extracted)

    def __init__(self, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if workers is not None and workers < 0:
            raise ValueError(f"grader workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"grader timeout_s must be > 0, got {timeout_s}")
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self.timeout_s = timeout_s
        self._pool = None
        self._stop: weakref.finalize | None = None  # stops the pool: on close(), when dropped, or at exit
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: GraderConfig) -> Grader:
        """The grader the config's ``grader`` section describes."""
        return cls(cfg.workers, cfg.timeout_s)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            stop, self._pool, self._stop = self._stop, None, None
        if stop is not None:
            stop()

    def _get_pool(self):
        with self._lock:
            if self._pool is None:
                from pebble import ProcessPool

                # spawn, not fork: the caller has torch's threads running, and a
                # forked child of a threaded process can hang on an inherited lock.
                self._pool = ProcessPool(
                    max_workers=self.workers, context=multiprocessing.get_context("spawn"), initializer=_init_worker
                )
                # A grader dropped without close(), or alive at exit, still stops its workers.
                self._stop = weakref.finalize(self, _stop_pool, self._pool)
            return self._pool

    def grade(self, response: str, reference: str) -> Grade:
        return self.grade_many([response], [reference])[0]

    def grade_many(
        self, responses: Sequence[str], references: Sequence[str], *, desc: str | None = None
    ) -> list[Grade]:
        """One grade per (response, reference) pair, in order; a progress bar when ``desc`` is given."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} reference answers")
        grades: list[Grade | None] = [None] * len(responses)
        pending: list[tuple[int, str, str]] = []
        for i, (response, reference) in enumerate(zip(responses, references)):
            quick, extracted = quick_grade(response, reference)
            if quick is not None:
                grades[i] = quick
            else:
                pending.append((i, extracted, str(reference)))
        bar = None
        if desc is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(responses), desc=desc, unit="answer", initial=len(responses) - len(pending))
        try:
            if self.workers == 0:
                for i, extracted, reference in pending:
                    correct, reason = self.check(extracted, reference, self.timeout_s)
                    grades[i] = Grade(correct, extracted, reason)
                    if bar is not None:
                        bar.update()
            else:
                self._grade_in_pool(pending, grades, bar)
        finally:
            if bar is not None:
                bar.close()
        return grades  # type: ignore[return-value]

    def _grade_in_pool(self, pending: list[tuple[int, str, str]], grades: list[Grade | None], bar) -> None:
        from pebble import ProcessExpired

        attempts = {i: 0 for i, _, _ in pending}
        todo = pending
        while todo:
            pool = self._get_pool()
            futures = [
                (item, pool.schedule(self.check, args=(item[1], item[2], None), timeout=self.timeout_s))
                for item in todo
            ]
            retry = []
            for (i, extracted, reference), future in futures:
                try:
                    correct, reason = future.result()
                    grades[i] = Grade(correct, extracted, reason)
                except FutureTimeout:
                    grades[i] = Grade(False, extracted, f"grading took longer than {self.timeout_s:g}s")
                except ProcessExpired as err:
                    attempts[i] += 1
                    if attempts[i] <= CRASH_RETRIES:
                        retry.append((i, extracted, reference))
                        continue
                    grades[i] = Grade(
                        False, extracted, f"the grader worker died on this answer (exit code {err.exitcode})"
                    )
                if bar is not None:
                    bar.update()
            todo = retry
