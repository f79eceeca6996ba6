"""The promotion gate: phase 2 must keep accuracy and cut length against its parent.

For every evaluated set and temperature there are two criteria: the accuracy drop
(parent minus candidate, as a fraction) at most ``max_accuracy_drop``, and the
length reduction at least ``min_length_reduction_pct``. All must pass.
"""

from __future__ import annotations

from concise_rl.config import GateConfig

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
        bench: {t: length_reduction_pct(candidate[bench][t]["mean_length"], parent[bench][t]["mean_length"])
                for t in temps if t in parent.get(bench, {})}
        for bench, temps in candidate.items()
        if bench in parent
    }


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
    for bench, temps in reductions.items():
        for t, reduction in temps.items():
            drop = parent[bench][t]["accuracy"] - candidate[bench][t]["accuracy"]
            criteria.append(
                {
                    "name": f"{bench}@T={t} accuracy drop",
                    "value": round(drop, 6),
                    "threshold": cfg.max_accuracy_drop,
                    "passed": drop <= cfg.max_accuracy_drop + _EPS,
                }
            )
            criteria.append(
                {
                    "name": f"{bench}@T={t} length reduction %",
                    "value": round(reduction, 4),
                    "threshold": cfg.min_length_reduction_pct,
                    "passed": reduction >= cfg.min_length_reduction_pct - _EPS,
                }
            )
    if not criteria:
        raise ValueError("the candidate and its parent share no evaluated set and temperature; nothing to gate on")
    return {"passed": all(c["passed"] for c in criteria), "criteria": criteria}
