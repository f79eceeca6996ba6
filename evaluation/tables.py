"""The figures every table shows, as rows of text: one table per evaluated set, and the gate's.

The console (concise_rl/console.py), the Prefect artifacts (tasks/publish.py), report.md
and the model cards all take their rows from here, so they show the same figures in the
same units: accuracy and length cut in percent, changes in points, each accuracy and
change with its 95% CI. A set's table has one row per model and temperature, seven narrow
columns, so it fits an 80-column terminal.
"""

from __future__ import annotations

from concise_rl.config import GateConfig
from concise_rl.evaluation.gate import accuracy_comparison, criterion_text, length_reduction_pct

SET_HEADER = ["model", "T", "acc % [CI]", "change [CI]", "len", "cut", "trunc"]
GATE_HEADER = ["set", "T", "criterion", "value", "threshold", "pass"]


def lineage(labels: list[str]) -> dict[str, str | None]:
    """Which model each one is compared with: the pipeline's own labels by lineage (phase1 against base,
    phase2 against phase1, or base when phase 1 was off), ``compare``'s B against A, anything else
    against the first model given."""
    if set(labels) <= {"base", "phase1", "phase2"}:
        chain = [label for label in ("base", "phase1", "phase2") if label in labels]
        return {label: (chain[i - 1] if i else None) for i, label in enumerate(chain)}
    if labels == ["A", "B"]:
        return {"A": None, "B": "A"}
    return {label: (labels[0] if i else None) for i, label in enumerate(labels)}


def _model_name(label: str, version: str) -> str:
    return label if version in ("local", None) else f"{label} v{version}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def set_tables(models: dict[str, dict], gate_cfg: GateConfig | None = None,
               parents: dict[str, str | None] | None = None) -> list[tuple[str, list[list[str]]]]:
    """``[(title, rows)]``, one per evaluated set, rows under :data:`SET_HEADER`.

    ``models``: ``{label: {"version", "eval": {set: {T: summary}}}}``. The change is the paired
    difference of per-problem pass@1 against the model's parent (:func:`lineage`), with the
    bootstrap CI the gate uses (``gate_cfg``), and the cut is how much shorter its mean
    response is; a model with no parent, or evaluated on other problems, leaves both blank.
    """
    gate_cfg = gate_cfg or GateConfig()
    parents = parents if parents is not None else lineage(list(models))
    sets = list(dict.fromkeys(bench for m in models.values() for bench in m["eval"]))
    tables = []
    for bench in sets:
        rows = []
        first, samples = None, 1
        for label in [*(x for x in parents if x in models), *(x for x in models if x not in parents)]:
            model = models[label]
            parent = models.get(parents.get(label) or "", {}).get("eval", {}).get(bench, {})
            for t, m in model["eval"].get(bench, {}).items():
                first, samples = first or m, max(samples, m.get("samples", 1))
                lo, hi = m["accuracy_ci"]
                change = cut = ""
                if t in parent:
                    try:
                        paired = accuracy_comparison(m, parent[t], gate_cfg, f"{bench}@T={t}")
                        change = f"{_signed(paired['difference'])} [{_signed(paired['ci'][0])}, {_signed(paired['ci'][1])}]"
                    except ValueError:  # evaluated on other problems, or before per-problem results were kept
                        change = "n/a"
                    cut = f"{length_reduction_pct(m['mean_length'], parent[t]['mean_length']):.1f}%"
                rows.append([_model_name(label, model["version"]), t, f"{100 * m['accuracy']:.1f} [{100 * lo:.1f}, "
                             f"{100 * hi:.1f}]", change, f"{m['mean_length']:.0f}", cut,
                             f"{100 * m.get('truncation_rate', 0.0):.1f}%"])
        sampled = f", {samples} samples at T > 0" if samples > 1 else ""
        tables.append((f"{bench}: {first['n'] if first else 0} problems{sampled}", rows))
    return tables


def set_caption(models: dict[str, dict], parents: dict[str, str | None] | None = None) -> str:
    """What the change and cut columns compare, in words."""
    parents = parents if parents is not None else lineage(list(models))
    pairs = [f"{label} vs {parent}" for label, parent in parents.items() if parent]
    return (f"change and cut: {', '.join(pairs) or 'no model has a parent here'}; CI: 95%; change: paired "
            "accuracy change in points; cut: mean length cut; len: mean tokens; trunc: share that hit max_new_tokens")


def _where(c: dict) -> tuple[str, str, str]:
    """(set, T, criterion) of a gate criterion; verdicts written before the fields existed are read from the name."""
    if "set" in c:
        return c["set"], c["T"], "acc change, CI low" if c["kind"] == "accuracy" else "length cut"
    where, _, what = c["name"].partition(" ")
    bench, _, t = where.partition("@T=")
    return bench, t, "acc change, CI low" if "accuracy" in what else "length cut"


def gate_rows(verdict: dict) -> list[list[str]]:
    """The verdict under :data:`GATE_HEADER`, one row per criterion (accuracy in points, cut in percent),
    then the verdict itself."""
    rows = []
    for c in verdict["criteria"]:
        value, threshold = criterion_text(c)
        rows.append([*_where(c), value, threshold, "yes" if c["passed"] else "NO"])
    rows.append(["", "", "VERDICT", "", "", "PASSED" if verdict["passed"] else "FAILED"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]
