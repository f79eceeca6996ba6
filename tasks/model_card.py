"""What a registered version says about itself: its model card, and the figures promotion records.

Markdown with Hugging Face's YAML front matter, written as ``README.md`` into the version's
model folder (tasks/mlflow_model.py) and set as the version's description in the registry,
which the MLflow UI renders. At registration it holds the lineage and the training
settings; once the pipeline has evaluated the version it is rewritten with the evaluation
table (accuracy with its 95% CI, mean length and truncation per set and temperature, the
length cut and paired accuracy change against the parent) and, for the gated candidate,
the gate's verdict. :func:`eval_tags` and :func:`gate_metrics` are the same figures as the
promoted version's tags and the promoting run's metrics. Accuracy, cut and change are in
percent and points everywhere.
"""

from __future__ import annotations

from typing import Any

from concise_rl.config import PipelineConfig
from concise_rl.evaluation.gate import accuracy_comparison, length_reduction_pct
from concise_rl.evaluation.report import gate_table

PHASE_TEXT = {
    "base": "the starting model, before any RL",
    "1": "phase 1: PPO on hard problems, to raise accuracy",
    "2": "phase 2: PPO on a few occasionally-solvable problems, to shorten answers at the same accuracy",
}
PHASE_TITLE = {"base": "base", "1": "phase 1, accuracy", "2": "phase 2, conciseness"}
PHASE_CONFIG = {"1": "phase1", "2": "phase2"}
# The PPO settings a reader needs to know what a phase did (the rest: config_hash).
SETTINGS = ("steps", "prompts_per_step", "samples_per_prompt", "actor_lr", "critic_lr", "kl_coef", "gamma", "lam",
            "clip_range", "temperature", "max_new_tokens", "actor_trainable_layers",
            "actor_trainable_parts", "seed")


def _front_matter(cfg: PipelineConfig) -> list[str]:
    base = cfg.model.name_or_path
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- concise-rl",
             "- reinforcement-learning", "- ppo"]
    if not base.startswith(("embedded:", "/", ".", "~")):
        lines += [f"base_model: {base}"]  # a hub id; a local path or the embedded model is no hub link
    return [*lines, "---", ""]


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def lineage(cfg: PipelineConfig, tags: dict[str, str], version: str | None) -> list[str]:
    phase = tags.get("phase", "")
    commit = tags.get("git_commit", "unknown")
    rows = [("registered model", f"`{cfg.registry.model_name}`" + (f", version {version}" if version else "")),
            ("phase", PHASE_TEXT.get(phase, phase)),
            ("base model", f"`{cfg.model.name_or_path}`"),
            ("parent version", tags.get("parent_version") or "none (the base)"),
            ("curated problems (sha256)", f"`{tags['problems_hash']}`" if tags.get("problems_hash") else "none"),
            ("PPO steps run", tags.get("ppo_steps", "")),
            ("config hash", f"`{tags.get('config_hash', '')}`"),
            ("code", f"`{commit}`" + (" (uncommitted changes)" if tags.get("git_dirty") == "true" else "")),
            ("checkpoint in the artifact store", f"`{tags.get('checkpoint_uri', '')}`")]
    return ["## Lineage", "", _row("", ""), _row("---", "---"), *[_row(k, v) for k, v in rows if v != ""], ""]


def settings(cfg: PipelineConfig, phase: str) -> list[str]:
    if phase not in PHASE_CONFIG:
        model = cfg.model
        source = "built by concise-rl (training/embedded.py)" if model.name_or_path.startswith("embedded:") else (
            "as published")
        return ["## Training", "", f"None here: the base is {source}.", ""]
    ppo = cfg.ppo_for(PHASE_CONFIG[phase])
    rows = [_row("setting", "value"), _row("---", "---")]
    rows += [_row(f"`{key}`", getattr(ppo, key)) for key in SETTINGS if getattr(ppo, key, None) is not None]
    reward = ", ".join(f"{k.replace('_', ' ')} {v:+g}" for k, v in cfg.reward.model_dump().items())
    rows += [_row("`model.dtype`", cfg.model.dtype), _row("reward", reward)]
    return ["## Training", "", f"PPO with a critic, GAE and a KL penalty to the parent ({PHASE_CONFIG[phase]} "
            "settings of the config).", "", *rows, ""]


def evaluation_table(cfg: PipelineConfig, evaluation: dict, parent: dict | None) -> list[str]:
    """Per set and temperature: accuracy [95% CI], mean length, truncation, and against the parent
    the length cut and the paired accuracy change [95% CI], as the gate computes them."""
    lines = ["## Evaluation", "",
             _row("set", "T", "n", "accuracy [95% CI]", "mean length", "truncated", "cut vs parent",
                  "change vs parent [95% CI]"),
             _row(*["---"] * 8)]
    for bench, temps in evaluation.items():
        for t in sorted(temps, key=float):
            m = temps[t]
            low, high = m["accuracy_ci"]
            cut = change = ""
            theirs = (parent or {}).get(bench, {}).get(t)
            if theirs is not None:
                cut = f"{length_reduction_pct(m['mean_length'], theirs['mean_length']):.1f}%"
                if "per_problem" in m and "per_problem" in theirs:
                    diff = accuracy_comparison(m, theirs, cfg.gate, f"{bench}@T={t}")
                    d_low, d_high = diff["ci"]
                    change = f"{100 * diff['difference']:+.1f} [{100 * d_low:+.1f}, {100 * d_high:+.1f}] pts"
            lines.append(_row(bench, t, m["n"], f"{_pct(m['accuracy'])} [{_pct(low)}, {_pct(high)}]",
                              f"{m['mean_length']:.0f}", _pct(m.get("truncation_rate", 0.0)), cut, change))
    return [*lines, ""]


def gate_section(verdict: dict) -> list[str]:
    lines = ["## Gate", "", f"**{'Passed' if verdict['passed'] else 'Failed'}**: promoted to `champion` only "
             "if every criterion holds.", "", *gate_table(verdict)]
    return [*lines, ""]


def render(cfg: PipelineConfig, tags: dict[str, str], *, version: str | None = None,
           evaluation: dict | None = None, parent_evaluation: dict | None = None,
           verdict: dict | None = None) -> str:
    """The card of a version with lineage ``tags`` (tracking.lineage_tags plus the stage's own)."""
    phase = tags.get("phase", "")
    title = f"{cfg.registry.model_name}" + (f" v{version}" if version else "") + f" ({PHASE_TITLE.get(phase, phase)})"
    lines = [*_front_matter(cfg), f"# {title}", "",
             "Post-trained by concise-rl with two-phase PPO: phase 1 raises accuracy "
             "on hard problems, phase 2 shortens answers on a few occasionally-solvable ones.", ""]
    lines += lineage(cfg, tags, version) + settings(cfg, phase)
    if evaluation:
        lines += evaluation_table(cfg, evaluation, parent_evaluation)
    else:
        lines += ["## Evaluation", "", "Not evaluated yet: the pipeline's evaluation stage rewrites this card.", ""]
    if verdict is not None:
        lines += gate_section(verdict)
    lines += ["## Use", "", "`model/` is a Hugging Face model folder (vLLM, TGI, transformers). As an MLflow "
              "Model: `mlflow models serve -m models:/NAME@champion --env-manager local`, then POST "
              '`{"messages": [...], "max_tokens": N}` to `/invocations` (docs/serving.md).', ""]
    return "\n".join(lines)


def eval_tags(candidate_eval: dict, reductions: dict, verdict: dict) -> dict[str, str]:
    """The figures a promoted version records, per set and temperature, as ``eval.<set>.T<t>.<figure>`` tags.

    In percent and points, as every table shows them: ``accuracy_pct``, ``mean_length``
    (tokens) and ``length_reduction_pct`` (against the parent) for every evaluated set; where
    the gate compared the set, also the paired accuracy change against the parent in points
    (``accuracy_change_pts``) and its 95% CI (``accuracy_change_ci_low_pts``/``_high_pts``).
    """
    paired = {c["name"].split(" accuracy change,")[0]: c for c in verdict["criteria"] if "ci" in c}
    tags: dict[str, str] = {}
    for bench, temps in candidate_eval.items():
        for t, m in temps.items():
            prefix = f"eval.{bench}.T{t}"
            tags[f"{prefix}.accuracy_pct"] = f"{100 * m['accuracy']:.2f}"
            tags[f"{prefix}.mean_length"] = f"{m['mean_length']:.1f}"
            if t in reductions.get(bench, {}):
                tags[f"{prefix}.length_reduction_pct"] = f"{reductions[bench][t]:.2f}"
            criterion = paired.get(f"{bench}@T={t}")
            if criterion is not None:
                tags[f"{prefix}.accuracy_change_pts"] = f"{100 * criterion['difference']:.2f}"
                tags[f"{prefix}.accuracy_change_ci_low_pts"] = f"{100 * criterion['ci'][0]:.2f}"
                tags[f"{prefix}.accuracy_change_ci_high_pts"] = f"{100 * criterion['ci'][1]:.2f}"
    return tags


def gate_metrics(tags: dict[str, str], verdict: dict) -> dict[str, float]:
    """The gate's figures as metrics of the promoting run (MLflow metric names allow no '=' or '@'):
    every ``eval.*`` tag of :func:`eval_tags` as a number, and whether the gate passed."""
    metrics = {f"gate.{key.removeprefix('eval.')}": float(value) for key, value in tags.items()}
    return {**metrics, "gate_passed": float(verdict["passed"])}


def write_cards(cfg: PipelineConfig, client, results: dict[str, dict], parent_label: str, verdict: dict) -> None:
    """Rewrite each evaluated version's model card with its evaluation against its parent (and, for the
    candidate, the gate's verdict): its README.md files and its description in the registry."""
    parents = {"phase1": "base", "phase2": parent_label}
    for label, info in results.items():
        if info["version"] == "local":
            continue
        version = client.get_model_version(cfg.registry.model_name, info["version"])
        parent = results.get(parents.get(label, ""))
        card = render(cfg, version.tags, version=info["version"], evaluation=info["eval"],
                                 parent_evaluation=parent["eval"] if parent else None,
                                 verdict=verdict if label == "phase2" else None)
        from concise_rl.tasks import tracking  # which imports this module

        tracking.update_model_card(client, cfg, version, card)
