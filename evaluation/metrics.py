"""Accuracy with a bootstrap confidence interval over problems, and length statistics."""

from __future__ import annotations

import numpy as np


def pass_at_1(correct: np.ndarray) -> np.ndarray:
    """Per-problem pass@1: the mean over that problem's samples.  correct: [problems, samples]."""
    return np.asarray(correct, dtype=float).mean(axis=1)


def bootstrap_ci(per_problem: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems (not samples) with replacement."""
    per_problem = np.asarray(per_problem, dtype=float)
    if per_problem.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_problem.size, size=(n_boot, per_problem.size))
    means = per_problem[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarise(correct: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, *, n_boot: int, seed: int = 0) -> dict:
    """Accuracy (pass@1 with a 95% CI) and response lengths in tokens.

    correct, lengths, truncated: [problems, samples].
    """
    correct = np.asarray(correct, dtype=bool)
    lengths = np.asarray(lengths, dtype=float)
    per_problem = pass_at_1(correct)
    lo, hi = bootstrap_ci(per_problem, n_boot=n_boot, seed=seed)
    flat_len, flat_ok = lengths.ravel(), correct.ravel()
    return {
        "accuracy": float(per_problem.mean()),
        "accuracy_ci": [lo, hi],
        "mean_length": float(flat_len.mean()),
        "median_length": float(np.median(flat_len)),
        "mean_length_correct": float(flat_len[flat_ok].mean()) if flat_ok.any() else None,
        "mean_length_incorrect": float(flat_len[~flat_ok].mean()) if (~flat_ok).any() else None,
        "truncation_rate": float(np.asarray(truncated, dtype=float).mean()),
        "n": int(correct.shape[0]),
        "samples": int(correct.shape[1]),
    }
