"""Model URIs (tasks/model_uri.py): the CLI, the evaluation flow and the stages take the same forms, with the same
messages, an ``s3://`` checkpoint folder included (against the real S3-compatible server of tests/test_store.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_cli import DEMO, run_cli
from test_evaluate_cli import SMALL
from test_store import s3_server  # noqa: F401 - s3_server: fixture

from concise_rl.config import PipelineConfig
from concise_rl.flows.evaluate import resolve_models
from concise_rl.store import MANIFEST, ArtifactStore, StoreError
from concise_rl.tasks.model_uri import local_model_dir, resolve_model


@pytest.mark.parametrize(("uri", "error", "message"), [
    ("no-such-model", FileNotFoundError, "not a models:/ URI, not an s3:// checkpoint folder and not a model directory"),
    ("models:/concise-rl-demo/", LookupError, "not a registry URI; write models:/NAME/VERSION (a number)"),
    ("models:/concise-rl-demo/7", LookupError, "no registered model 'concise-rl-demo'; the registry holds no model yet; "
     "`concise-rl models` lists"),
])
def test_every_caller_refuses_a_bad_uri_with_the_same_message(uri, error, message, mlflow_home):
    cfg = PipelineConfig()
    with pytest.raises(error, match="^" + re.escape(f"--model {uri}: {message}")):
        resolve_model(cfg, uri)  # what the CLI's --model, --start, A and B go through
    with pytest.raises(error, match="^" + re.escape(f"model m={uri}: {message}")):
        resolve_models(cfg, {"m": uri})
    with pytest.raises(error, match="^" + re.escape(f"--model {uri}: {message}")):
        local_model_dir(cfg, uri)  # what the stages (curate, train, evaluate) and the ablation load models with


def test_every_caller_takes_an_s3_checkpoint_folder(s3_server, tmp_path, tiny_model_dir, mlflow_home):
    cfg = PipelineConfig(store=s3_server.store_config("uri").model_dump())
    upload = ArtifactStore(cfg.store).upload_checkpoint(tiny_model_dir, model_name="m", phase="base")

    # The evaluation flow: a folder in the store, checked when it is downloaded.
    assert resolve_models(cfg, {"s3": upload.uri}) == {"s3": {"version": "local", "uri": upload.uri}}

    # The stages: downloaded once into <home>/downloads/, every file checked against the manifest.
    local = Path(local_model_dir(cfg, upload.uri))
    files = sorted(p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.name != MANIFEST) \
        == files
    assert all((local / f).read_bytes() == (tiny_model_dir / f).read_bytes() for f in files)
    assert local.parent == mlflow_home / "downloads"
    assert local_model_dir(cfg, upload.uri) == str(local)
    with pytest.raises(StoreError, match="not a committed checkpoint folder"):
        local_model_dir(cfg, upload.uri.rsplit("/", 1)[0] + "/no-such-folder")

    # The CLI: `evaluate --model LABEL=s3://...` evaluates the stored model.
    home = tmp_path / "cli-home"
    store = [f"store.{k}={v}" for k, v in (("uri", cfg.store.uri), ("endpoint_url", cfg.store.endpoint_url),
                                           ("region", cfg.store.region))]
    code, out, err = run_cli(["evaluate", "--config", str(DEMO), "--model", f"stored={upload.uri}", "--limit", "2",
                              "--temperatures", "0", *SMALL, *[a for s in store for a in ("--set", s)]], home)
    assert code == 0, err[-3000:]
    assert "report:" in out
    assert len(list(home.glob("downloads/store-*"))) == 1 and len(list(home.glob("evaluations/local-*"))) == 1
