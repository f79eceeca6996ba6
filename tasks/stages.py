"""The pipeline's stages, each one library call plus its side effects.

Each stage is a plain function (the CLI runs it alone) that takes the config and
URIs or paths, calls into training/ or evaluation/, logs to MLflow, and returns
URIs or paths. flows/ wraps them as Prefect tasks. Stages are idempotent: a stage
whose output for the same inputs already exists returns it instead of redoing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import mlflow
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from concise_rl import faults, paths
from concise_rl import store as artifact_store
from concise_rl.benchmarks import load_benchmark
from concise_rl.config import DataSource, PipelineConfig, PPOConfig, stable_hash
from concise_rl.errors import TrainingGuardError
from concise_rl.evaluation import plots
from concise_rl.evaluation.evaluate import check_sets, evaluate_model
from concise_rl.evaluation.gate import evaluate_gate, length_reductions
from concise_rl.evaluation.metrics import macro_average
from concise_rl.evaluation.report import write_report
from concise_rl.files import atomic_write_json, point_latest, read_jsonl, read_latest, replaced_dir
from concise_rl.grader import Grader
from concise_rl.mirror import CheckpointMirror, finish_uploads
from concise_rl.problems import Problem, load_hf_dataset, load_problems, problems_hash, save_problems
from concise_rl.synthetic import generate_problems
from concise_rl.tasks import model_card, publish, tracking
from concise_rl.tasks.model_uri import local_model_dir
from concise_rl.training import curation as curation_lib
from concise_rl.training import prebuilt
from concise_rl.training.embedded import build_embedded_model
from concise_rl.training.generation import context_length
from concise_rl.training.guards import STOP_FILE, read_stop
from concise_rl.training.models import check_model_path, embedded_dir, is_embedded, load_policy, load_tokenizer
from concise_rl.training.trainer import PPOTrainer

log = logging.getLogger(__name__)

PHASE_TAG = {"base": "base", "phase1": "1", "phase2": "2"}
PHASE_ALIAS = {"base": "base", "phase1": "phase1", "phase2": "candidate"}

# Tags of the run that triggered the stages (e.g. the CI commit, ``git_sha``): put on
# every stage's MLflow run and on every version registered while they are set.
_RUN_TAGS: ContextVar[dict[str, str]] = ContextVar("concise_rl_run_tags", default={})


@contextlib.contextmanager
def run_tags(**tags: str | None) -> Iterator[dict[str, str]]:
    """Tag every stage run and newly registered version inside the block (empty values are left out)."""
    merged = {**_RUN_TAGS.get(), **{k: str(v) for k, v in tags.items() if v}}
    token = _RUN_TAGS.set(merged)
    try:
        yield merged
    finally:
        _RUN_TAGS.reset(token)


def _stage_run(cfg: PipelineConfig, stage: str, **tags: str):
    return tracking.stage_run(cfg, stage, **{**_RUN_TAGS.get(), **tags})


def gate_failures(summary: dict) -> str:
    """The failed gate criteria of a summary, one readable line."""
    failed = [c for c in summary["gate"]["criteria"] if not c["passed"]]
    return "; ".join(f"{c['name']} = {c['value']:.4g} (threshold {c['threshold']})" for c in failed)


def device(cfg: PipelineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_source(src: DataSource, split: str = "train") -> list[Problem]:
    """Problems from a DataSource: the built-in task, a local file, a hub dataset or a named benchmark."""
    if src.kind == "synthetic":
        return generate_problems(
            src.num_problems, seed=src.seed, min_level=src.min_level, max_level=src.max_level, split=split
        )
    if src.kind == "file":
        return load_problems(src.path, limit=src.limit)
    if src.kind == "benchmark":
        return load_benchmark(src.name, data_dir=src.path, limit=src.limit, few_shot=src.few_shot)
    return load_hf_dataset(src.name, split=src.split, limit=src.limit)


def _store_checkpoint(cfg: PipelineConfig, model_dir: Path, phase: str) -> tuple[str, dict[str, str]]:
    """Commit a model folder to the artifact store (manifest last); its URI and the tags that pin it.

    Raises :class:`concise_rl.store.StoreError` when the upload fails, before
    anything is registered.
    """
    upload = artifact_store.open_store(cfg.store).upload_checkpoint(
        model_dir, model_name=cfg.registry.model_name, phase=phase
    )
    mlflow.set_tag("checkpoint_uri", upload.uri)
    return upload.uri, {"checkpoint_manifest_sha256": upload.digest}


def _version_info(version) -> dict[str, str]:
    return {"version": str(version.version), "uri": tracking.model_uri(version.name, version.version)}


# --------------------------------------------------------------------------- base
def prepare_base(cfg: PipelineConfig) -> dict[str, str]:
    """Build the embedded model if needed and register the base as a model version (once)."""
    source = cfg.model.name_or_path
    if not is_embedded(cfg.model):
        check_model_path(source)  # a missing local folder is bad input, not a hub id to download
    client = tracking.setup(cfg)
    # The embedded model's folder name already hashes its config and build recipe; the name, not
    # the whole path, so a home that moved (another mount, a copy) finds its base again.
    source_key = stable_hash(embedded_dir(cfg.model).name if is_embedded(cfg.model) else source)
    existing = tracking.find_version(client, cfg.registry.model_name, phase="base", source_key=source_key)
    if existing is None and is_embedded(cfg.model):  # registered before the key was the name: by its path
        legacy = stable_hash(str(embedded_dir(cfg.model)))
        existing = tracking.find_version(client, cfg.registry.model_name, phase="base", source_key=legacy)
    if existing is not None:
        log.info("base model already registered as version %s", existing.version)
        client.set_registered_model_alias(cfg.registry.model_name, PHASE_ALIAS["base"], existing.version)
        return _version_info(existing)
    with _stage_run(cfg, "base"):
        if is_embedded(cfg.model):
            target = embedded_dir(cfg.model)
            if cfg.model.embedded.use_prebuilt:
                prebuilt.install(target)  # the demo's base, shipped in training/prebuilt/
            model_dir = build_embedded_model(target, cfg.model.embedded, cfg.prompt)  # a no-op once there
            # An SFT in bf16 (model.embedded.sft_dtype) leaves accelerate's process-wide
            # AcceleratorState at mixed_precision="bf16": every later Accelerator() in this process
            # (PPO in `concise-rl run`) would inherit it and train under bf16 autocast. accelerate
            # has no public reset; its own tests use this one. PartialState (devices, process
            # group) is kept.
            AcceleratorState._reset_state(reset_partial_state=False)
        elif Path(source).expanduser().is_dir():
            model_dir = Path(source).expanduser()
        else:
            from huggingface_hub import snapshot_download

            model_dir = Path(snapshot_download(source))
        checkpoint_uri, pin = _store_checkpoint(cfg, model_dir, "base")
        version = tracking.register_model_dir(
            client, cfg, model_dir, phase="base", parent_version=None, problems_hash=None,
            checkpoint_uri=checkpoint_uri, tags={"source_key": source_key, "name_or_path": source, **pin,
                                                  **_RUN_TAGS.get()},
        )
        client.set_registered_model_alias(cfg.registry.model_name, PHASE_ALIAS["base"], version.version)
    return _version_info(version)


# --------------------------------------------------------------------------- curation
def curate(cfg: PipelineConfig, model_uri: str) -> str:
    """Measure pass rates of the candidates under ``model_uri`` and write the two problem sets.

    Returns the curation folder, holding phase1.jsonl, phase2.jsonl and pass_rates.jsonl.
    """
    candidates = load_source(cfg.curation.candidates)
    key = stable_hash(
        {"model": model_uri, "curation": cfg.curation.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(),
         "candidates": problems_hash(candidates), "seed": cfg.seed}
    )
    out = paths.curation() / key
    if (out / "done.json").is_file():
        log.info("curation already done in %s", out)
        point_latest(out.parent, out.name)  # the newest curation: `concise-rl train` finds its sets without a path
        return str(out)
    with _stage_run(cfg, "curate", model_uri=model_uri):
        model_dir = local_model_dir(cfg, model_uri)
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code, prompt=cfg.prompt)
        model = load_policy(model_dir, cfg.model, device=device(cfg))
        torch.manual_seed(cfg.seed)
        with Grader.from_config(cfg.grader) as grader:
            rates = curation_lib.measure_pass_rates(
                model, tokenizer, candidates, cfg.curation, cfg.prompt, cfg.reward, grader,
                engine=cfg.model.generation_engine,
            )
        phase1, phase2 = curation_lib.select_sets(candidates, rates, cfg.curation, cfg.seed)
        with replaced_dir(out) as tmp:
            save_problems(phase1, tmp / "phase1.jsonl")
            save_problems(phase2, tmp / "phase2.jsonl")
            table = [
                {"problem_id": r.problem_id, "level": r.level, "pass_rate": r.pass_rate, "correct": r.correct,
                 "samples": r.samples, "mean_length": r.mean_length,
                 "phase1": r.problem_id in {p.id for p in phase1}, "phase2": r.problem_id in {p.id for p in phase2}}
                for r in rates
            ]
            with open(tmp / "pass_rates.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in table)
            plots.plot_pass_rates(
                [r.pass_rate for r in rates],
                {"phase 1": (cfg.curation.phase1_band.low, cfg.curation.phase1_band.high),
                 "phase 2": (cfg.curation.phase2_band.low, cfg.curation.phase2_band.high)},
                tmp / "pass_rates.png",
            )
            summary = {
                "model_uri": model_uri, "candidates": len(candidates), "phase1": len(phase1), "phase2": len(phase2),
                "mean_pass_rate": sum(r.pass_rate for r in rates) / len(rates),
            }
            (tmp / "done.json").write_text(json.dumps(summary, indent=2))
        point_latest(out.parent, out.name)
        mlflow.log_table({k: [row[k] for row in table] for k in table[0]}, artifact_file="pass_rates.json")
        tracking.log_metrics({"candidates": len(candidates), "phase1_problems": len(phase1),
                              "phase2_problems": len(phase2), "mean_pass_rate": summary["mean_pass_rate"]})
        mlflow.log_artifacts(str(out), artifact_path="curation")
        publish.table("curation-pass-rates", table, f"Pass rates of {len(candidates)} candidates under {model_uri}")
    return str(out)


# --------------------------------------------------------------------------- training
def accelerator(cfg: PipelineConfig) -> Accelerator:
    """The accelerator PPO runs under: one process, or each process of `accelerate launch`."""
    return Accelerator(cpu=device(cfg).type == "cpu")


def train_phase(
    cfg: PipelineConfig, phase: str, model_uri: str, problems_path: str, acc: Accelerator | None = None
) -> str:
    """PPO for one phase from ``model_uri`` on the problems in ``problems_path``; returns the final policy dir.

    A run that already finished with the same inputs is returned as it is, without
    opening an MLflow run, so re-running the pipeline leaves the tracking store alone.
    Under N processes every process trains and the main process alone tracks the run.

    Raises :class:`TrainingGuardError` when a training guard stops the phase (the
    MLflow run is tagged ``stopped_by_guard``), or stopped it before with the same
    settings (then no run is opened).
    """
    problems = load_problems(problems_path)
    ppo_cfg = cfg.ppo_for(phase)
    acc = acc or accelerator(cfg)
    # Each step's metrics to the stage's MLflow run; a tracking server that stops answering mid-run
    # does not stop training (the metrics wait, and are sent once it answers again).
    step_metrics = tracking.StepMetrics()
    with acc.main_process_first():  # one process creates the tracking store, then the others read it
        tracking.setup(cfg)
        policy_path = local_model_dir(cfg, model_uri)
    mirror: list[CheckpointMirror] = []  # set below, once the run key is known
    grader = Grader.from_config(cfg.grader)  # its worker pool starts on the first answer and stops with the phase
    trainer = PPOTrainer(
        policy_path=policy_path,
        problems=problems,
        out_dir=paths.checkpoints(phase),
        ppo_cfg=ppo_cfg,
        model_cfg=cfg.model,
        prompt_cfg=cfg.prompt,
        reward_cfg=cfg.reward,
        grader=grader,
        on_step=step_metrics if acc.is_main_process else None,
        accelerator=acc,
        start_key=model_uri,
        on_checkpoint=lambda path: [m.push(path) for m in mirror],
    )
    done = trainer.finished()
    if done is not None:
        log.info("%s already trained in %s", phase, done)
        return str(done)
    if CheckpointMirror.enabled(cfg) and acc.is_main_process:
        mirror.append(CheckpointMirror(cfg, phase, trainer.run_key))
        if trainer.resumable_step() is None:  # a new machine, or a wiped disk: resume from the store's copy
            mirror[0].restore(trainer.ckpt_dir)
    acc.wait_for_everyone()
    # Checkpoints upload in the background: the phase returns only once the last one is in the
    # store (so a registered phase has its resume state there), and a crash or a guard stop still
    # finishes it, for a restart elsewhere.
    failed = True
    try:
        if acc.is_main_process:
            final = _train_tracked(cfg, phase, model_uri, trainer, len(problems), ppo_cfg, step_metrics)
        else:
            final = trainer.train()
        failed = False
    finally:
        grader.close()
        finish_uploads(mirror, training_failed=failed)
    return str(final)


def _train_tracked(cfg: PipelineConfig, phase: str, model_uri: str, trainer: PPOTrainer, n_problems: int,
                   ppo_cfg: PPOConfig, step_metrics: tracking.StepMetrics) -> Path:
    """PPO on the main process, inside the phase's MLflow run."""
    # A run killed mid-phase resumes from its last checkpoint; it also carries on in the MLflow
    # run it had opened, so the phase keeps one run and one metric history.
    stage = f"train-{phase}"
    try:
        trainer.raise_if_stopped()
        resume_at = trainer.resumable_step()
        reopen = tracking.unfinished_run(cfg, stage, trainer.run_key) if resume_at is not None else None
        with _stage_run(cfg, stage, resume_run_id=reopen, phase=phase, model_uri=model_uri,
                        run_key=trainer.run_key) as run:
            if reopen is not None:
                log.info("%s: resuming at step %d in MLflow run %s", phase, resume_at, reopen)
            else:
                mlflow.log_params({"phase_problems": n_problems,
                                   "phase_ppo": json.dumps(ppo_cfg.model_dump(mode="json"))})
            try:
                final = trainer.train()
            except TrainingGuardError as exc:
                step_metrics.flush()
                mlflow.set_tags({"stopped_by_guard": exc.stop.get("guard", "?"),
                                 "stopped_at_step": str(exc.stop.get("step", "?"))})
                for name in ("metrics.jsonl", STOP_FILE):
                    if (paths.checkpoints(phase) / name).is_file():
                        mlflow.log_artifact(str(paths.checkpoints(phase) / name))
                raise
            step_metrics.flush()
            _log_training(phase, run)
    except TrainingGuardError as exc:
        raise TrainingGuardError(f"{exc} {phase} was not registered.", exc.stop) from None
    return final


def _log_training(phase: str, run) -> None:
    """The phase's metrics, their plot and a Prefect table, on its MLflow run."""
    metrics_file = paths.checkpoints(phase) / "metrics.jsonl"
    if metrics_file.is_file():
        mlflow.log_artifact(str(metrics_file))
        rows = read_jsonl(metrics_file)
        mlflow.log_artifact(str(plots.plot_training({phase: rows}, paths.checkpoints(phase) / "training.png")))
        publish_training_table(phase, f" (MLflow run {run.info.run_id})", rows)


def publish_training_table(phase: str, where: str = "", rows: list[dict] | None = None) -> None:
    """The phase's metrics per step (``rows``, else its metrics.jsonl) as a Prefect table, when in a flow run."""
    metrics_file = paths.checkpoints(phase) / "metrics.jsonl"
    if rows is None and metrics_file.is_file():
        rows = read_jsonl(metrics_file)
    if rows:
        publish.table(f"{phase}-metrics", [publish.step_row(r) for r in rows], f"{phase} PPO metrics per step{where}")


def train_phase_task(cfg: PipelineConfig, phase: str, model_uri: str, problems_path: str) -> str:
    """The flow's train task: :func:`train_phase` in this process, or with ``launch.num_processes`` > 1 as
    an ``accelerate launch`` child job of that many processes (tasks/launch.py)."""
    if cfg.launch.num_processes > 1:
        from concise_rl.tasks.launch import train_phase_launched

        return train_phase_launched(cfg, phase, model_uri, problems_path)
    return train_phase(cfg, phase, model_uri, problems_path)


def register(cfg: PipelineConfig, phase: str, model_dir: str, parent: dict[str, str]) -> dict[str, str]:
    """Register a trained policy as a version (once per training run) and point its alias at it.

    The folder is committed to the artifact store first; only then is the version
    created, with its lineage tags (``checkpoint_uri`` among them). A failed
    upload raises and registers nothing.
    """
    client = tracking.setup(cfg)
    state = json.loads((Path(model_dir) / "trainer_state.json").read_text())
    stop = read_stop(Path(model_dir).parent)  # the trainer's folder: <out>/final next to <out>/stopped.json
    if stop is not None and stop.get("run_key") == state["run_key"]:
        raise TrainingGuardError(f"{phase} is not registered: a training guard stopped its run. {stop['message']}",
                                 stop)
    existing = tracking.find_version(
        client, cfg.registry.model_name, phase=PHASE_TAG[phase], run_key=state["run_key"],
        parent_version=parent["version"],
    )
    if existing is None:
        with _stage_run(cfg, f"register-{phase}", phase=phase):
            checkpoint_uri, pin = _store_checkpoint(cfg, Path(model_dir), phase)
            faults.point("after-upload")
            existing = tracking.register_model_dir(
                client, cfg, Path(model_dir), phase=PHASE_TAG[phase], parent_version=parent["version"],
                # A final folder written before the trainer recorded the hash has none.
                problems_hash=state.get("problems_hash", "unknown"), checkpoint_uri=checkpoint_uri,
                tags={"run_key": state["run_key"], "ppo_steps": str(state["step"]), **pin, **_RUN_TAGS.get()},
            )
    faults.point("before-alias")
    client.set_registered_model_alias(cfg.registry.model_name, PHASE_ALIAS[phase], existing.version)
    return _version_info(existing)


# --------------------------------------------------------------------------- evaluation
def evaluation_sets(cfg: PipelineConfig) -> dict[str, list[Problem]]:
    sets = {}
    if cfg.evaluation.heldout is not None:
        sets["heldout"] = load_source(cfg.evaluation.heldout, split="heldout")
    for name, src in cfg.evaluation.benchmarks.items():
        sets[name] = load_source(src, split="heldout")
    return sets


def _local_model_key(model_dir: str) -> str:
    """A local model folder by path and weight files (size, mtime): a retrained folder is a new model."""
    if artifact_store.is_s3(model_dir):  # a committed store folder is named by its content
        return stable_hash(model_dir)[:12]
    root = Path(model_dir).resolve()
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.glob("*.safetensors"))
    return stable_hash([str(root), weights])[:12]


def _evaluation_dir(cfg: PipelineConfig, info: dict[str, str], key: str) -> Path:
    if info["version"] == "local":
        return paths.evaluations() / f"local-{_local_model_key(info['uri'])}-{key}"
    name = info["uri"][len("models:/"):].split("/")[0] if info["uri"].startswith("models:/") else cfg.registry.model_name
    return paths.evaluations() / f"{name}-v{info['version']}-{key}"


def evaluate(cfg: PipelineConfig, models: dict[str, dict[str, str]]) -> dict[str, dict]:
    """Evaluate each labelled model; cached per version (or local folder) and evaluation settings.

    Writes every graded response and a summary per model, then a report over all of
    them (markdown and plots, evaluation/report.py) that goes to MLflow and, inside a
    Prefect run, to the UI as a markdown artifact. Each model's folder and the report
    are also committed to the artifact store under ``evaluations/`` (skipped where
    the same content is already there).
    """
    store = artifact_store.open_store(cfg.store)
    sets = evaluation_sets(cfg)
    key = stable_hash({"eval": cfg.evaluation.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(),
                       "sets": {k: problems_hash(v) for k, v in sets.items()}, "seed": cfg.seed})
    results: dict[str, dict] = {}
    folders: dict[str, Path] = {}
    # Every model still to evaluate is checked against every set before the first is loaded: a set
    # whose prompts do not fit (the config's limit, or the model's context) fails at once, all named.
    todo: dict[str, tuple[str, object]] = {}
    for label, info in models.items():
        folders[label] = _evaluation_dir(cfg, info, key)
        if not (folders[label] / "summary.json").is_file():
            model_dir = local_model_dir(cfg, info["uri"])
            tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code, prompt=cfg.prompt)
            check_sets(tokenizer, sets, cfg.evaluation, cfg.prompt, context_length(model_dir))
            todo[label] = (model_dir, tokenizer)
    with _stage_run(cfg, "evaluate"), Grader.from_config(cfg.grader) as grader:
        for label, info in models.items():
            out = folders[label]
            summary_file = out / "summary.json"
            if label in todo:
                model_dir, tokenizer = todo[label]
                model = load_policy(model_dir, cfg.model, device=device(cfg))
                summary, records = evaluate_model(
                    model, tokenizer, sets, cfg.evaluation, cfg.prompt, grader, seed=cfg.seed,
                    engine=cfg.model.generation_engine,
                )
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "responses.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                atomic_write_json(summary_file, summary)
            summary = json.loads(summary_file.read_text())
            results[label] = {"version": info["version"], "uri": info["uri"], "eval": summary}
            for bench, temps in {**summary, "macro": macro_average(summary)}.items():
                for t, m in temps.items():
                    tracking.log_metrics({f"{label}.{bench}.T{t}.accuracy_pct": 100 * m["accuracy"],
                                          f"{label}.{bench}.T{t}.mean_length": m["mean_length"]})
            mlflow.log_artifacts(str(out), artifact_path=f"evaluations/{label}")
            uploaded = store.upload_dir(out, store.uri("evaluations", out.name))
            mlflow.set_tag(f"store.evaluations.{label}", uploaded.uri)
        which = stable_hash(sorted((k, v["version"], v["uri"]) for k, v in models.items()))[:8]
        report_dir = paths.evaluations() / "reports" / f"{key}-{which}"
        files = write_report(
            results, {label: read_jsonl(folder / "responses.jsonl") for label, folder in folders.items()}, report_dir,
            gate_cfg=cfg.gate,
        )
        mlflow.log_artifacts(str(report_dir), artifact_path="report")
        uploaded = store.upload_dir(report_dir, store.uri("evaluations", "reports", report_dir.name))
        mlflow.set_tag("store.evaluations.report", uploaded.uri)
        for label in models:
            results[label]["report"] = str(report_dir)
        plots_shown = {f: f"{report_dir / f.name}; MLflow run {mlflow.active_run().info.run_id}, report/{f.name}"
                       for f in files[1:] if f.suffix == ".png"}
        publish.markdown("evaluation-report", publish.with_plots(files[0].read_text(encoding="utf-8"), plots_shown),
                         "concise-rl evaluation report")
    return results


# --------------------------------------------------------------------------- gate
def promote(cfg: PipelineConfig, results: dict[str, dict], parent_label: str = "phase1") -> dict:
    """Gate the phase-2 candidate against its parent; move ``champion`` only if it passes.

    Writes the summary to reports/<time>/summary.json and reports/latest/; a
    failed gate tags the candidate with the failed criteria and is reported in
    ``summary["promoted"]``, not raised, since it is a normal outcome of a run.
    """
    client = tracking.setup(cfg)
    name = cfg.registry.model_name
    _refuse_stopped_runs(client, name, results)
    candidate, parent = results["phase2"], results[parent_label]
    verdict = evaluate_gate(candidate["eval"], parent["eval"], cfg.gate)
    reductions = length_reductions(candidate["eval"], parent["eval"])
    with _stage_run(cfg, "promote", candidate_version=candidate["version"]) as run:
        version = candidate["version"]
        client.set_model_version_tag(name, version, "gate", "passed" if verdict["passed"] else "failed")
        recorded = model_card.eval_tags(candidate["eval"], reductions, verdict)
        if verdict["passed"]:
            for key, value in recorded.items():
                client.set_model_version_tag(name, version, key, value)
            faults.point("before-champion")
            client.set_registered_model_alias(name, "champion", version)
        else:
            failed = [c["name"] for c in verdict["criteria"] if not c["passed"]]
            client.set_model_version_tag(name, version, "gate_failed_criteria", "; ".join(failed)[:5000])
        champion = tracking.version_by_alias(client, name, "champion")
        summary = {
            "promoted": verdict["passed"],
            "registered_model": name,
            "champion_version": str(champion.version) if champion else None,
            "models": {label: {"version": r["version"], "eval": r["eval"]} for label, r in results.items()},
            "length_reduction_pct": reductions,
            "gate": verdict,
            "git_sha": _RUN_TAGS.get().get("git_sha"),
        }
        tracking.log_metrics(model_card.gate_metrics(recorded, verdict))
        model_card.write_cards(cfg, client, results, parent_label, verdict)
        mlflow.log_dict(summary, "summary.json")
        report_dir = paths.reports() / time.strftime("%Y%m%d-%H%M%S")
        atomic_write_json(report_dir / "summary.json", summary)
        figures = _report_plots(report_dir)
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="plots")
    latest = paths.reports() / "latest"
    with replaced_dir(latest) as tmp:
        shutil.copytree(report_dir, tmp, dirs_exist_ok=True)
    shown = {latest / f.name: f"{latest / f.name}; MLflow run {run.info.run_id}, plots/{f.name}" for f in figures}
    publish.markdown("pipeline-summary", publish.summary_markdown(summary, shown, cfg.gate),
                     "concise-rl pipeline summary")
    publish.table("gate-verdict", publish.gate_rows(verdict),
                  f"Gate: v{candidate['version']} against v{parent['version']} "
                  f"({'passed' if verdict['passed'] else 'failed'})")
    return summary


def _refuse_stopped_runs(client, name: str, results: dict[str, dict]) -> None:
    """Raise if a trained model in ``results`` comes from a PPO run that a training guard stopped.

    Such a run is never registered (:func:`register` refuses it too); this is the last
    line: whatever version the gate is handed, its ``run_key`` tag must not match the
    stop record its phase left in the checkpoints folder.
    """
    for phase in ("phase1", "phase2"):
        info = results.get(phase)
        if info is None or info["version"] == "local":
            continue
        stop = read_stop(paths.checkpoints(phase))
        run_key = client.get_model_version(name, info["version"]).tags.get("run_key")
        if stop is not None and run_key and stop.get("run_key") == run_key:
            raise TrainingGuardError(
                f"the gate refuses version {info['version']} ({phase}): a training guard stopped the PPO run it "
                f"comes from, and 'champion' stays where it was. {stop['message']}", stop,
            )


def _report_plots(report_dir: Path) -> list[Path]:
    """Training curves of both phases and the curated pass-rate histogram, next to the summary."""
    figures = []
    phases = {p: read_jsonl(paths.checkpoints(p) / "metrics.jsonl") for p in ("phase1", "phase2")
              if (paths.checkpoints(p) / "metrics.jsonl").is_file()}
    if phases:
        figures.append(plots.plot_training(phases, report_dir / "training_curves.png"))
    curation = read_latest(paths.curation())
    if curation is not None:
        histogram = curation / "pass_rates.png"
        if histogram.is_file():
            shutil.copy(histogram, report_dir / "pass_rates.png")
            figures.append(report_dir / "pass_rates.png")
    return figures
