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

from concise_rl.config import GateConfig
from concise_rl.evaluation.metrics import macro_average
from concise_rl.evaluation.plots import save_figure
from concise_rl.evaluation.tables import GATE_HEADER, SET_HEADER, gate_rows, markdown_table, set_caption, set_tables

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^vP*X"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _len(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def report_markdown(results: dict[str, dict], comparisons: dict[str, dict] | None = None,
                    gate_cfg: GateConfig | None = None) -> str:
    """results: {label: {"version", "uri", "eval": {set: {T: summary}}}}; comparisons: {label: verdict}.

    Narrow tables, so they stay readable in the Prefect UI's page and a terminal alike: one per set
    (evaluation/tables.py, as the console prints them), then lengths of correct and incorrect
    responses, then the macro average over sets.
    """
    lines = ["# Evaluation report", ""]
    lines += ["| model | uri |", "|---|---|"]
    lines += [f"| {label} | `{r['uri']}` |" for label, r in results.items()]
    for title, rows in set_tables(results, gate_cfg):
        lines += ["", f"## {title}", "", *markdown_table(SET_HEADER, rows)]
    lines += ["", f"*{set_caption(results)}*", "", "## Lengths of correct and incorrect responses", ""]
    rows = []
    for label, r in results.items():
        for bench, by_t in r["eval"].items():
            for t, m in by_t.items():
                rows.append([label, bench, t, f"{m['n']} x {m['samples']}", _len(m["median_length"]),
                             _len(m["mean_length_correct"]), _len(m["mean_length_incorrect"])])
    lines += markdown_table(["model", "set", "T", "n x samples", "median", "mean correct", "mean incorrect"], rows)
    macro = [[label, t, _pct(m["accuracy"]), _len(m["mean_length"]), str(m["sets"])]
             for label, r in results.items() for t, m in macro_average(r["eval"]).items() if m["sets"] > 1]
    if macro:
        lines += ["", "## Macro average over sets", "",
                  *markdown_table(["model", "T", "accuracy %", "mean length", "sets"], macro)]
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
    gate_cfg: GateConfig | None = None,
) -> list[Path]:
    """report.md, accuracy_vs_length.png and length_histograms.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(report_markdown(results, comparisons, gate_cfg), encoding="utf-8")
    return [
        md,
        plot_accuracy_vs_length(results, out_dir / "accuracy_vs_length.png"),
        plot_length_histograms(responses, out_dir / "length_histograms.png"),
    ]
