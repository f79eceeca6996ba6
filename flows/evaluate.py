"""Evaluation only, as a Prefect flow: given models on the config's sets, with the report.

The evaluation-only deployment of infra/prefect.yaml runs it, e.g. to evaluate the
champion on a new benchmark without training anything. Models are labelled URIs
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or a local Hugging Face folder);
results are cached per model and settings like every evaluation (tasks/stages.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from concise_rl.config import load_config
from evaluation import grader
from tasks import stages, tracking

evaluate = task(stages.evaluate, name="evaluate", retries=1, cache_policy=NO_CACHE)


def resolve_models(cfg, models: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{label: uri}`` -> ``{label: {"version", "uri"}}``, aliases resolved to their version now."""
    client = tracking.setup(cfg)
    out = {}
    for label, uri in models.items():
        if uri.startswith("models:/"):
            name, _, ref = uri[len("models:/"):].partition("@" if "@" in uri else "/")
            version = client.get_model_version_by_alias(name, ref) if "@" in uri else client.get_model_version(name, ref)
            out[label] = {"version": str(version.version), "uri": tracking.model_uri(name, version.version)}
        elif Path(uri).is_dir():
            out[label] = {"version": "local", "uri": uri}
        else:
            raise FileNotFoundError(f"model {label}={uri}: not a models:/ URI and not a model directory")
    return out


@flow(name="concise-rl-evaluate")
def evaluate_models(models: dict[str, str], config_path: str | None = None, overrides: list[str] | None = None,
                    git_sha: str | None = None) -> dict:
    """Evaluate each ``{label: uri}`` on the config's evaluation sets; returns per-model metrics and the report."""
    if not models:
        raise ValueError('models: give at least one {label: uri}, e.g. {"champion": "models:/NAME@champion"}')
    cfg = load_config(config_path, overrides or [])
    grader.configure(cfg.grader.workers, cfg.grader.timeout_s)
    with stages.run_tags(git_sha=git_sha):
        results = evaluate(cfg, resolve_models(cfg, models))
    return {label: {"version": r["version"], "uri": r["uri"], "eval": r["eval"], "report": r["report"]}
            for label, r in results.items()}
