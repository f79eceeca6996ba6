"""PNG plots for people: training curves like the paper's figures, and curated pass rates."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
