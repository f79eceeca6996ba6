"""The built-in reasoning task of the embedded default: chained last-digit arithmetic.

A problem is a starting digit and a chain of operations applied left to right,
keeping only the last digit after each ("Start with 7. Steps: A +5, B *8, C stop.").
Each step carries a one-letter label, and the letter after the last step says
"stop". The trace writes each step's label and operation exactly as the question
lists them before doing the work ("B *8: 2*8=16->6."), so finding the next
operation is a lookup of one unique token, the kind of copy a tiny transformer
learns early (an induction head), and what it must really learn is the arithmetic.
Each step is a small table a tiny transformer can learn in minutes on a CPU; the
level is the number of steps, and every step is another chance to slip, so
difficulty is graded: short chains are solved almost always and long ones only
sometimes, which gives curation a spread of pass rates.

Chain-of-thought traces carry a random amount of redundant re-checking: the same
model that answers correctly in a few steps has also learned to re-verify steps
("Check: 2*8=16->6.") and to redo the whole chain from the start. That makes the
trained base a *verbose reasoner*, the analogue of R1-Distill, whose length RL can
then reduce without any length term in the reward.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from concise_rl.problems import Problem

_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
_OPS_OF_SYMBOL = {v: k for k, v in _SYMBOLS.items()}
HELDOUT_FRACTION = 0.2
# How often reasoning_trace picks verbosity 0, 1, 2, 3 when none is given.
VERBOSITY_WEIGHTS = (1, 1, 3, 4)
# Chance that a step is re-checked, by verbosity.
CHECK_PROBABILITY = (0.0, 0.6, 0.8, 0.8)
# Verbosity 2 and up also redo the whole chain from the start, which about doubles
# the answer: 7 traces in 9 do, and a level-8 trace then needs up to ~330 tokens
# (the demo's budget is 384). The base is a verbose reasoner because verbose traces
# are the common case; the 1 in 9 without any re-checking is what RL can find.
REDO_MIN_VERBOSITY = 2


@dataclass(frozen=True)
class Step:
    left: int
    op: str
    operand: int

    @property
    def full(self) -> int:
        return {"add": self.left + self.operand, "sub": self.left - self.operand, "mul": self.left * self.operand}[
            self.op
        ]

    @property
    def result(self) -> int:
        return self.full % 10

    def op_symbol(self) -> str:
        """The operation as the question writes it: "*8"."""
        return f"{_SYMBOLS[self.op]}{self.operand}"

    def text(self) -> str:
        return f"{self.left}{_SYMBOLS[self.op]}{self.operand}={self.full}->{self.result}"


def _random_step(rng: random.Random, value: int) -> Step:
    # Subtraction only where it stays non-negative, so "last digit" needs no sign rule.
    ops = ["add", "mul", "sub"] if value >= 2 else ["add", "mul"]
    op = rng.choice(ops)
    if op == "sub":
        return Step(value, op, rng.randint(1, value))
    return Step(value, op, rng.randint(1, 9) if op == "add" else rng.randint(2, 9))


def _steps(rng: random.Random, level: int) -> list[Step]:
    value = rng.randint(0, 9)
    steps = []
    for _ in range(level):
        step = _random_step(rng, value)
        steps.append(step)
        value = step.result
    return steps


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# One letter per step plus one that says stop.
MAX_LEVEL = len(LETTERS) - 1


def _line(label: str, step: Step) -> str:
    """One step of the trace: its label and operation as the question writes them, then the work."""
    return f"{label} {step.op_symbol()}: {step.text()}."


def _question(steps: list[Step]) -> str:
    ops = [f"{LETTERS[i]} {s.op_symbol()}" for i, s in enumerate(steps)]
    ops.append(f"{LETTERS[len(steps)]} stop")
    return (
        f"Start with {steps[0].left}. Steps: " + ", ".join(ops) + ". "
        "Keep only the last digit after each step. What is the final digit?"
    )


def _split_of(question: str) -> str:
    """Held-out or train, decided by the question's hash so the two never overlap."""
    h = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 1000 < HELDOUT_FRACTION * 1000 else "train"


def _problem_steps(rng: random.Random, level: int, split: str) -> tuple[str, list[Step]]:
    while True:
        steps = _steps(rng, level)
        question = _question(steps)
        if _split_of(question) == split:
            return question, steps


def generate_problems(
    n: int, *, seed: int, min_level: int = 1, max_level: int = 6, split: str = "train", distinct: bool = True
) -> list[Problem]:
    """n problems, levels spread evenly over [min_level, max_level].

    Evaluation and curation sets are ``distinct``; training traces need not be, since
    short chains have only a few hundred distinct problems.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 1 <= min_level <= max_level <= MAX_LEVEL:
        raise ValueError(f"levels must satisfy 1 <= min_level <= max_level <= {MAX_LEVEL}, got {min_level}-{max_level}")
    rng = random.Random(f"{seed}-{split}")
    levels = list(range(min_level, max_level + 1))
    seen: set[str] = set()
    problems: list[Problem] = []
    repeats = 0
    while len(problems) < n:
        level = levels[len(problems) % len(levels)]
        question, steps = _problem_steps(rng, level, split)
        if distinct and question in seen:
            repeats += 1
            if repeats > 100 * n:
                raise ValueError(
                    f"cannot draw {n} distinct {split} problems at levels {min_level}-{max_level}: "
                    "short chains have few distinct problems; raise min_level or ask for fewer"
                )
            continue
        seen.add(question)
        pid = f"arith-{split}-{seed}-{len(problems):05d}"
        problems.append(
            Problem(pid, question, str(steps[-1].result), "synthetic-arithmetic", {"level": level})
        )
    return problems


def reasoning_trace(question: str, rng: random.Random, verbosity: int | None = None) -> str:
    """A correct chain-of-thought answer to `question` with `verbosity` (0-3) re-checks.

    Each step starts with its letter and operation exactly as the question lists them
    ("B *8: 2*8=16->6."), so the next operation is found by matching one unique
    letter token in the question and copying what follows it; the work left is the
    arithmetic. The letter after the last step says "stop". verbosity 0 states each
    step once; higher values re-check steps more often, and from 2 on also redo the
    chain from the start, so trace length varies about 2x at equal accuracy.
    """
    steps = _parse_question(question)
    if verbosity is None:
        # Weighted towards re-checking, so that re-checking a step is the most likely
        # continuation and even greedy decoding stays verbose.
        verbosity = rng.choices(range(4), weights=VERBOSITY_WEIGHTS)[0]
    stop = f"{LETTERS[len(steps)]} stop."
    lines = [f"Start with {steps[0].left}."]
    for i, step in enumerate(steps):
        lines.append(_line(LETTERS[i], step))
        if rng.random() < CHECK_PROBABILITY[verbosity]:
            lines.append(f"Check: {step.text()}.")
    lines.append(stop)
    if verbosity >= REDO_MIN_VERBOSITY:
        lines.append(f"Again from {steps[0].left}:")
        lines += [_line(LETTERS[i], step) for i, step in enumerate(steps)]
        lines.append(stop)
    lines.append(f"So the answer is \\boxed{{{steps[-1].result}}}.")
    return " ".join(lines)


_QUESTION = re.compile(r"Start with (\d)\. Steps: (.*?)\. Keep only the last digit")
_ITEM = re.compile(r"([A-Z]) ([-+*])(\d)")


def _parse_question(question: str) -> list[Step]:
    match = _QUESTION.search(question)
    if not match:
        raise ValueError(f"not a chained-arithmetic question: {question!r}")
    value = int(match.group(1))
    items = match.group(2).split(", ")
    steps = []
    for i, item in enumerate(items[:-1]):
        m = _ITEM.fullmatch(item)
        if not m or m.group(1) != LETTERS[i]:
            raise ValueError(f"not a chained-arithmetic question: {question!r}")
        step = Step(value, _OPS_OF_SYMBOL[m.group(2)], int(m.group(3)))
        steps.append(step)
        value = step.result
    if not steps or items[-1] != f"{LETTERS[len(steps)]} stop":
        raise ValueError(f"not a chained-arithmetic question: {question!r}")
    return steps
