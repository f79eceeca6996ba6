"""MLflow: the tracking store, one run per stage, and the model registry.

Every model the pipeline produces (the base, phase 1, phase 2) is a version of one
registered model, tagged with its lineage (:data:`LINEAGE_TAGS`: phase, parent
version, config hash, training-problems hash, code commit, and the artifact-store
URI of its checkpoint), and addressed by aliases (``base``, ``phase1``,
``candidate``, ``champion``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from concise_rl import paths
from concise_rl.config import PipelineConfig, redact_url
from concise_rl.errors import PreemptedError, TrackingServerError

log = logging.getLogger(__name__)

LINEAGE_TAGS = ("phase", "parent_version", "config_hash", "problems_hash", "git_commit", "checkpoint_uri")
CODE_ROOT = Path(__file__).resolve().parents[1]


def tracking_uri(cfg: PipelineConfig) -> str:
    return cfg.registry.tracking_uri or f"sqlite:///{paths.mlflow_db()}"


def is_server(uri: str) -> bool:
    """A tracking URI served over HTTP: the server, not this machine, decides where artifacts go."""
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail at once, in one line, when ``uri`` is an MLflow server that does not answer.

    MLflow's own client retries a refused connection for about two minutes before it
    gives up with a traceback. Any HTTP answer (even 401/403 from a proxy in front
    of the server) counts as reachable; only a failed connection is refused here.
    """
    if not is_server(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingServerError(
            f"no MLflow server answers at registry.tracking_uri {redact_url(uri)} ({reason}); start it (for example "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination s3://BUCKET/PREFIX`) "
            f"or fix registry.tracking_uri (unset, the local sqlite store under the concise-rl home is used)"
        ) from None


def setup(cfg: PipelineConfig) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists.

    A local store (sqlite, the default) keeps its artifacts under the concise-rl home;
    an MLflow server keeps them where it was told (``--artifacts-destination``).
    """
    paths.home().mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(cfg.registry.experiment) is None:
        location = None if is_server(uri) else paths.mlflow_artifacts().as_uri()
        with contextlib.suppress(MlflowException):  # another process created it first
            client.create_experiment(cfg.registry.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.registry.experiment)
    return client


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def stage_run(cfg: PipelineConfig, stage: str, *, resume_run_id: str | None = None,
              **tags: str) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run per pipeline stage, with the whole config as params (credentials in URLs removed).

    ``resume_run_id`` reopens an earlier run of the same stage (one a crash left
    RUNNING or FAILED) instead of starting a new one, so an interrupted training
    phase keeps one run with one metric history; its params are already there.
    """
    setup(cfg)
    if resume_run_id is not None:
        with mlflow.start_run(run_id=resume_run_id) as run, _killed_on_stop():
            mlflow.set_tags({"resumed": "true", **tags})
            yield run
        return
    with mlflow.start_run(run_name=stage, tags={"stage": stage, "config_hash": cfg.config_hash(), **tags}) as run, \
            _killed_on_stop():
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                  for k, v in _flatten(cfg.loggable()).items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield run


@contextlib.contextmanager
def _killed_on_stop() -> Iterator[None]:
    """A run stopped by a signal (a preemption, Ctrl-C, a SIGTERM) ends KILLED, not FAILED: nothing went wrong
    in it, and the same command resumes it."""
    try:
        yield
    except (PreemptedError, KeyboardInterrupt, SystemExit):
        mlflow.end_run("KILLED")
        raise


def close_orphaned_runs(cfg: PipelineConfig) -> int:
    """End KILLED the runs of the config's experiment still RUNNING when a pipeline starts; how many.

    The pipeline holds the model's registry lock, so no other pipeline of this model is running: such a
    run was left by one that died without unwinding (SIGKILL, a lost node). A training run among them
    is reopened when its phase resumes (:func:`unfinished_run` takes KILLED runs too), as after a
    preemption. A command run alone next to the pipeline (``concise-rl evaluate``) ends its own run
    FINISHED when it is done, whatever this set.
    """
    client = MlflowClient(tracking_uri(cfg), tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    if runs:
        log.info("ended KILLED %d MLflow run(s) a killed pipeline left RUNNING", len(runs))
    return len(runs)


def unfinished_run(cfg: PipelineConfig, stage: str, run_key: str) -> str | None:
    """The newest run of ``stage`` tagged with ``run_key`` that did not finish (killed or failed), if any."""
    client = MlflowClient(tracking_uri(cfg), tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.stage = '{stage}' and tags.run_key = '{run_key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite numbers only: MLflow rejects NaN in some stores, and NaN means 'no data' here."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


# How long the end of a training stage waits for a tracking server that stopped answering mid-run.
TRACKING_WAIT_S = 600.0
_BATCH = 1000  # MLflow takes at most 1000 metrics per log_batch call


class StepMetrics:
    """The ``on_step`` callback of a training stage: every step's metrics to the active MLflow run.

    A tracking server that stops answering mid-run (restarted, a network blip) must not cost
    training work. MLflow's client first retries each call itself, with exponential backoff
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``); if the
    call still fails, the step's metrics are kept, with their step and time, and sent with
    the next step's. Training goes on meanwhile, and metrics.jsonl has every step on disk.
    A batch the server stored but could not answer for is sent again unchanged, timestamp
    included, and MLflow's store drops such an exact repeat, so no step is logged twice.
    :meth:`flush`, after training, waits for the server (with backoff, up to ``wait_s``)
    and sends what is left, so the run ends with every step's metrics.
    """

    def __init__(self, wait_s: float = TRACKING_WAIT_S):
        self.wait_s = wait_s
        self.pending: list[Metric] = []
        self.run_id: str | None = None
        self.failing_since: int | None = None  # the first step not logged, while the server does not answer

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            run = mlflow.active_run()
            if run is None:
                raise RuntimeError("StepMetrics needs an active MLflow run (use stage_run)")
            self.run_id = run.info.run_id
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and math.isfinite(v)]
        self._send()

    def _send(self) -> bool:
        client = MlflowClient()
        while self.pending:
            try:
                client.log_batch(self.run_id, metrics=self.pending[:_BATCH])
            except (MlflowException, OSError) as exc:  # requests' errors are OSErrors
                if self.failing_since is None:
                    self.failing_since = min(m.step for m in self.pending)
                    log.warning("tracking server %s did not answer (%s); training goes on, and the metrics from "
                                "step %d on are sent once it answers again (metrics.jsonl has them meanwhile)",
                                mlflow.get_tracking_uri(), _first_line(exc), self.failing_since)
                return False
            del self.pending[:_BATCH]
        if self.failing_since is not None:
            log.info("tracking server answers again; the metrics from step %d on are logged", self.failing_since)
            self.failing_since = None
        return True

    def flush(self) -> None:
        """Send what is still pending, waiting for the server with backoff (1 s doubling to 5 s, up to ``wait_s``)."""
        deadline, delay = time.monotonic() + self.wait_s, 1.0
        while self.pending and not self._send():
            if time.monotonic() + delay > deadline:
                steps = sorted({m.step for m in self.pending})
                log.warning("tracking server %s did not answer for %.0f s after training: the metrics of steps "
                            "%d-%d are not in the MLflow run (metrics.jsonl has them)",
                            mlflow.get_tracking_uri(), self.wait_s, steps[0], steps[-1])
                return
            time.sleep(delay)
            delay = min(2 * delay, 5.0)  # a server back up is noticed within 5 s


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name, description="concise-rl: base, phase-1 and phase-2 policies")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=CODE_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, str]:
    """``git_commit`` of the code that runs (``unknown`` outside a git checkout of it) and ``git_dirty``.

    Only a checkout whose top level is this project counts: an installed copy that
    happens to sit inside some other repository (a venv in a clone) is ``unknown``.
    """
    top = _git("rev-parse", "--show-toplevel")
    commit = _git("rev-parse", "HEAD") if top and Path(top).resolve() == CODE_ROOT else None
    if not commit:
        return {"git_commit": "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def lineage_tags(
    cfg: PipelineConfig, *, phase: str, parent_version: str | None, problems_hash: str | None, checkpoint_uri: str
) -> dict[str, str]:
    """The tags every registered version carries (MLflow tags are strings: None becomes '')."""
    return {"phase": phase, "parent_version": parent_version or "", "config_hash": cfg.config_hash(),
            "problems_hash": problems_hash or "", "checkpoint_uri": checkpoint_uri, **code_version()}


def register_model_dir(
    client: MlflowClient, cfg: PipelineConfig, model_dir: Path, *, phase: str, parent_version: str | None,
    problems_hash: str | None, checkpoint_uri: str, tags: dict[str, str],
) -> ModelVersion:
    """Log a Hugging Face model folder as an MLflow Model (tasks/mlflow_model.py) with its model card,
    and register it as a new version whose description is that card.

    Must be called inside a stage run, after the checkpoint is committed to the
    artifact store at ``checkpoint_uri``; the version's source is the run's artifact.
    """
    from concise_rl.tasks import mlflow_model, model_card

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model_dir needs an active MLflow run (use stage_run)")
    all_tags = {**lineage_tags(cfg, phase=phase, parent_version=parent_version, problems_hash=problems_hash,
                               checkpoint_uri=checkpoint_uri), **tags}
    card = model_card.render(cfg, all_tags)
    # On the home's disk, not /tmp: the MLflow Model holds a second copy of the weights.
    scratch = paths.home() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="mlflow-model-") as tmp:
        mlflow_model.save(model_dir, Path(tmp) / "model", cfg, card)
        mlflow.log_artifacts(str(Path(tmp) / "model"), artifact_path="model")
    ensure_registered_model(client, cfg.registry.model_name)
    version = client.create_model_version(
        cfg.registry.model_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=all_tags,
        description=description(card),
    )
    return version


# MLflow's SQL stores hold a version's description in a VARCHAR(5000).
DESCRIPTION_LIMIT = 5000


def description(card: str) -> str:
    """The model card as a version's description: whole when it fits the store's column, else cut at a
    line with a pointer to the full card (README.md in the version's artifacts)."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = "\n\n(cut to fit the registry; the whole card is README.md in this version's artifacts)"
    return card[: card.rfind("\n", 0, DESCRIPTION_LIMIT - len(note))] + note


def update_model_card(client: MlflowClient, cfg: PipelineConfig, version: ModelVersion, card: str) -> None:
    """Replace a registered version's model card: its description and its README.md files."""
    from concise_rl.tasks import mlflow_model

    client.update_model_version(version.name, version.version, description=description(card))
    if not version.run_id:
        return
    scratch = paths.home() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="model-card-") as tmp:
        for name, folder in ((mlflow_model.CARD, "model"), (mlflow_model.CARD, f"model/{mlflow_model.HF_SUBDIR}"),
                             (mlflow_model.MLFLOW_CARD, "model")):
            card_file = Path(tmp) / name
            card_file.write_text(card, encoding="utf-8")
            client.log_artifact(version.run_id, str(card_file), artifact_path=folder)


def find_version(client: MlflowClient, name: str, **tags: str) -> ModelVersion | None:
    """The newest version of ``name`` whose tags include all of ``tags``."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if all(v.tags.get(k) == val for k, val in tags.items())]
    return max(matching, key=lambda v: int(v.version), default=None)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# A registry URI: models:/NAME/VERSION (pinned) or models:/NAME@ALIAS (moves with the alias).
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


def resolve_model_uri(uri: str) -> str:
    """A local directory for a ``models:/`` or ``runs:/`` URI; other strings pass through unchanged.

    A local tracking store keeps its artifacts on this disk, and MLflow returns their
    own folder. From a server, a pinned version (``models:/NAME/N``) or a run's
    artifact is immutable, so it is downloaded once into ``<home>/downloads/`` and
    reused by every later stage and re-run: the path stays the same, nothing is
    fetched twice, and a half-finished download is never used (it lands in a
    temporary folder, renamed when complete, and a marker is written last). Aliases (``models:/NAME@a``)
    move, so they are downloaded afresh each time.
    """
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    registry = MODEL_URI.match(uri)
    pinned = registry is not None and registry["version"] is not None
    from concise_rl.tasks.mlflow_model import hf_folder  # a version is an MLflow Model: its model/ folder

    if not is_server(mlflow.get_tracking_uri()) or not (pinned or uri.startswith("runs:/")):
        return str(hf_folder(mlflow.artifacts.download_artifacts(artifact_uri=uri)))
    digest = hashlib.sha256(f"{mlflow.get_tracking_uri()} {uri}".encode()).hexdigest()[:16]
    target = paths.home() / "downloads" / digest
    marker = target.with_name(f"{digest}.complete")  # written last: the folder is whole
    if marker.is_file() and target.is_dir():
        return str(hf_folder(target))
    tmp = target.with_name(f"{digest}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
    # download_artifacts puts a run's or model's files either directly in dst_path or in one sub-folder.
    entries = list(tmp.iterdir())
    source = entries[0] if len(entries) == 1 and entries[0].is_dir() and not (tmp / "config.json").exists() else tmp
    shutil.rmtree(target, ignore_errors=True)
    os.replace(source, target)
    shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text(uri + "\n")
    log.info("downloaded %s to %s", uri, target)
    return str(hf_folder(target))


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


# Tags of versions promoted before 2026-12-07 held fractions; read as the percent / points tags.
_LEGACY_FRACTIONS = {"accuracy": "accuracy_pct", "accuracy_diff": "accuracy_change_pts",
                     "accuracy_diff_ci_low": "accuracy_change_ci_low_pts",
                     "accuracy_diff_ci_high": "accuracy_change_ci_high_pts"}
_EVAL_TAG = re.compile(r"^eval\.(?P<set>.+?)\.T(?P<t>\d+(?:\.\d+)?)\.(?P<figure>[a-z_]+)$")


def read_client(cfg: PipelineConfig) -> MlflowClient:
    """A client on the configured store that creates no experiment (for read-only commands)."""
    uri = tracking_uri(cfg)
    if not cfg.registry.tracking_uri:
        paths.home().mkdir(parents=True, exist_ok=True)
    check_server(uri)
    return MlflowClient(uri, uri)


def describe_versions(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Every version of the config's registered model, oldest first: aliases, lineage, gate verdict and recorded figures.

    ``eval`` holds the ``eval.<set>.T<t>.<figure>`` tags a promoted version carries
    (accuracy_pct, mean_length, length_reduction_pct, accuracy_change_pts and its CI) as
    floats, by set and temperature. Raises LookupError when the model is not registered.
    """
    client, name = read_client(cfg), cfg.registry.model_name
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise LookupError(f"no registered model {name!r} in the tracking store {redact_url(tracking_uri(cfg))}; "
                          f"register one first (concise-rl run, curate or train)") from exc
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        figures: dict[str, dict[str, dict[str, float]]] = {}
        for key, value in v.tags.items():
            match = _EVAL_TAG.match(key)
            if match:
                try:
                    number = float(value)
                except ValueError:
                    continue
                figure = match["figure"]
                if figure in _LEGACY_FRACTIONS:  # a version promoted before the tags were in percent
                    figure, number = _LEGACY_FRACTIONS[figure], 100 * number
                figures.setdefault(match["set"], {}).setdefault(match["t"], {})[figure] = number
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=UTC)
        rows.append({
            "version": str(v.version), "uri": model_uri(name, v.version),
            "aliases": sorted(aliases.get(str(v.version), [])),
            "phase": v.tags.get("phase", ""), "parent_version": v.tags.get("parent_version", ""),
            "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "gate": v.tags.get("gate", ""), "gate_failed_criteria": v.tags.get("gate_failed_criteria", ""),
            **{tag: v.tags.get(tag, "") for tag in ("config_hash", "problems_hash", "git_commit", "checkpoint_uri")},
            "run_id": v.run_id or "", "eval": figures,
        })
    return rows
