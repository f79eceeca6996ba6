"""The promotion gate (evaluation/gate.py) and the metrics behind it (evaluation/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from concise_rl.config import GateConfig
from evaluation.gate import evaluate_gate, length_reduction_pct, length_reductions
from evaluation.metrics import bootstrap_ci, pass_at_1, summarise

GATE = GateConfig(max_accuracy_drop=0.02, min_length_reduction_pct=20.0)


def ev(**temps: tuple[float, float]) -> dict:
    """{"heldout": {"0.0": {...}, "0.6": {...}}} from t0_0=(accuracy, mean_length), t0_6=(...)."""
    return {
        "heldout": {
            key[1:].replace("_", "."): {"accuracy": acc, "mean_length": length}
            for key, (acc, length) in temps.items()
        }
    }


def by_name(verdict: dict) -> dict[str, dict]:
    return {c["name"]: c for c in verdict["criteria"]}


PARENT = ev(t0_0=(0.80, 1000.0), t0_6=(0.78, 1100.0))


# ----------------------------------------------------------------------------- length_reduction_pct
def test_length_reduction_pct_values():
    assert length_reduction_pct(50, 100) == 50.0
    assert length_reduction_pct(100, 100) == 0.0
    assert length_reduction_pct(150, 100) == -50.0
    assert length_reduction_pct(0, 100) == 100.0
    assert length_reduction_pct(25, 200) == 87.5
    # No parent length to compare with: no reduction.
    assert length_reduction_pct(10, 0) == 0.0


def test_length_reductions_only_shared_sets_and_temperatures():
    cand = {
        "heldout": {"0.0": {"accuracy": 0.8, "mean_length": 500.0}, "1.0": {"accuracy": 0.5, "mean_length": 1.0}},
        "extra": {"0.0": {"accuracy": 0.1, "mean_length": 10.0}},
    }
    parent = {"heldout": {"0.0": {"accuracy": 0.8, "mean_length": 1000.0}, "0.6": {"accuracy": 0.7, "mean_length": 9.0}}}
    assert length_reductions(cand, parent) == {"heldout": {"0.0": 50.0}}


# ----------------------------------------------------------------------------- evaluate_gate
def test_passes_when_accuracy_holds_and_length_drops():
    cand = ev(t0_0=(0.79, 600.0), t0_6=(0.78, 770.0))
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is True
    crit = by_name(verdict)
    assert set(crit) == {
        "heldout@T=0.0 accuracy drop",
        "heldout@T=0.0 length reduction %",
        "heldout@T=0.6 accuracy drop",
        "heldout@T=0.6 length reduction %",
    }
    assert all(c["passed"] for c in crit.values())
    assert crit["heldout@T=0.0 accuracy drop"]["value"] == pytest.approx(0.01)
    assert crit["heldout@T=0.0 accuracy drop"]["threshold"] == 0.02
    assert crit["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(40.0)
    assert crit["heldout@T=0.0 length reduction %"]["threshold"] == 20.0
    assert crit["heldout@T=0.6 accuracy drop"]["value"] == pytest.approx(0.0)
    assert crit["heldout@T=0.6 length reduction %"]["value"] == pytest.approx(30.0)


def test_accuracy_gain_counts_as_negative_drop():
    cand = ev(t0_0=(0.90, 500.0), t0_6=(0.85, 500.0))
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is True
    assert by_name(verdict)["heldout@T=0.0 accuracy drop"]["value"] == pytest.approx(-0.10)


def test_fails_naming_exactly_the_failing_criteria():
    # T=0.0: accuracy fine, only 10% shorter. T=0.6: 8 points less accurate, 50% shorter.
    cand = ev(t0_0=(0.80, 900.0), t0_6=(0.70, 550.0))
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is False
    failing = {c["name"]: c for c in verdict["criteria"] if not c["passed"]}
    assert set(failing) == {"heldout@T=0.0 length reduction %", "heldout@T=0.6 accuracy drop"}
    assert failing["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(10.0)
    assert failing["heldout@T=0.0 length reduction %"]["threshold"] == 20.0
    assert failing["heldout@T=0.6 accuracy drop"]["value"] == pytest.approx(0.08)
    assert failing["heldout@T=0.6 accuracy drop"]["threshold"] == 0.02
    passing = {c["name"] for c in verdict["criteria"] if c["passed"]}
    assert passing == {"heldout@T=0.0 accuracy drop", "heldout@T=0.6 length reduction %"}


def test_a_single_failing_criterion_fails_the_gate():
    cand = ev(t0_0=(0.79, 600.0), t0_6=(0.755, 600.0))  # T=0.6 drop 0.025 > 0.02
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is False
    assert [c["name"] for c in verdict["criteria"] if not c["passed"]] == ["heldout@T=0.6 accuracy drop"]


def test_longer_candidate_fails_with_negative_reduction():
    cand = ev(t0_0=(0.80, 1200.0), t0_6=(0.78, 500.0))
    crit = by_name(evaluate_gate(cand, PARENT, GATE))
    assert crit["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(-20.0)
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is False


def test_drop_exactly_delta_passes():
    # 0.52 - 0.50 is 0.020000000000000018 in floating point; it must still count as 0.02.
    parent = ev(t0_0=(0.52, 1000.0))
    cand = ev(t0_0=(0.50, 500.0))
    crit = by_name(evaluate_gate(cand, parent, GATE))
    assert crit["heldout@T=0.0 accuracy drop"]["value"] == pytest.approx(0.02)
    assert crit["heldout@T=0.0 accuracy drop"]["passed"] is True


def test_drop_just_above_delta_fails():
    parent = ev(t0_0=(0.521, 1000.0))
    cand = ev(t0_0=(0.50, 500.0))
    crit = by_name(evaluate_gate(cand, parent, GATE))
    assert crit["heldout@T=0.0 accuracy drop"]["passed"] is False


def test_reduction_exactly_r_passes_when_exact_in_floating_point():
    # 75 vs 100 is exactly 25.0 %.
    parent = ev(t0_0=(0.5, 100.0))
    cand = ev(t0_0=(0.5, 75.0))
    crit = by_name(evaluate_gate(cand, parent, GateConfig(max_accuracy_drop=0.0, min_length_reduction_pct=25.0)))
    assert crit["heldout@T=0.0 length reduction %"]["value"] == 25.0
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is True
    # And an accuracy drop of exactly 0 meets delta = 0.
    assert crit["heldout@T=0.0 accuracy drop"]["passed"] is True


def test_reduction_exactly_r_passes():
    parent = ev(t0_0=(0.5, 100.0))
    cand = ev(t0_0=(0.5, 80.0))
    crit = by_name(evaluate_gate(cand, parent, GATE))
    assert crit["heldout@T=0.0 length reduction %"]["value"] == 20.0
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is True


def test_reduction_just_below_r_fails():
    parent = ev(t0_0=(0.5, 1000.0))
    cand = ev(t0_0=(0.5, 801.0))  # 19.9 %
    crit = by_name(evaluate_gate(cand, parent, GATE))
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is False


def test_only_shared_sets_and_temperatures_are_gated():
    cand = ev(t0_0=(0.79, 600.0), t1_0=(0.0, 5000.0))  # T=1.0 is not in the parent
    cand["other"] = {"0.0": {"accuracy": 0.0, "mean_length": 9999.0}}  # nor is this set
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is True
    assert set(by_name(verdict)) == {"heldout@T=0.0 accuracy drop", "heldout@T=0.0 length reduction %"}


def test_several_sets_are_all_gated():
    parent = {**PARENT, "math500": {"0.0": {"accuracy": 0.6, "mean_length": 2000.0}}}
    cand = {**ev(t0_0=(0.79, 600.0), t0_6=(0.78, 770.0)), "math500": {"0.0": {"accuracy": 0.5, "mean_length": 1000.0}}}
    verdict = evaluate_gate(cand, parent, GATE)
    assert verdict["passed"] is False
    assert len(verdict["criteria"]) == 6
    assert [c["name"] for c in verdict["criteria"] if not c["passed"]] == ["math500@T=0.0 accuracy drop"]


def test_no_shared_set_raises():
    with pytest.raises(ValueError, match=r"share no evaluated set"):
        evaluate_gate({"a": {"0.0": {"accuracy": 1.0, "mean_length": 1.0}}}, PARENT, GATE)


def test_no_shared_temperature_raises():
    with pytest.raises(ValueError, match=r"share no evaluated set and temperature"):
        evaluate_gate(ev(t1_0=(0.8, 10.0)), PARENT, GATE)


# ----------------------------------------------------------------------------- metrics
def test_pass_at_1_is_the_row_mean():
    assert pass_at_1(np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])).tolist() == [0.75, 0.0, 1.0]


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0, 0.25])
def test_bootstrap_ci_of_a_constant_is_that_constant(c):
    assert bootstrap_ci(np.full(16, c), n_boot=200) == (c, c)


def test_bootstrap_ci_of_a_non_dyadic_constant():
    lo, hi = bootstrap_ci(np.full(10, 0.7), n_boot=200)
    assert lo == pytest.approx(0.7) and hi == pytest.approx(0.7)


def test_bootstrap_ci_of_empty_is_nan():
    lo, hi = bootstrap_ci(np.array([]))
    assert np.isnan(lo) and np.isnan(hi)


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    small = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0] * 2, dtype=float)  # n=20, mean 0.6
    large = np.tile(small, 25)  # n=500, same mean
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000, seed=0)
    lo_l, hi_l = bootstrap_ci(large, n_boot=2000, seed=0)
    for lo, hi in ((lo_s, hi_s), (lo_l, hi_l)):
        assert 0.0 <= lo < 0.6 < hi <= 1.0
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    # Normal approximation: half-width ~ 1.96 * sqrt(0.24 / n).
    assert (hi_s - lo_s) / 2 == pytest.approx(1.96 * np.sqrt(0.24 / 20), rel=0.25)
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * np.sqrt(0.24 / 500), rel=0.25)


def test_bootstrap_ci_is_deterministic_given_the_seed():
    x = np.array([1, 0, 0, 1, 1, 0, 1], dtype=float)
    assert bootstrap_ci(x, n_boot=300, seed=3) == bootstrap_ci(x, n_boot=300, seed=3)


def test_summarise_exact_values():
    correct = np.array([[1, 0], [1, 1], [0, 0]])
    lengths = np.array([[10, 20], [30, 40], [50, 60]])
    truncated = np.array([[0, 0], [0, 0], [0, 1]])
    s = summarise(correct, lengths, truncated, n_boot=500)
    assert s["accuracy"] == pytest.approx(0.5)  # mean of per-problem 0.5, 1.0, 0.0
    assert s["mean_length"] == pytest.approx(35.0)
    assert s["median_length"] == pytest.approx(35.0)
    assert s["mean_length_correct"] == pytest.approx(80 / 3)  # 10, 30, 40
    assert s["mean_length_incorrect"] == pytest.approx(130 / 3)  # 20, 50, 60
    assert s["truncation_rate"] == pytest.approx(1 / 6)
    assert s["n"] == 3
    assert s["samples"] == 2
    lo, hi = s["accuracy_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_summarise_accuracy_is_per_problem_mean_not_flat_mean():
    # Same as a flat mean when every problem has the same number of samples.
    correct = np.array([[1, 1, 1, 0], [0, 0, 0, 0]])
    lengths = np.array([[1, 2, 3, 4], [5, 6, 7, 100]])
    s = summarise(correct, lengths, np.zeros_like(correct), n_boot=100)
    assert s["accuracy"] == pytest.approx(0.375)
    assert s["median_length"] == pytest.approx(4.5)
    assert s["mean_length"] == pytest.approx(128 / 8)
    assert s["truncation_rate"] == 0.0
    assert (s["n"], s["samples"]) == (2, 4)


def test_summarise_all_correct_has_no_incorrect_length():
    s = summarise(np.ones((2, 1)), np.array([[4], [6]]), np.zeros((2, 1)), n_boot=100)
    assert s["accuracy"] == 1.0
    assert s["accuracy_ci"] == [1.0, 1.0]
    assert s["mean_length_correct"] == pytest.approx(5.0)
    assert s["mean_length_incorrect"] is None
    assert (s["n"], s["samples"]) == (2, 1)


def test_summarise_none_correct_has_no_correct_length():
    s = summarise(np.zeros((2, 2)), np.array([[4, 4], [6, 6]]), np.ones((2, 2)), n_boot=100)
    assert s["accuracy"] == 0.0
    assert s["mean_length_correct"] is None
    assert s["mean_length_incorrect"] == pytest.approx(5.0)
    assert s["truncation_rate"] == 1.0


def test_gate_judges_only_the_named_sets() -> None:
    parent = {"heldout": {"0.0": {"accuracy": 0.8, "mean_length": 100.0}},
              "hard": {"0.0": {"accuracy": 0.4, "mean_length": 200.0}}}
    candidate = {"heldout": {"0.0": {"accuracy": 0.8, "mean_length": 50.0}},
                 "hard": {"0.0": {"accuracy": 0.2, "mean_length": 190.0}}}
    assert not evaluate_gate(candidate, parent, GateConfig())["passed"]
    verdict = evaluate_gate(candidate, parent, GateConfig(sets=["heldout"]))
    assert verdict["passed"] and all(c["name"].startswith("heldout@") for c in verdict["criteria"])
    with pytest.raises(ValueError, match=r"gate.sets names \['aime'\]"):
        evaluate_gate(candidate, parent, GateConfig(sets=["aime"]))
