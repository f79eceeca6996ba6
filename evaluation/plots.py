"""PNG plots for people: training curves like the paper's figures, curated pass rates, the ablation."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

from concise_rl.evaluation.gate import length_reduction_pct

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, out: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close; returns ``out``."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(phases: dict[str, list[dict]], out: Path) -> Path:
    """Mean response length (all, correct, incorrect) and accuracy per PPO step, one column per phase."""
    fig, axes = plt.subplots(2, len(phases), figsize=(5.5 * len(phases), 7), squeeze=False, sharex="col")
    for col, (phase, rows) in enumerate(phases.items()):
        top, bottom = axes[0][col], axes[1][col]
        for key, label, style in (
            ("response_length", "all", "-"),
            ("response_length_correct", "correct", "--"),
            ("response_length_incorrect", "incorrect", ":"),
        ):
            top.plot(*_series(rows, key), style, label=label)
        top.set_title(f"{phase}: mean response length")
        top.set_ylabel("tokens")
        top.legend()
        top.grid(alpha=0.3)
        bottom.plot(*_series(rows, "accuracy"), color="tab:green")
        bottom.set_title(f"{phase}: training accuracy")
        bottom.set_xlabel("PPO step")
        bottom.set_ylabel("fraction correct")
        bottom.set_ylim(-0.02, 1.02)
        bottom.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_pass_rates(pass_rates: list[float], bands: dict[str, tuple[float, float]], out: Path) -> Path:
    """Histogram of curated pass rates with the phase-1 and phase-2 bands shaded."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(pass_rates, bins=[i / 20 for i in range(21)], color="tab:blue", edgecolor="white")
    for (name, (lo, hi)), color in zip(bands.items(), ("tab:red", "tab:green")):
        ax.axvspan(lo, hi, alpha=0.12, color=color, label=f"{name} band [{lo:g}, {hi:g}]")
    ax.set_xlabel("pass rate under the current model")
    ax.set_ylabel("problems")
    ax.set_title(f"Curated pass rates ({len(pass_rates)} candidates)")
    ax.legend()
    return save_figure(fig, out)


_KIND_STYLES = {"ppo": ("tab:blue", "PPO (lambda, aggregation)"), "grpo": ("tab:orange", "TRL GRPO (loss type)"),
                "band": ("tab:green", "PPO on a pass-rate band")}


def plot_ablation(start: dict[str, dict], variants: dict[str, dict[str, dict]], out: Path) -> Path:
    """Accuracy against length reduction, one point per variant and one panel per temperature.

    ``start`` is the start model's {temperature: metrics}; ``variants`` maps each
    variant name to the same for its trained model. Error bars are the 95% CIs.
    """
    temps = list(start)
    fig, axes = plt.subplots(1, len(temps), figsize=(6.5 * len(temps), 5), squeeze=False)
    for ax, t in zip(axes[0], temps):
        base = start[t]
        lo, hi = base["accuracy_ci"]
        ax.errorbar([0.0], [100 * base["accuracy"]], yerr=[[100 * (base["accuracy"] - lo)], [100 * (hi - base["accuracy"])]],
                    fmt="*", markersize=12, color="black", capsize=3, label="start model")
        labelled = set()
        for name, evals in variants.items():
            m = evals[t]
            x = length_reduction_pct(m["mean_length"], base["mean_length"])
            lo, hi = m["accuracy_ci"]
            kind = name.split("-")[0]
            color, label = _KIND_STYLES.get(kind, ("tab:gray", kind))
            ax.errorbar([x], [100 * m["accuracy"]], yerr=[[100 * (m["accuracy"] - lo)], [100 * (hi - m["accuracy"])]],
                        fmt="o", color=color, capsize=3, alpha=0.8, label=None if kind in labelled else label)
            labelled.add(kind)
            ax.annotate(name, (x, 100 * m["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(0.0, color="gray", lw=0.8, ls=":")
        ax.set_title(f"T = {t}")
        ax.set_xlabel("length reduction vs the start model (%)")
        ax.set_ylabel("accuracy % (95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Phase-2 ablation: held-out accuracy against length reduction")
    return save_figure(fig, out)


def plot_seeds(rows: list[dict], targets: dict[str, float], out: Path, set_name: str = "heldout") -> Path:
    """bench.seeds' runs at a glance: per run and temperature, phase 2's length cut (left) and its paired
    accuracy change against phase 1 with the 95% CI (right), with the target lines.

    ``rows`` are bench.seeds' rows (``cut@T``, ``change@T``, ``ci_low@T``, ``ci_high@T``, ``run``);
    ``targets`` holds ``min_cut_pct``, ``min_change_pts`` and ``min_ci_low_pts``.
    """
    temps = sorted({k.split("@")[1] for k in rows[0] if k.startswith("cut@")}, key=float)
    labels = [r["run"] for r in rows]
    width = 0.8 / len(temps)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(rows) + 5), 4.5))
    for i, t in enumerate(temps):
        x = [j + (i - (len(temps) - 1) / 2) * width for j in range(len(rows))]
        left.bar(x, [r[f"cut@{t}"] for r in rows], width, label=f"T = {t}")
        change = [r[f"change@{t}"] for r in rows]
        err = [[c - r[f"ci_low@{t}"] for c, r in zip(change, rows)],
               [r[f"ci_high@{t}"] - c for c, r in zip(change, rows)]]
        right.errorbar(x, change, yerr=err, fmt="o", capsize=3, label=f"T = {t}")
    left.axhline(targets["min_cut_pct"], color="tab:red", ls="--", lw=1, label=f"target {targets['min_cut_pct']:g}%")
    left.set_ylabel("phase-2 length cut vs phase 1 (%)")
    left.set_ylim(0, 1.3 * max(max(r[f"cut@{t}"] for t in temps for r in rows), targets["min_cut_pct"]))
    right.axhline(0.0, color="gray", lw=0.8, ls=":")
    right.axhline(targets["min_change_pts"], color="tab:red", ls="--", lw=1,
                  label=f"change target {targets['min_change_pts']:+g}")
    right.axhline(targets["min_ci_low_pts"], color="tab:red", ls=":", lw=1,
                  label=f"CI lower-bound target {targets['min_ci_low_pts']:+g}")
    right.set_ylabel("accuracy change vs phase 1 (points, 95% CI)")
    for ax in (left, right):
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.suptitle(f"Phase 2 over seeds: {len(rows)} run(s), {set_name} set")
    return save_figure(fig, out)
