"""The two-phase pipeline as one Prefect flow: curate, phase 1, register, phase 2, evaluate, gate.

The flow only composes tasks; each task is a stage from tasks/stages.py and passes
URIs (``models:/NAME/VERSION``) and paths, never live models. Registration and
evaluation talk to the registry and the disk, so they retry; training resumes from
its last checkpoint when retried, except when a training guard stopped it
(training/guards.py): the flow then fails there, and nothing after it (registering
that phase, evaluation, the gate) runs.

Only one pipeline runs at a time per registered model and home folder
(:func:`concise_rl.locking.registry_lock`); a second one fails at once with a
message naming the first. ``git_sha`` (set by CI-triggered runs, see
``concise-rl retrain``) is recorded on every stage's MLflow run, on every version
the run registers (tag ``git_sha``) and in the summary.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from concise_rl.config import load_config
from concise_rl.errors import PreemptedError, TrainingGuardError
from concise_rl.locking import registry_lock
from concise_rl.tasks import stages, tracking

# Stages keep their own idempotency (registry tags, folders keyed by inputs), so
# Prefect's input caching is off: it would hash whole configs for nothing.
prepare_base = task(stages.prepare_base, name="prepare-base", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
curate = task(stages.curate, name="curate", cache_policy=NO_CACHE)
# A phase a training guard stopped would only stop again, and a preempted one must stop (its job is
# going away; the deployment's retry or the restarted pod resumes it): neither failure is retried here.
# With launch.num_processes > 1 each runs as an `accelerate launch` child job (tasks/launch.py).
train_phase = task(stages.train_phase_task, name="train", retries=1, cache_policy=NO_CACHE,
                   retry_condition_fn=lambda task, run, state: not isinstance(state.data,
                                                                              (TrainingGuardError, PreemptedError)))
register = task(stages.register, name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
evaluate = task(stages.evaluate, name="evaluate", retries=1, cache_policy=NO_CACHE)
promote = task(stages.promote, name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)


@flow(name="concise-rl-pipeline")
def pipeline(config_path: str | None = None, overrides: list[str] | None = None, git_sha: str | None = None) -> dict:
    """Run every stage in order and return the summary (the gate's verdict included).

    ``git_sha``: the commit that triggered this run (CI passes ``$GITHUB_SHA``).
    """
    cfg = load_config(config_path, overrides or [])
    with registry_lock(cfg.registry.model_name, f"pipeline flow ({config_path or 'built-in defaults'})"), \
            stages.run_tags(git_sha=git_sha):
        tracking.close_orphaned_runs(cfg)
        return _stages(cfg)


def _stages(cfg) -> dict:
    base = prepare_base(cfg)
    curated = curate(cfg, base["uri"])
    models = {"base": base}
    start = base
    if cfg.phase1.enabled:
        phase1_dir = train_phase(cfg, "phase1", base["uri"], f"{curated}/phase1.jsonl")
        start = models["phase1"] = register(cfg, "phase1", phase1_dir, base)
    phase2_dir = train_phase(cfg, "phase2", start["uri"], f"{curated}/phase2.jsonl")
    models["phase2"] = register(cfg, "phase2", phase2_dir, start)
    results = evaluate(cfg, models)
    return promote(cfg, results, parent_label="phase1" if cfg.phase1.enabled else "base")
