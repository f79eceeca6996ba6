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

Chain-of-thought traces carry a random amount of redundant re-checking: once the
chain is done and the answer boxed, a verbose trace goes back over the steps
("Let me check each step. Check B *8: 2*8=16->6. ... All steps check out.").
That makes the trained base a *verbose reasoner*, the analogue of R1-Distill's
"wait, let me double-check", whose length RL can then reduce without any length
term in the reward. The re-check comes after the boxed answer and boxes nothing, so
it neither fixes nor causes a wrong answer: accuracy lives in the first pass, where
RL on hard problems can improve it directly, and the re-check is pure length.
(An earlier design redid the whole chain *before* the answer; the redo copied the
first pass's slips and added its own, so accuracy-seeking RL in phase 1 dropped it,
doing phase 2's work: docs/log/2026-11-27-demo-recipe.md, "Twelve more phase-1 runs".)
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
# How often reasoning_trace picks verbosity 0 (answer only), 1 (re-check the first
# few steps) and 2 (re-check every step) when none is given. 1 trace in 9 has no
# re-check at all: that is what RL can find; the rest make even greedy decoding
# verbose, and a level-8 trace with every step re-checked needs about 260 tokens
# (the demo's budget is 384).
VERBOSITY_WEIGHTS = (1, 2, 6)
RECHECK = "Let me check each step."
# How a re-check ends. It restates no answer: a trace's only boxed answer is the
# first pass's, so a slip made while re-checking cannot change it. (A version whose
# re-check ended by boxing the answer again copied the last re-checked step into
# it: the base's first pass was right 99.7% of the time on 7-8 steps and its final
# answer 76%, and RL in both phases then just dropped the re-check.)
RECHECK_END = "All steps check out."


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
    """A correct chain-of-thought answer to `question`, re-checked after the answer by `verbosity` (0-2).

    Each step starts with its letter and operation exactly as the question lists them
    ("B *8: 2*8=16->6."), so the next operation is found by matching one unique
    letter token in the question and copying what follows it; the work left is the
    arithmetic. The letter after the last step says "stop", and the answer is boxed.
    verbosity 0 stops there; 1 then re-checks the first k steps (k drawn from 1 to
    the number of steps) and 2 every step, each re-check a point where the trace
    could stop instead, and both end by saying that every step checks out. So the
    trace length varies about 2x at equal accuracy.
    """
    steps = _parse_question(question)
    if verbosity is None:
        verbosity = rng.choices(range(len(VERBOSITY_WEIGHTS)), weights=VERBOSITY_WEIGHTS)[0]
    if not 0 <= verbosity < len(VERBOSITY_WEIGHTS):
        raise ValueError(f"verbosity must be 0-{len(VERBOSITY_WEIGHTS) - 1}, got {verbosity}")
    answer = f"So the answer is \\boxed{{{steps[-1].result}}}."
    lines = [f"Start with {steps[0].left}."]
    lines += [_line(LETTERS[i], step) for i, step in enumerate(steps)]
    lines += [f"{LETTERS[len(steps)]} stop.", answer]
    if verbosity > 0:
        checked = len(steps) if verbosity == 2 else rng.randint(1, len(steps))
        lines.append(RECHECK)
        lines += [f"Check {_line(LETTERS[i], steps[i])}" for i in range(checked)]
        lines.append(RECHECK_END)
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
