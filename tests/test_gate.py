"""The promotion gate (evaluation/gate.py) and the metrics behind it (evaluation/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from concise_rl.config import GateConfig
from concise_rl.evaluation.gate import evaluate_gate, length_reduction_pct, length_reductions
from concise_rl.evaluation.metrics import bootstrap_ci, ids_hash, macro_average, paired_difference, pass_at_1, summarise

GATE = GateConfig(max_accuracy_drop=0.02, min_length_reduction_pct=20.0)
N = 400
IDS = ids_hash([f"p{i}" for i in range(N)])


def solved(k: int, n: int = N, offset: int = 0) -> list[float]:
    """Per-problem pass@1 with problems offset .. offset+k-1 solved (wrapping)."""
    return [1.0 if (i - offset) % n < k else 0.0 for i in range(n)]


def res(per_problem: list[float], length: float, ids: str = IDS) -> dict:
    return {"accuracy": float(np.mean(per_problem)), "mean_length": length, "per_problem": per_problem,
            "problem_ids_hash": ids}


def ev(**temps: tuple[list[float], float]) -> dict:
    """{"heldout": {"0.0": {...}, "0.6": {...}}} from t0_0=(per_problem, mean_length), t0_6=(...)."""
    return {"heldout": {key[1:].replace("_", "."): res(pp, length) for key, (pp, length) in temps.items()}}


def by_name(verdict: dict) -> dict[str, dict]:
    return {c["name"]: c for c in verdict["criteria"]}


ACC = "accuracy change, 95% CI lower bound"
PARENT = ev(t0_0=(solved(320), 1000.0), t0_6=(solved(312), 1100.0))


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
    cand = ev(t0_0=(solved(320), 600.0), t0_6=(solved(312), 770.0))
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is True
    crit = by_name(verdict)
    assert set(crit) == {f"heldout@T=0.0 {ACC}", "heldout@T=0.0 length reduction %",
                         f"heldout@T=0.6 {ACC}", "heldout@T=0.6 length reduction %"}
    acc = crit[f"heldout@T=0.0 {ACC}"]
    assert (acc["value"], acc["difference"], acc["ci"], acc["threshold"], acc["n"]) == (0.0, 0.0, [0.0, 0.0], -0.02, N)
    assert crit["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(40.0)
    assert crit["heldout@T=0.6 length reduction %"]["value"] == pytest.approx(30.0)


def test_one_problem_lost_out_of_400_is_non_inferior():
    cand = ev(t0_0=(solved(319), 600.0))
    acc = by_name(evaluate_gate(cand, PARENT, GATE))[f"heldout@T=0.0 {ACC}"]
    assert acc["difference"] == pytest.approx(-1 / N)
    assert -0.02 < acc["value"] <= -1 / N and acc["passed"]


def test_a_clear_drop_fails_naming_exactly_the_failing_criteria():
    # T=0.0: same problems solved, only 10% shorter. T=0.6: 32 problems (8 points) lost, 50% shorter.
    cand = ev(t0_0=(solved(320), 900.0), t0_6=(solved(280), 550.0))
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is False
    failing = {c["name"]: c for c in verdict["criteria"] if not c["passed"]}
    assert set(failing) == {"heldout@T=0.0 length reduction %", f"heldout@T=0.6 {ACC}"}
    assert failing[f"heldout@T=0.6 {ACC}"]["difference"] == pytest.approx(-0.08)
    assert failing[f"heldout@T=0.6 {ACC}"]["value"] < -0.08
    assert failing["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(10.0)


def test_an_equal_score_on_a_small_set_does_not_prove_non_inferiority():
    # 30 problems: the candidate gains 2 and loses 2. The point difference is 0, but
    # the paired CI reaches about -13 points, so "at most 2 points worse" is not shown.
    parent = {"aime": {"0.6": res(solved(15, 30), 1000.0, "aime")}}
    cand = {"aime": {"0.6": res(solved(15, 30, offset=2), 500.0, "aime")}}
    acc = by_name(evaluate_gate(cand, parent, GATE))[f"aime@T=0.6 {ACC}"]
    assert acc["difference"] == 0.0 and not acc["passed"]
    assert -0.2 < acc["value"] < -0.05


def test_accuracy_gain_passes_with_a_positive_interval():
    cand = ev(t0_0=(solved(360), 500.0), t0_6=(solved(340), 500.0))
    crit = by_name(evaluate_gate(cand, PARENT, GATE))
    assert crit[f"heldout@T=0.0 {ACC}"]["difference"] == pytest.approx(0.10)
    assert crit[f"heldout@T=0.0 {ACC}"]["value"] > 0 and crit[f"heldout@T=0.0 {ACC}"]["passed"]


def test_longer_candidate_fails_with_negative_reduction():
    cand = ev(t0_0=(solved(320), 1200.0), t0_6=(solved(312), 500.0))
    crit = by_name(evaluate_gate(cand, PARENT, GATE))
    assert crit["heldout@T=0.0 length reduction %"]["value"] == pytest.approx(-20.0)
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is False


def test_delta_zero_is_met_by_identical_results():
    crit = by_name(evaluate_gate(ev(t0_0=(solved(200), 75.0)), ev(t0_0=(solved(200), 100.0)),
                                 GateConfig(max_accuracy_drop=0.0, min_length_reduction_pct=25.0)))
    assert crit[f"heldout@T=0.0 {ACC}"]["passed"] is True
    assert crit["heldout@T=0.0 length reduction %"]["value"] == 25.0
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is True


def test_reduction_exactly_r_passes():
    parent, cand = ev(t0_0=(solved(200), 100.0)), ev(t0_0=(solved(200), 80.0))
    crit = by_name(evaluate_gate(cand, parent, GATE))
    assert crit["heldout@T=0.0 length reduction %"]["value"] == 20.0
    assert crit["heldout@T=0.0 length reduction %"]["passed"] is True


def test_reduction_just_below_r_fails():
    parent, cand = ev(t0_0=(solved(200), 1000.0)), ev(t0_0=(solved(200), 801.0))  # 19.9 %
    assert by_name(evaluate_gate(cand, parent, GATE))["heldout@T=0.0 length reduction %"]["passed"] is False


def test_confidence_level_names_the_criterion_and_widens_the_interval():
    cand = ev(t0_0=(solved(319, offset=3), 600.0))
    at95 = by_name(evaluate_gate(cand, PARENT, GATE))[f"heldout@T=0.0 {ACC}"]
    at99 = by_name(evaluate_gate(cand, PARENT, GateConfig(confidence=0.99)))[
        "heldout@T=0.0 accuracy change, 99% CI lower bound"]
    assert at99["value"] < at95["value"]


def test_only_shared_sets_and_temperatures_are_gated():
    cand = ev(t0_0=(solved(320), 600.0), t1_0=(solved(0), 5000.0))  # T=1.0 is not in the parent
    cand["other"] = {"0.0": res(solved(0), 9999.0)}  # nor is this set
    verdict = evaluate_gate(cand, PARENT, GATE)
    assert verdict["passed"] is True
    assert set(by_name(verdict)) == {f"heldout@T=0.0 {ACC}", "heldout@T=0.0 length reduction %"}


def test_gate_sets_limits_the_judged_sets():
    parent = {**PARENT, "hard": {"0.0": res(solved(300), 2000.0)}}
    cand = {**ev(t0_0=(solved(320), 600.0), t0_6=(solved(312), 770.0)), "hard": {"0.0": res(solved(100), 1990.0)}}
    assert evaluate_gate(cand, parent, GATE)["passed"] is False
    assert evaluate_gate(cand, parent, GateConfig(sets=["heldout"]))["passed"] is True
    with pytest.raises(ValueError, match=r"gate.sets names \['missing'\]"):
        evaluate_gate(cand, parent, GateConfig(sets=["missing"]))


def test_results_without_per_problem_figures_are_refused():
    old = {"heldout": {"0.0": {"accuracy": 0.8, "mean_length": 500.0}}}
    with pytest.raises(ValueError, match=r"no per-problem results.*re-run `concise-rl evaluate`"):
        evaluate_gate(old, PARENT, GATE)


def test_results_on_different_problems_are_refused():
    cand = {"heldout": {"0.0": res(solved(320), 600.0, ids="other")}}
    with pytest.raises(ValueError, match="different problems"):
        evaluate_gate(cand, PARENT, GATE)


def test_no_shared_set_raises():
    with pytest.raises(ValueError, match=r"share no evaluated set"):
        evaluate_gate({"a": {"0.0": res(solved(1), 1.0)}}, PARENT, GATE)


def test_no_shared_temperature_raises():
    with pytest.raises(ValueError, match=r"share no evaluated set and temperature"):
        evaluate_gate(ev(t1_0=(solved(1), 10.0)), PARENT, GATE)


def test_paired_ci_is_tighter_than_two_independent_ones():
    rng = np.random.default_rng(0)
    parent = (rng.random(500) < 0.7).astype(float)
    cand = parent.copy()
    flip = rng.choice(500, 20, replace=False)
    cand[flip] = 1 - cand[flip]
    paired = paired_difference(cand, parent, n_boot=2000)
    lo_c, hi_c = bootstrap_ci(cand, n_boot=2000)
    assert paired["difference"] == pytest.approx(cand.mean() - parent.mean())
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert (paired["ci"][1] - paired["ci"][0]) < (hi_c - lo_c) / 2
    with pytest.raises(ValueError, match="same problems"):
        paired_difference(cand, parent[:10])


def test_macro_average_is_the_unweighted_mean_over_sets():
    results = {"a": {"0.0": {"accuracy": 0.8, "mean_length": 100.0}, "0.6": {"accuracy": 0.6, "mean_length": 50.0}},
               "b": {"0.0": {"accuracy": 0.4, "mean_length": 300.0}}}
    macro = macro_average(results)
    assert macro["0.0"] == {"accuracy": pytest.approx(0.6), "mean_length": 200.0, "sets": 2}
    assert macro["0.6"] == {"accuracy": 0.6, "mean_length": 50.0, "sets": 1}


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
    assert s["median_length_correct"] == 30.0 and s["median_length_incorrect"] == 50.0
    assert s["per_problem"] == [0.5, 1.0, 0.0]
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
