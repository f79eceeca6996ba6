"""The evaluation report: a markdown table per temperature and two plots.

- ``accuracy_vs_length.png``: one panel per benchmark, accuracy against mean
  response length, one marker per model and temperature (the paper's table as a
  picture: concise and accurate is top left).
- ``length_histograms.png``: one panel per model, response lengths of correct and
  incorrect responses (the paper's observation that wrong answers run longer).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from concise_rl.evaluation.metrics import macro_average
from concise_rl.evaluation.plots import save_figure
from concise_rl.evaluation.tables import GATE_HEADER, gate_rows, markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^vP*X"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _len(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def report_markdown(results: dict[str, dict], comparisons: dict[str, dict] | None = None) -> str:
    """results: {label: {"version", "uri", "eval": {set: {T: summary}}}}; comparisons: {label: verdict}."""
    lines = ["# Evaluation report", ""]
    lines += ["| model | uri |", "|---|---|"]
    lines += [f"| {label} | `{r['uri']}` |" for label, r in results.items()]
    temps = sorted({t for r in results.values() for by_t in r["eval"].values() for t in by_t}, key=float)
    for t in temps:
        lines += ["", f"## T = {t}", ""]
        lines += [
            "| model | set | n x samples | accuracy % [95% CI] | mean length | median | mean correct | "
            "mean incorrect | truncated % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in results.items():
            for bench, by_t in r["eval"].items():
                m = by_t.get(t)
                if m is None:
                    continue
                lo, hi = m["accuracy_ci"]
                lines.append(
                    f"| {label} | {bench} | {m['n']} x {m['samples']} | {_pct(m['accuracy'])} [{_pct(lo)}, {_pct(hi)}] "
                    f"| {_len(m['mean_length'])} | {_len(m['median_length'])} | {_len(m['mean_length_correct'])} "
                    f"| {_len(m['mean_length_incorrect'])} | {_pct(m['truncation_rate'])} |"
                )
            macro = macro_average(r["eval"]).get(t)
            if macro and macro["sets"] > 1:
                lines.append(
                    f"| {label} | **macro average** ({macro['sets']} sets) | | {_pct(macro['accuracy'])} "
                    f"| {_len(macro['mean_length'])} | | | | |"
                )
    for label, verdict in (comparisons or {}).items():
        lines += ["", f"## Gate: {label} — {'PASSED' if verdict['passed'] else 'FAILED'}", ""]
        lines += gate_table(verdict)
    return "\n".join(lines) + "\n"


def gate_table(verdict: dict) -> list[str]:
    """The verdict as a markdown table (evaluation/tables.py's rows, as every other table shows it)."""
    return markdown_table(GATE_HEADER, gate_rows(verdict))


def plot_accuracy_vs_length(results: dict[str, dict], out: Path) -> Path:
    """One panel per set: each model at each temperature as a point (mean length, accuracy with CI)."""
    sets = list(dict.fromkeys(bench for r in results.values() for bench in r["eval"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.8 * len(sets), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes[0], sets):
        for i, (label, r) in enumerate(results.items()):
            for j, (t, m) in enumerate(sorted(r["eval"].get(bench, {}).items(), key=lambda kv: float(kv[0]))):
                lo, hi = m["accuracy_ci"]
                ax.errorbar(
                    m["mean_length"],
                    100 * m["accuracy"],
                    yerr=[[100 * (m["accuracy"] - lo)], [100 * (hi - m["accuracy"])]],
                    fmt=MARKERS[j % len(MARKERS)],
                    color=colors[i % len(colors)],
                    capsize=3,
                    label=f"{label} T={t}",
                )
        ax.set_title(bench)
        ax.set_xlabel("mean response length (tokens)")
        ax.set_ylabel("accuracy % (95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def plot_length_histograms(responses: dict[str, list[dict]], out: Path) -> Path:
    """One panel per model: lengths of correct and of incorrect responses, all sets and temperatures."""
    fig, axes = plt.subplots(1, len(responses), figsize=(4.8 * len(responses), 3.8), squeeze=False)
    for ax, (label, rows) in zip(axes[0], responses.items()):
        right = [r["length"] for r in rows if r["correct"]]
        wrong = [r["length"] for r in rows if not r["correct"]]
        top = max([1, *right, *wrong])
        bins = [top * i / 30 for i in range(31)]
        ax.hist(right, bins=bins, alpha=0.6, color="tab:green", label=f"correct ({len(right)})")
        ax.hist(wrong, bins=bins, alpha=0.6, color="tab:red", label=f"incorrect ({len(wrong)})")
        ax.set_title(label)
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("responses")
        ax.legend()
    return save_figure(fig, out)


def write_report(
    results: dict[str, dict],
    responses: dict[str, list[dict]],
    out_dir: Path,
    comparisons: dict[str, dict] | None = None,
) -> list[Path]:
    """report.md, accuracy_vs_length.png and length_histograms.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(report_markdown(results, comparisons), encoding="utf-8")
    return [
        md,
        plot_accuracy_vs_length(results, out_dir / "accuracy_vs_length.png"),
        plot_length_histograms(responses, out_dir / "length_histograms.png"),
    ]
