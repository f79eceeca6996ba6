"""Accuracy with bootstrap confidence intervals over problems, length statistics, paired comparisons."""

from __future__ import annotations

import hashlib

import numpy as np


def pass_at_1(correct: np.ndarray) -> np.ndarray:
    """Per-problem pass@1: the mean over that problem's samples.  correct: [problems, samples]."""
    return np.asarray(correct, dtype=float).mean(axis=1)


def bootstrap_ci(
    per_problem: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems (not samples) with replacement."""
    per_problem = np.asarray(per_problem, dtype=float)
    if per_problem.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_problem.size, size=(n_boot, per_problem.size))
    means = per_problem[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_difference(
    candidate: np.ndarray, parent: np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict:
    """Mean of candidate - parent per problem with a paired percentile bootstrap CI.

    Both arrays hold per-problem pass@1 on the same problems in the same order;
    resampling problems keeps each pair together, so the CI reflects how the two
    models differ on the same questions (much tighter than two independent CIs).
    """
    candidate, parent = np.asarray(candidate, dtype=float), np.asarray(parent, dtype=float)
    if candidate.shape != parent.shape:
        raise ValueError(f"paired comparison needs the same problems: {candidate.shape} vs {parent.shape} results")
    diff = candidate - parent
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, alpha=alpha, seed=seed)
    return {"difference": float(diff.mean()) if diff.size else float("nan"), "ci": [lo, hi], "n": int(diff.size)}


def ids_hash(problem_ids: list[str]) -> str:
    """Which problems, in which order, a result covers (paired comparisons check it)."""
    return hashlib.sha256("\n".join(problem_ids).encode()).hexdigest()[:16]


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def summarise(
    correct: np.ndarray,
    lengths: np.ndarray,
    truncated: np.ndarray,
    *,
    n_boot: int,
    seed: int = 0,
    problem_ids: list[str] | None = None,
) -> dict:
    """Accuracy (pass@1 with a 95% CI), response lengths in tokens, and per-problem pass@1.

    correct, lengths, truncated: [problems, samples]. ``per_problem`` (pass@1 of
    each problem, in order) and ``problem_ids_hash`` let two models be compared
    problem by problem.
    """
    correct = np.asarray(correct, dtype=bool)
    lengths = np.asarray(lengths, dtype=float)
    per_problem = pass_at_1(correct)
    lo, hi = bootstrap_ci(per_problem, n_boot=n_boot, seed=seed)
    flat_len, flat_ok = lengths.ravel(), correct.ravel()
    out = {
        "accuracy": float(per_problem.mean()),
        "accuracy_ci": [lo, hi],
        "mean_length": float(flat_len.mean()),
        "median_length": float(np.median(flat_len)),
        "mean_length_correct": _mean(flat_len[flat_ok]),
        "mean_length_incorrect": _mean(flat_len[~flat_ok]),
        "median_length_correct": _median(flat_len[flat_ok]),
        "median_length_incorrect": _median(flat_len[~flat_ok]),
        "truncation_rate": float(np.asarray(truncated, dtype=float).mean()),
        "n": int(correct.shape[0]),
        "samples": int(correct.shape[1]),
        "per_problem": [round(float(x), 6) for x in per_problem],
    }
    if problem_ids is not None:
        out["problem_ids_hash"] = ids_hash(problem_ids)
    return out


def macro_average(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per temperature, the unweighted mean over sets of accuracy and mean length.

    results: {set: {temperature: summary}}; a temperature counts only the sets evaluated at it.
    """
    temps: dict[str, list[dict]] = {}
    for by_temp in results.values():
        for t, m in by_temp.items():
            temps.setdefault(t, []).append(m)
    return {
        t: {
            "accuracy": float(np.mean([m["accuracy"] for m in ms])),
            "mean_length": float(np.mean([m["mean_length"] for m in ms])),
            "sets": len(ms),
        }
        for t, ms in temps.items()
    }
