"""Prefect artifacts (tables, markdown) for the UI, and the summary as text.

Stages also run alone from the CLI, outside any Prefect run; there, artifacts
have nowhere to go and are skipped rather than starting a Prefect server.
"""

from __future__ import annotations

import math

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError


def _in_prefect_run() -> bool:
    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def table(key: str, rows: list[dict], description: str) -> None:
    if _in_prefect_run() and rows:
        create_table_artifact(
            key=key, table=[{k: _clean(v) for k, v in row.items()} for row in rows], description=description
        )


def markdown(key: str, text: str, description: str) -> None:
    if _in_prefect_run():
        create_markdown_artifact(key=key, markdown=text, description=description)


def _fmt_len(x: float) -> str:
    return f"{x:.1f}"


def summary_rows(summary: dict) -> list[list[str]]:
    """One row per model, set and temperature: accuracy with its CI, mean length, reduction."""
    rows = []
    for label, model in summary["models"].items():
        for bench, temps in model["eval"].items():
            for t, m in temps.items():
                lo, hi = m["accuracy_ci"]
                reduction = summary["length_reduction_pct"].get(bench, {}).get(t) if label == "phase2" else None
                rows.append([
                    label, f"v{model['version']}" if model['version'] != "local" else "local", bench, t,
                    f"{100 * m['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                    _fmt_len(m["mean_length"]), "" if reduction is None else f"{reduction:.1f}%", str(m["n"]),
                ])
    return rows


SUMMARY_HEADER = ["model", "version", "set", "T", "accuracy % [95% CI]", "mean length", "length cut", "n"]


def summary_markdown(summary: dict, figures: dict[str, str] | None = None) -> str:
    lines = ["# concise-rl pipeline summary", ""]
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    lines += [f"**{verdict}**: registered model `{summary['registered_model']}`, champion version "
              f"{summary['champion_version']}", ""]
    lines += ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(summary)]
    lines += ["", "## Gate", "", "| criterion | value | threshold | passed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']:.4g} | {c['threshold']} | {'yes' if c['passed'] else 'NO'} |"
              for c in summary["gate"]["criteria"]]
    if figures:
        lines += ["", "## Plots", ""] + [f"- `{name}`: {where}" for name, where in figures.items()]
    return "\n".join(lines) + "\n"
