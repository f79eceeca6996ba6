"""Evaluation only, as a Prefect flow: given models on the config's sets, with the report.

The evaluation-only deployment of infra/prefect.yaml runs it, e.g. to evaluate the
champion on a new benchmark without training anything. Models are labelled URIs, in
the forms every command takes (tasks/model_uri.py: ``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, an ``s3://`` checkpoint folder or a local Hugging Face folder);
results are cached per model and settings like every evaluation (tasks/stages.py).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from concise_rl.config import load_config
from concise_rl.tasks import stages
from concise_rl.tasks.model_uri import resolve_model

evaluate = task(stages.evaluate, name="evaluate", retries=1, cache_policy=NO_CACHE)


def resolve_models(cfg, models: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{label: uri}`` -> ``{label: {"version", "uri"}}``, aliases resolved to their version now."""
    return {label: resolve_model(cfg, uri, what=f"model {label}={uri}") for label, uri in models.items()}


@flow(name="concise-rl-evaluate")
def evaluate_models(models: dict[str, str], config_path: str | None = None, overrides: list[str] | None = None,
                    git_sha: str | None = None) -> dict:
    """Evaluate each ``{label: uri}`` on the config's evaluation sets; returns per-model metrics and the report."""
    if not models:
        raise ValueError('models: give at least one {label: uri}, e.g. {"champion": "models:/NAME@champion"}')
    cfg = load_config(config_path, overrides or [])
    with stages.run_tags(git_sha=git_sha):
        results = evaluate(cfg, resolve_models(cfg, models))
    return {label: {"version": r["version"], "uri": r["uri"], "eval": r["eval"], "report": r["report"]}
            for label, r in results.items()}
