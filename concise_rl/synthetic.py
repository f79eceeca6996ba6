"""The built-in reasoning task of the embedded default: chained last-digit arithmetic.

A problem is a starting digit and a chain of operations applied left to right,
keeping only the last digit after each ("Start with 7. Step 1: Add 5. Step 2:
Multiply by 8."). The steps are numbered so that a small model can find the
operand of step k by copying, and what it must really learn is the arithmetic.
Each step is a small table a tiny transformer can learn in minutes on a CPU; the
level is the number of steps, and every step is another chance to slip, so
difficulty is graded: short chains are solved almost always and long ones only
sometimes, which gives curation a spread of pass rates.

Chain-of-thought traces carry a random amount of redundant re-checking: the same
model that answers correctly in a few steps has also learned to re-verify steps
("Let me check: 2*8=16->6.") and to re-derive the whole chain at the end. That makes the
trained base a *verbose reasoner*, the analogue of R1-Distill, whose length RL can
then reduce without any length term in the reward.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from concise_rl.problems import Problem

_OPS = {
    "add": ("Add {n}.", "+"),
    "sub": ("Subtract {n}.", "-"),
    "mul": ("Multiply by {n}.", "*"),
}
HELDOUT_FRACTION = 0.2
# How often reasoning_trace picks verbosity 0, 1, 2, 3 when none is given.
VERBOSITY_WEIGHTS = (1, 2, 3, 3)
# Chance that a step is re-checked, by verbosity; verbosity 3 may also re-derive the
# whole chain. Kept so that most long chains still fit a 256-token answer.
CHECK_PROBABILITY = (0.0, 0.6, 0.75, 0.75)


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

    def phrase(self) -> str:
        """The operation as the question words it: "Multiply by 8."."""
        return _OPS[self.op][0].format(n=self.operand)

    def text(self) -> str:
        return f"{self.left}{_OPS[self.op][1]}{self.operand}={self.full}->{self.result}"


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


def _question(steps: list[Step]) -> str:
    parts = [f"Start with {steps[0].left}."]
    parts += [f"Step {i}: {_OPS[s.op][0].format(n=s.operand)}" for i, s in enumerate(steps, 1)]
    return " ".join(parts) + " Keep only the last digit after each step. What is the final digit?"


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

    The trace restates the start and each numbered step the way the question words it
    ("Step 2: Multiply by 8. 2*8=16->6."), so finding the next operand is a copy from
    the question and the work left is the arithmetic itself. verbosity 0 states each
    step once; higher values re-check steps more often and re-derive the chain at the
    end, so trace length varies a lot at equal accuracy.
    """
    steps = _parse_question(question)
    if verbosity is None:
        # Weighted towards re-checking, so that re-checking a step is the most likely
        # continuation and even greedy decoding stays verbose.
        verbosity = rng.choices(range(4), weights=VERBOSITY_WEIGHTS)[0]
    lines = [f"Start with {steps[0].left}."]
    for i, step in enumerate(steps, 1):
        lines.append(f"Step {i}: {step.phrase()} {step.text()}.")
        if rng.random() < CHECK_PROBABILITY[verbosity]:
            lines.append(f"Let me check: {step.text()}.")
    if verbosity == 3 and rng.random() < 0.5:
        lines.append("Let me verify the whole chain again.")
        lines += [f"{step.text()}." for step in steps]
    lines.append(f"So the answer is \\boxed{{{steps[-1].result}}}.")
    return " ".join(lines)


def _parse_question(question: str) -> list[Step]:
    words = question.replace(".", "").replace(":", "").split()
    value = int(words[2])
    steps = []
    i = 3
    while i < len(words) and words[i] != "Keep":
        if words[i] == "Step":
            i += 2
            continue
        verb = words[i]
        if verb == "Multiply":
            op, n, i = "mul", int(words[i + 2]), i + 3
        elif verb == "Add":
            op, n, i = "add", int(words[i + 1]), i + 2
        elif verb == "Subtract":
            op, n, i = "sub", int(words[i + 1]), i + 2
        else:
            raise ValueError(f"not a chained-arithmetic question: {question!r}")
        step = Step(value, op, n)
        steps.append(step)
        value = step.result
    return steps
