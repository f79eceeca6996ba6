"""Prefect artifacts (tables, markdown) for the UI, and the summary as text.

Stages also run alone from the CLI, outside any Prefect run; there, artifacts
have nowhere to go and are skipped rather than starting a Prefect server.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from concise_rl.evaluation.gate import criterion_text


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


# An image artifact is a URL the browser fetches. The plots live on the run's disk or in a
# private bucket the browser cannot reach, so they travel inside the URL (a data: URI,
# stored in the Prefect database). The demo's PNGs are 28-166 kB; anything above
# this size is left out of the UI (it is still in MLflow and the report folder).
MAX_IMAGE_BYTES = 2_000_000


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``name``: ``training_curves`` -> ``training-curves``."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def image(key: str, path: Path, description: str) -> bool:
    """Publish a PNG as an image artifact shown in the Prefect UI; False when skipped (no run, too large)."""
    if not _in_prefect_run():
        return False
    data = Path(path).read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        return False
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(data).decode("ascii"),
                          key=artifact_key(key), description=description)
    return True


def gate_rows(verdict: dict) -> list[dict]:
    """The gate verdict as a table: one row per criterion, accuracy in points and length cut in percent
    (evaluation.gate.criterion_text), the paired ones with their change and CI."""
    rows = []
    for c in verdict["criteria"]:
        value, threshold, change = criterion_text(c)
        rows.append({"criterion": c["name"], "value": value, "threshold": threshold, "passed": bool(c["passed"]),
                     "change [95% CI]": change})
    rows.append({"criterion": "VERDICT", "value": "", "threshold": "", "passed": bool(verdict["passed"]),
                 "change [95% CI]": ""})
    return rows


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
