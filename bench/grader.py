"""Grader speed: responses graded per second by the shared grader (concise_rl/grader.py).

Three workloads, each timed on a fresh worker pool after a warm-up call (so the
pool is running but no answer of the workload is in a worker's parse cache):

  dev        the 400 real chain-of-thought responses of ../shared/data/grader
             (typical MATH answers: most are decided by exact match)
  verify     MATH-500 reference answers rewritten so that text matching cannot
             decide them (an integer n as \\frac{2n}{2}, anything else in braces),
             half graded against their own reference (equivalent) and half against
             the next problem's (not equivalent): every one goes to math-verify
  mixed      both together, in order

Prints one JSON line per workload (responses, seconds, responses_per_s, workers)
and a summary line.

    python -m bench.grader [--workers N] [--repeats 3] [--data DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import time
from pathlib import Path

from concise_rl.grader import Grader
from concise_rl.problems import load_problems

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def dev_workload(data: Path) -> tuple[list[str], list[str]]:
    responses, references = [], []
    with (data / "grader" / "math_cot_50_dev.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            responses += row["code"]
            references += [str(row["gt"])] * len(row["code"])
    return responses, references


def _rewrite(answer: str) -> str:
    """The same answer written so that text normalisation cannot match it."""
    if answer.replace("-", "").isdigit():
        return f"\\frac{{{2 * int(answer)}}}{{2}}"
    return f"{{{answer}}}"


def verify_workload(data: Path, limit: int | None) -> tuple[list[str], list[str]]:
    answers = [p.answer for p in load_problems(data / "benchmarks" / "math500.jsonl", limit=limit)]
    responses, references = [], []
    for i, answer in enumerate(answers):
        responses.append(f"Working... so the answer is \\boxed{{{_rewrite(answer)}}}.")
        references.append(answer if i % 2 == 0 else answers[(i + 1) % len(answers)])
    return responses, references


def time_workload(workers: int | None, responses, references, repeats: int) -> tuple[int, dict]:
    """Each repeat on a fresh pool, warmed up on answers outside the workload, so that no
    parse is served from a worker's cache."""
    seconds = []
    grades = None
    for _ in range(repeats):
        with Grader(workers) as grader:
            grader.grade_many(["\\boxed{\\frac{1}{3}}"] * 2 * grader.workers, ["0.5"] * 2 * grader.workers)
            t0 = time.perf_counter()
            grades = grader.grade_many(responses, references)
            seconds.append(time.perf_counter() - t0)
            workers = grader.workers
    mean = sum(seconds) / len(seconds)
    reasons: dict[str, int] = {}
    for g in grades:
        reasons[g.reason] = reasons.get(g.reason, 0) + 1
    return workers, {
        "responses": len(responses),
        "seconds": round(mean, 4),
        "responses_per_s": round(len(responses) / mean, 1),
        "correct": sum(g.correct for g in grades),
        "reasons": reasons,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=None, help="grader processes (default: min(4, CPUs))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--limit", type=int, default=None, help="MATH-500 answers in the verify workload (default: all)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    dev = dev_workload(args.data)
    verify = verify_workload(args.data, args.limit)
    mixed = (dev[0] + verify[0], dev[1] + verify[1])
    results = {}
    for name, (responses, references) in (("dev", dev), ("verify", verify), ("mixed", mixed)):
        workers, timing = time_workload(args.workers, responses, references, args.repeats)
        results[name] = {"workload": name, "workers": workers, **timing}
        print(json.dumps(results[name]), flush=True)
    print(json.dumps({"summary": {k: v["responses_per_s"] for k, v in results.items()}, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
