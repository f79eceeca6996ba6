"""The promotion gate: phase 2 must keep accuracy and cut length against its parent.

For every gated set and temperature there are two criteria:

- accuracy is non-inferior: the lower bound of the paired bootstrap CI of
  (candidate - parent) per-problem pass@1 is at least ``-max_accuracy_drop``
  (delta). Pairing by problem keeps the test honest on small sets: a candidate
  that is one point worse on 30 AIME problems is not "within 2 points" when the
  CI of that difference reaches -10.
- the mean response length is at least ``min_length_reduction_pct`` (r) shorter.

All must pass. The verdict names every criterion with its value and threshold;
the accuracy criterion also carries the point difference and its CI.
"""

from __future__ import annotations

import numpy as np

from concise_rl.config import GateConfig
from concise_rl.evaluation.metrics import paired_difference

# Figures exactly at a threshold pass: 1 - 80/100 is 0.19999999999999996 in floats.
_EPS = 1e-9


def length_reduction_pct(candidate_len: float, parent_len: float) -> float:
    """How much shorter the candidate's responses are, in percent of the parent's."""
    if parent_len <= 0:
        return 0.0
    return 100.0 * (1.0 - candidate_len / parent_len)


def length_reductions(candidate: dict, parent: dict) -> dict[str, dict[str, float]]:
    """{set: {temperature: reduction %}} for every set and temperature both evaluated."""
    return {
        bench: {
            t: length_reduction_pct(m["mean_length"], parent[bench][t]["mean_length"])
            for t, m in temps.items()
            if t in parent[bench]
        }
        for bench, temps in candidate.items()
        if bench in parent
    }


def accuracy_comparison(candidate: dict, parent: dict, cfg: GateConfig, where: str) -> dict:
    """The paired difference of per-problem pass@1 (candidate - parent) for one set and temperature."""
    for label, m in (("candidate", candidate), ("parent", parent)):
        if "per_problem" not in m:
            raise ValueError(
                f"{where}: the {label}'s evaluation has no per-problem results (it predates the paired gate); "
                "re-run `concise-rl evaluate` for it"
            )
    if candidate.get("problem_ids_hash") != parent.get("problem_ids_hash") or len(candidate["per_problem"]) != len(
        parent["per_problem"]
    ):
        raise ValueError(f"{where}: the two models were evaluated on different problems; evaluate both on the same set")
    return paired_difference(
        np.array(candidate["per_problem"]),
        np.array(parent["per_problem"]),
        n_boot=cfg.bootstrap_samples,
        alpha=1 - cfg.confidence,
        seed=cfg.seed,
    )


def criterion_text(c: dict) -> tuple[str, str]:
    """One criterion of a verdict as every table shows it: (value, threshold), accuracy in points and length
    cut in percent (the verdict itself keeps fractions and percent)."""
    if "ci" in c:  # the value is the CI's lower bound of the paired accuracy change
        return f"{100 * c['value']:+.1f} pts", f"{100 * c['threshold']:+.1f} pts"
    return f"{c['value']:.1f}%", f"{c['threshold']:.1f}%"


def evaluate_gate(candidate: dict, parent: dict, cfg: GateConfig) -> dict:
    """The verdict with every criterion, its value, threshold and result."""
    criteria = []
    reductions = length_reductions(candidate, parent)
    if cfg.sets is not None:
        missing = sorted(set(cfg.sets) - set(reductions))
        if missing:
            raise ValueError(
                f"gate.sets names {missing}, which were not evaluated for both models; evaluated: {sorted(reductions)}"
            )
        reductions = {bench: temps for bench, temps in reductions.items() if bench in cfg.sets}
    level = f"{100 * cfg.confidence:g}%"
    for bench, temps in reductions.items():
        for t, reduction in temps.items():
            where = f"{bench}@T={t}"
            paired = accuracy_comparison(candidate[bench][t], parent[bench][t], cfg, where)
            lower = paired["ci"][0]
            criteria.append(
                {
                    "name": f"{where} accuracy change, {level} CI lower bound",
                    "set": bench, "T": t, "kind": "accuracy",
                    "value": round(lower, 6),
                    "threshold": -cfg.max_accuracy_drop,
                    "passed": lower >= -cfg.max_accuracy_drop - _EPS,
                    "difference": round(paired["difference"], 6),
                    "ci": [round(x, 6) for x in paired["ci"]],
                    "n": paired["n"],
                }
            )
            criteria.append(
                {
                    "name": f"{where} length reduction %",
                    "set": bench, "T": t, "kind": "length",
                    "value": round(reduction, 4),
                    "threshold": cfg.min_length_reduction_pct,
                    "passed": reduction >= cfg.min_length_reduction_pct - _EPS,
                }
            )
    if not criteria:
        raise ValueError("the candidate and its parent share no evaluated set and temperature; nothing to gate on")
    return {"passed": all(c["passed"] for c in criteria), "criteria": criteria}
