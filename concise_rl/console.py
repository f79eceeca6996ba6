"""What the CLI prints: the summary and evaluation tables, the gate verdict, the registry listing, reports.

The commands (concise_rl/cli.py) call the library and the stages; these functions
only format their results for a terminal (or a CI log), on stdout.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from concise_rl import paths

if TYPE_CHECKING:
    from concise_rl.evaluation.grade_file import GradeReport


def models_table(title: str, summary: dict) -> Console:
    """One row per model, set and temperature (as in the summary); returns the console to print more under it."""
    from concise_rl.tasks.publish import SUMMARY_HEADER, summary_rows

    console = Console()
    table = Table(title=title)
    for col in SUMMARY_HEADER:
        table.add_column(col)
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
    return console


def print_summary(summary: dict) -> None:
    """A pipeline's (or `promote`'s) summary: the models, the gate verdict and where the summary is."""
    console = models_table(f"concise-rl: {summary['registered_model']}", summary)
    verdict = "[green]PASSED[/green]" if summary["gate"]["passed"] else "[red]FAILED[/red]"
    console.print(f"gate {verdict}; champion version: {summary['champion_version']}")
    console.print(f"summary written to {paths.reports() / 'latest' / 'summary.json'}")


def print_evaluation(title: str, results: dict[str, dict]) -> None:
    """Evaluated models (stages.evaluate's results) and where their responses and report are."""
    models_table(title, {"models": results, "length_reduction_pct": {}})
    report = next(iter(results.values()))["report"]
    print(f"responses and summaries under {paths.evaluations()}; report: {report}/report.md")


def print_comparison(results: dict[str, dict], verdict: dict, baseline: str, candidate: str) -> None:
    """`compare`: both models' figures, then the gate's verdict for B against A, criterion by criterion."""
    from concise_rl.evaluation.report import gate_table

    models_table("compare: A (baseline) and B (candidate)", {"models": results, "length_reduction_pct": {}})
    print(f"gate for B ({candidate}) against A ({baseline}): {'PASSED' if verdict['passed'] else 'FAILED'}")
    print("\n".join(gate_table(verdict)))


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
