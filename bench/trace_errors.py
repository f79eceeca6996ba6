"""Where the demo's reasoner goes wrong: evaluation traces checked step by step.

The built-in task (concise_rl/synthetic.py) has a trace whose every step can be
checked against the question: "B *8: 2*8=16->6." copies step B's operation from
the question, carries the last result, multiplies and keeps the last digit. A
trace does the chain once and boxes the answer; a verbose one then re-checks the
steps after "Let me check each step." This script
reads the ``responses.jsonl`` of ``concise-rl evaluate`` (or of the demo's
evaluation), rebuilds the questions from the config's evaluation sets, and for one
set and temperature reports per model:

- how many first passes (the text before the re-check) are exact, and the kind of
  the first wrong step where one is not: ``copy`` (another step's operation),
  ``carry`` (not the previous result), ``calc``, ``digit`` (the last digit), or
  ``missing`` (the pass stops before the last step);
- how many responses have no re-check (the second pass);
- against a base evaluation: the problems the model gets right that the base got
  wrong and the reverse, with the error kinds of the losing side's two passes.

    python -m bench.trace_errors --config configs/demo.yaml --set hard --temperature 0 \\
        .concise-rl/evaluations/concise-rl-demo-v2-* --base .concise-rl/evaluations/concise-rl-demo-v1-*

BENCHMARKS.md ("Phase 1 and greedy decoding") quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from concise_rl.config import load_config
from concise_rl.files import read_jsonl
from concise_rl.synthetic import _SYMBOLS, RECHECK, Step, _parse_question

# "B *8: 2*8=16->6." as the trace writes a step (its letter and operation, then the work).
STEP = re.compile(r"([A-Z]) ([-+*])(\d+): (-?\d+)([-+*])(\d+)=(-?\d+)->(-?\d+)\.")


@dataclass(frozen=True)
class StepError:
    kind: str  # copy, carry, calc, digit or missing
    step: int  # 0-based index of the first wrong step


def check_pass(text: str, steps: list[Step]) -> StepError | None:
    """The first wrong step of one pass over the chain, or None when every step is right."""
    found = list(STEP.finditer(text))
    for i, step in enumerate(steps):
        if i >= len(found):
            return StepError("missing", i)
        _label, op, operand, left, op2, operand2, full, digit = found[i].groups()
        if op != _SYMBOLS[step.op] or int(operand) != step.operand or op2 != op or operand2 != operand:
            return StepError("copy", i)
        if int(left) != step.left:
            return StepError("carry", i)
        if int(full) != step.full:
            return StepError("calc", i)
        if int(digit) != step.result:
            return StepError("digit", i)
    return None


def split_passes(response: str) -> tuple[str, str | None]:
    """The first pass and the re-check (None when the response has none)."""
    first, sep, rest = response.partition(RECHECK)
    return first, (rest if sep else None)


def load_responses(path: Path, set_name: str, temperature: float) -> dict[str, dict]:
    """One evaluation's responses for a set and temperature (the first sample of each problem), by problem id."""
    file = path / "responses.jsonl" if path.is_dir() else path
    if not file.is_file():
        sys.exit(f"trace_errors: {file} does not exist; pass an evaluation folder (it holds responses.jsonl)")
    rows = {
        r["problem_id"]: r
        for r in read_jsonl(file)
        if r["set"] == set_name and r["temperature"] == temperature and r.get("sample", 0) == 0
    }
    if not rows:
        sys.exit(f"trace_errors: {file} has no responses for set {set_name!r} at temperature {temperature}")
    return rows


def _kind(text: str | None, steps: list[Step]) -> str:
    """A pass's first error kind, 'exact' when it has none, 'none' when the pass is missing."""
    if text is None:
        return "none"
    error = check_pass(text, steps)
    return error.kind if error else "exact"


def summarise(rows: dict[str, dict], questions: dict[str, list[Step]]) -> dict:
    first_kinds: Counter[str] = Counter()
    no_recheck = 0
    for pid, r in rows.items():
        first, second = split_passes(r["response"])
        first_kinds[_kind(first, questions[pid])] += 1
        no_recheck += second is None
    return {"responses": len(rows), "correct": sum(bool(r["correct"]) for r in rows.values()),
            "first_pass": dict(sorted(first_kinds.items())), "no_second_pass": no_recheck}


def pass_kinds(response: str, steps: list[Step]) -> str:
    """'first/second' error kinds of a response ('exact', or 'none' for a missing second pass)."""
    return "/".join(_kind(text, steps) for text in split_passes(response))


def compare(rows: dict[str, dict], base: dict[str, dict], questions: dict[str, list[Step]]) -> dict:
    shared = sorted(rows.keys() & base.keys())
    gained = [p for p in shared if rows[p]["correct"] and not base[p]["correct"]]
    lost = [p for p in shared if base[p]["correct"] and not rows[p]["correct"]]
    return {
        "gained": len(gained), "lost": len(lost),
        "gained_base_errors": dict(Counter(pass_kinds(base[p]["response"], questions[p]) for p in gained)),
        "lost_errors": dict(Counter(pass_kinds(rows[p]["response"], questions[p]) for p in lost)),
    }


def questions_of(config: str | None, set_name: str) -> dict[str, list[Step]]:
    # Imported here: concise_rl.tasks.stages loads MLflow and torch, which --help and bad arguments do not need.
    from concise_rl.tasks.stages import evaluation_sets

    sets = evaluation_sets(load_config(config))
    if set_name not in sets:
        sys.exit(f"trace_errors: the config has no evaluation set {set_name!r}; it has {', '.join(sorted(sets))}")
    out = {}
    for p in sets[set_name]:
        try:
            out[p.id] = _parse_question(p.prompt)
        except ValueError:
            sys.exit(f"trace_errors: set {set_name!r} is not the built-in chained-arithmetic task ({p.id})")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluation folders (or responses.jsonl files)")
    parser.add_argument("--base", type=Path, help="an evaluation to compare each one with (gained and lost problems)")
    parser.add_argument("--config", default="configs/demo.yaml", help="the config whose evaluation sets were used")
    parser.add_argument("--set", dest="set_name", default="hard", help="evaluation set (default hard)")
    parser.add_argument("--temperature", type=float, default=0.0, help="evaluation temperature (default 0)")
    args = parser.parse_args(argv)
    questions = questions_of(args.config, args.set_name)
    base = load_responses(args.base, args.set_name, args.temperature) if args.base else None
    for path in ([args.base] if args.base else []) + args.evaluations:
        rows = load_responses(path, args.set_name, args.temperature)
        unknown = rows.keys() - questions.keys()
        if unknown:
            sys.exit(f"trace_errors: {path} has problems the config's {args.set_name!r} set lacks "
                     f"(first: {min(unknown)}); pass the config it was evaluated with")
        result = {"evaluation": str(path), "set": args.set_name, "temperature": args.temperature,
                  **summarise(rows, questions)}
        if base is not None and path != args.base:
            result |= compare(rows, base, questions)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
