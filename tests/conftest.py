"""Shared fixtures: a tiny Qwen2 model and tokenizer saved in Hugging Face format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.mechanism import tiny_random_model
from concise_rl.config import PromptConfig
from concise_rl.grader import Grader
from concise_rl.training.models import format_prompt, load_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 1-layer Qwen2 with the project's own tokenizer (chat template included)."""
    out = tiny_random_model(tmp_path_factory.mktemp("tiny-model"))
    assert format_prompt("x", load_tokenizer(str(out)), PromptConfig()).endswith("<|im_start|>assistant\n")
    return out


@pytest.fixture(scope="session")
def grader():
    """One answer grader for the session's tests (two workers). Its timeout is generous: a
    verdict must not depend on how busy the machine is; the timeout tests use their own."""
    with Grader(workers=2, timeout_s=60.0) as g:
        yield g


@pytest.fixture(scope="session")
def tiny_bf16_model_dir(tmp_path_factory) -> Path:
    """The same tiny model with its weights stored in bfloat16, as real checkpoints (R1, Qwen) are."""
    return tiny_random_model(tmp_path_factory.mktemp("tiny-model-bf16"), dtype=torch.bfloat16)


@pytest.fixture
def mlflow_home(tmp_path, monkeypatch) -> Path:
    """A temporary home for the sqlite MLflow store; MLflow's process-wide URIs are put back afterwards.

    tracking.setup() sets the tracking and registry URIs globally (and in the
    environment, for subprocesses); later tests must not inherit this test's store.
    """
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("CONCISE_RL_HOME", str(home))
    (home / "prefect").mkdir(parents=True)
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    return home


@pytest.fixture
def champion(mlflow_home: Path):
    """The demo's shipped base registered in a fresh home and made champion; (config, registry URI, problem)."""
    from concise_rl.config import load_config
    from concise_rl.synthetic import generate_problems
    from concise_rl.tasks import stages, tracking

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    base = stages.prepare_base(cfg)
    client = tracking.setup(cfg)
    client.set_registered_model_alias(cfg.registry.model_name, "champion", base["version"])
    problem = generate_problems(1, seed=5, min_level=3, max_level=3, split="heldout")[0]
    return cfg, f"models:/{cfg.registry.model_name}@champion", problem


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server for the tests that run the pipeline many times (tests/prefect_server.py)."""
    from prefect_server import start_server, stop

    processes: list = []
    try:
        yield start_server(processes, tmp_path_factory.mktemp("prefect-server"))
    finally:
        for proc in processes:
            stop(proc)


@pytest.fixture(autouse=True)
def _isolate_mlflow_uris(monkeypatch):
    """MLflow keeps its tracking and registry URIs process-wide (and in the environment);
    a test that points them at its own store or server must not leave them to the next,
    nor may an in-process CLI call leave its PREFECT_HOME to later subprocesses."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    # The CLI's main() also sets PREFECT_HOME for the home it ran with.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_HOME"):
        # setenv records the current state (set or absent) so teardown restores it.
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
