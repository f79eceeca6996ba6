"""What the CLI prints: the summary and evaluation tables, the gate verdict, the registry listing, reports.

The commands (concise_rl/cli.py) call the library and the stages; these functions
only format their results for a terminal (or a CI log), on stdout.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from concise_rl import paths

if TYPE_CHECKING:
    from concise_rl.config import GateConfig
    from concise_rl.evaluation.grade_file import GradeReport


def _console() -> Console:
    # A terminal's own width; piped into a file or a CI log, 80 columns, which every set's table fits.
    return Console(width=None if sys.stdout.isatty() else 80)


def _table(title: str) -> Table:
    # No outer edge, and one space between columns: a set's seven columns then fit 80 characters
    # even with 100.0% accuracies and double-digit changes.
    return Table(title=escape(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                 collapse_padding=True, title_justify="left")


def models_tables(console: Console, models: dict[str, dict], gate_cfg: GateConfig | None = None,
                  parents: dict[str, str | None] | None = None) -> None:
    """One table per evaluated set (evaluation/tables.py): every model and temperature with accuracy and its
    CI, the paired change and length cut against its parent, mean length and truncation."""
    from concise_rl.evaluation.tables import SET_HEADER, set_caption, set_tables

    for title, rows in set_tables(models, gate_cfg, parents):
        table = _table(title)
        for col in SET_HEADER:
            table.add_column(escape(col), no_wrap=True, justify="left" if col == "model" else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print()
        console.print(table)
    console.print(escape(set_caption(models, parents)), style="dim")


def gate_verdict_table(console: Console, verdict: dict, title: str) -> None:
    from concise_rl.evaluation.tables import GATE_HEADER, gate_rows

    table = _table(title)
    for col in GATE_HEADER:
        table.add_column(col, no_wrap=True, justify="right" if col in ("value", "threshold") else "left")
    for row in gate_rows(verdict):
        style = "bold" if row[2] == "VERDICT" else ("red" if row[-1] == "NO" else None)
        table.add_row(*map(escape, row), style=style)
    console.print()
    console.print(table)


def print_summary(summary: dict, gate_cfg: GateConfig | None = None) -> None:
    """A pipeline's (or `promote`'s) summary: every set's table, the gate, and where the summary is."""
    console = _console()
    console.print(f"[bold]concise-rl: {escape(summary['registered_model'])}[/bold]")
    models_tables(console, summary["models"], gate_cfg)
    gate_verdict_table(console, summary["gate"], "gate: phase 2 against the model it started from")
    verdict = "[green]PASSED[/green]" if summary["gate"]["passed"] else "[red]FAILED[/red]"
    console.print(f"gate {verdict}; champion version: {summary['champion_version']}")
    console.print(f"summary written to {paths.reports() / 'latest' / 'summary.json'}", soft_wrap=True)


def print_evaluation(title: str, results: dict[str, dict], gate_cfg: GateConfig | None = None) -> None:
    """Evaluated models (stages.evaluate's results) and where their responses and report are."""
    console = _console()
    console.print(f"[bold]{escape(title)}[/bold]")
    models_tables(console, results, gate_cfg)
    report = next(iter(results.values()))["report"]
    console.print(f"responses and summaries under {paths.evaluations()}; report: {report}/report.md", soft_wrap=True)


def print_comparison(results: dict[str, dict], verdict: dict, baseline: str, candidate: str,
                     gate_cfg: GateConfig | None = None) -> None:
    """`compare`: both models' figures (B's change and cut against A), then the gate's verdict, criterion by
    criterion."""
    console = _console()
    console.print(f"[bold]compare: A = {escape(baseline)}, B = {escape(candidate)}[/bold]")
    models_tables(console, results, gate_cfg)
    gate_verdict_table(console, verdict, f"gate for B against A: {'PASSED' if verdict['passed'] else 'FAILED'}")


def print_ablation(report: dict) -> None:
    """`ablate`: the table of variants (tasks/ablate.py's markdown) and where its files are."""
    print(report["markdown"])
    print(f"ablation.md, ablation.json and ablation.png in {report['out_dir']} (MLflow run {report['mlflow_run_id']})")


def _figures_text(figures: dict) -> str:
    lines = []
    for bench, temps in figures.items():
        for t, f in temps.items():
            parts = [f"{bench} T={t}:"]
            if "accuracy_pct" in f:
                parts.append(f"acc {f['accuracy_pct']:.1f}%")
            if {"accuracy_change_pts", "accuracy_change_ci_low_pts", "accuracy_change_ci_high_pts"} <= set(f):
                parts.append(f"({f['accuracy_change_pts']:+.1f} [{f['accuracy_change_ci_low_pts']:+.1f}, "
                             f"{f['accuracy_change_ci_high_pts']:+.1f}])")
            if "mean_length" in f:
                parts.append(f"len {f['mean_length']:.1f}")
            if "length_reduction_pct" in f:
                parts.append(f"cut {f['length_reduction_pct']:.1f}%")
            lines.append(" ".join(parts))
    return "\n".join(lines)


def print_versions(title: str, rows: list[dict]) -> None:
    """`models`: the registered versions (tracking.describe_versions) as a table."""
    table = Table(title=escape(title),
                  caption="acc: accuracy (paired change vs parent [95% CI], points); len: mean response length "
                          "(tokens); cut: length cut vs parent")
    for col in ("version", "aliases", "phase", "parent", "created (UTC)", "gate", "figures vs parent"):
        table.add_column(escape(col))
    for r in rows:
        gate = r["gate"] + (f": {r['gate_failed_criteria']}" if r["gate_failed_criteria"] else "")
        table.add_row(*map(escape, (r["version"], ", ".join(r["aliases"]), r["phase"], r["parent_version"],
                                    r["created"].replace("T", " ").rstrip("Z"), gate, _figures_text(r["eval"]))))
    # Piped into a file or a CI log, rich would fold the table to 80 columns; give it room instead.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    champion = next((r for r in rows if "champion" in r["aliases"]), None)
    if champion is not None:
        name = champion["uri"].split("/")[1]
        print(f"serve the champion (v{champion['version']}): mlflow models serve -m models:/{name}@champion "
              "--env-manager local --port 5001, then POST a chat request to http://127.0.0.1:5001/invocations "
              "(docs/serving.md; vLLM or TGI serve its model/ folder)")


def print_grading(report: GradeReport, output: str, label_field: str | None) -> None:
    """`grade`: how many responses were correct and, against existing labels, every disagreement."""
    print(f"graded {report.responses} responses in {report.rows} rows: {report.correct} correct "
          f"({100 * report.accuracy:.1f}%); written to {output}")
    if report.agreement is not None:
        print(f"agreement with {label_field!r}: {report.agreed}/{report.labelled} "
              f"({100 * report.agreement:.2f}%)")
        for d in report.disagreements:
            index = "" if d["response_index"] is None else f" response {d['response_index']}"
            print(f"  {d['location']}{index}: answer {d['answer']!r}, extracted {d['extracted']!r}: "
                  f"ours {d['ours']}, label {d['label']} ({d['reason']})")


def print_deployments(deployments: list[dict]) -> None:
    """`deploy`: each applied deployment with its work pool and schedules."""
    for d in deployments:
        schedules = ", ".join(d["schedules"]) or "no schedule (on demand)"
        print(f"deployment {d['name']} ({d['id']}) on work pool {d['work_pool']!r}: {schedules}")
