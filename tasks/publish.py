"""Prefect artifacts (tables, markdown) for the UI, and the summary as text.

Stages also run alone from the CLI, outside any Prefect run; there, artifacts
have nowhere to go and are skipped rather than starting a Prefect server.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from concise_rl.evaluation import tables
from concise_rl.evaluation.tables import GATE_HEADER


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


# The plots live on the run's disk or in a private bucket the browser cannot reach, so they
# travel inside the page as data: URIs (stored in the Prefect database), in markdown
# artifacts: the UI (v2, Prefect's default) shows a markdown image whose src is data:image/...,
# where an image artifact would also print its whole data URI as the "Image URL" under it.
# The demo's PNGs are 28-166 kB; anything above this size is left out of the UI (it is still
# in MLflow and the report folder).
MAX_IMAGE_BYTES = 2_000_000


def image_markdown(path: Path, caption: str) -> str:
    """A markdown image carrying the PNG at ``path`` as a data: URI, with a caption; the caption alone when the
    file is over :data:`MAX_IMAGE_BYTES`."""
    data = Path(path).read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        return f"*{caption}* (too large for the UI: {len(data) // 1000} kB)"
    return f"![{Path(path).stem}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n\n*{caption}*"


def with_plots(text: str, figures: dict[Path, str]) -> str:
    """``text`` (markdown) followed by each PNG of ``figures`` ({path: where else to find it}), shown inline."""
    if not figures:
        return text
    parts = [text.rstrip("\n"), "", "## Plots"]
    for path, where in figures.items():
        parts += ["", image_markdown(path, f"{Path(path).name}: {where}")]
    return "\n".join(parts) + "\n"


def _round(x, digits: int):
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else x


def step_row(r: dict) -> dict:
    """One PPO step for the UI's table: accuracy in percent, the rest rounded to what a reader compares."""
    accuracy = r.get("accuracy")
    return {"step": r.get("step"), "reward": _round(r.get("reward"), 3),
            "accuracy %": _round(100.0 * accuracy, 1) if isinstance(accuracy, (int, float)) else accuracy,
            "length": _round(r.get("response_length"), 1), "kl": _round(r.get("kl"), 4),
            "policy loss": _round(r.get("policy_loss"), 4), "value loss": _round(r.get("value_loss"), 4)}


def gate_rows(verdict: dict) -> list[dict]:
    """The gate verdict as a Prefect table (evaluation/tables.py's rows: six narrow columns, accuracy in points and
    length cut in percent), the verdict as its last row."""
    return [dict(zip(GATE_HEADER, row)) for row in tables.gate_rows(verdict)]


def summary_markdown(summary: dict, figures: dict[Path, str] | None = None, gate_cfg=None) -> str:
    """The pipeline's summary page: verdict, one table per set, the gate, and the plots shown inline."""
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    lines = ["# concise-rl pipeline summary", "",
             f"**{verdict}**: registered model `{summary['registered_model']}`, champion version "
             f"{summary['champion_version']}", ""]
    for title, rows in tables.set_tables(summary["models"], gate_cfg):
        lines += [f"## {title}", "", *tables.markdown_table(tables.SET_HEADER, rows), ""]
    lines += [f"*{tables.set_caption(summary['models'])}*", "", "## Gate", "",
              *tables.markdown_table(GATE_HEADER, tables.gate_rows(summary["gate"]))]
    return with_plots("\n".join(lines) + "\n", figures or {})
