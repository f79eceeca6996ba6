"""The registry behind a real `mlflow server`: sqlite backend, artifacts proxied to S3.

Two real servers on loopback: ``rclone serve s3`` (as in test_store.py) and
``mlflow server --backend-store-uri sqlite:///... --artifacts-destination
s3://BUCKET/mlflow`` with MLFLOW_S3_ENDPOINT_URL pointing at it. The pipeline's own
registration path (prepare_base, register) runs against
``registry.tracking_uri: http://127.0.0.1:PORT`` from a process that has no S3
credentials and no MLflow state of its own: the server alone writes to the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_store import BUCKET, S3Server, free_port, same_tree

from concise_rl import cli

PREFIX = "mlflow"


class MlflowServer:
    """``mlflow server`` on loopback, its own process group so that its workers stop with it."""

    def __init__(self, root: Path, s3: S3Server):
        self.root = root
        self.port = free_port()
        self.log = root / "mlflow-server.log"
        self.db = root / "server.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))} | {
            "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        }
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", f"s3://{BUCKET}/{PREFIX}", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def servers(tmp_path, monkeypatch, mlflow_home):
    """Both servers; this process keeps no AWS credentials and no S3 endpoint, so only the server reaches S3."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3 = S3Server(tmp_path / "s3")
    s3.start()
    mlflow_server = MlflowServer(tmp_path / "mlflow-server", s3)
    try:
        mlflow_server.start()
        yield s3, mlflow_server
    finally:
        mlflow_server.stop()
        s3.stop()


def bucket_objects(s3: S3Server) -> dict[str, bytes]:
    """Every object under the MLflow prefix, read back through the S3 API."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
                          config=Config(s3={"addressing_style": "path"}))
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
        for item in page.get("Contents", []):
            objects[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return objects


@pytest.mark.slow
def test_registration_through_an_mlflow_server_with_s3_artifacts(servers, tmp_path, tiny_model_dir, mlflow_home,
                                                                  capsys):
    from mlflow import MlflowClient

    from concise_rl.config import PipelineConfig
    from concise_rl.tasks import stages, tracking

    s3, server = servers
    cfg = PipelineConfig(model={"name_or_path": str(tiny_model_dir)}, registry={"tracking_uri": server.uri})
    base = stages.prepare_base(cfg)
    final = tmp_path / "phase1-final"
    shutil.copytree(tiny_model_dir, final)
    (final / "trainer_state.json").write_text(json.dumps({"step": 2, "run_key": "rk", "problems_hash": "ph"}))
    phase1 = stages.register(cfg, "phase1", str(final), base)
    assert (base["version"], phase1["version"]) == ("1", "2")

    # Every lineage tag on both versions, read back from the server.
    client = MlflowClient(server.uri, server.uri)
    name = cfg.registry.model_name
    versions = {v: client.get_model_version(name, v) for v in ("1", "2")}
    for v in versions.values():
        assert set(tracking.LINEAGE_TAGS) <= set(v.tags), f"version {v.version} lacks lineage tags"
        assert v.tags["config_hash"] == cfg.config_hash() and v.tags["git_commit"]
        assert v.source.startswith("mlflow-artifacts:/"), v.source  # proxied by the server, not a local path
    assert (versions["1"].tags["phase"], versions["1"].tags["parent_version"]) == ("base", "")
    assert (versions["2"].tags["phase"], versions["2"].tags["parent_version"], versions["2"].tags["problems_hash"]) == (
        "1", "1", "ph")
    assert versions["2"].tags["checkpoint_uri"].startswith((mlflow_home / "store").as_uri())
    assert client.get_model_version_by_alias(name, "phase1").version == "2"

    # Each version is an MLflow Model in the bucket, under its run: MLmodel at the top and the
    # model files in model/, byte for byte, with the model card next to them.
    objects = bucket_objects(s3)
    for v, src in (("1", tiny_model_dir), ("2", final)):
        run = versions[v].run_id
        stored = {key.split("/artifacts/model/", 1)[1]: data for key, data in objects.items()
                  if f"/{run}/artifacts/model/" in key}
        assert {"MLmodel", "README.md", "requirements.txt", "input_example.json"} <= set(stored), sorted(stored)
        hf = {name.removeprefix("model/"): data for name, data in stored.items()
              if name.startswith("model/") and name != "model/README.md"}
        expected = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
        assert hf == expected, f"version {v}: bucket holds {sorted(stored)}"
        assert stored["model/README.md"] == stored["README.md"] and b"## Lineage" in stored["README.md"]
        assert versions[v].description == stored["README.md"].decode()

    # Nothing was written to a local MLflow store: no sqlite file, no local artifact folder.
    assert not (mlflow_home / "mlflow.db").exists() and not (mlflow_home / "mlartifacts").exists()

    # models:/ URIs download back through the server, identical to what was registered: the
    # Hugging Face folder (model/) of the MLflow Model, with its card. A pinned version is fetched
    # once into the home's downloads/ and the same folder is returned after that (training keys its
    # checkpoints on it); an alias moves, so it is fetched afresh.
    def same_model(src: Path, folder: Path) -> bool:
        return (folder / "README.md").is_file() and same_tree(src, folder, ignore=("README.md",))

    pinned = Path(tracking.resolve_model_uri(phase1["uri"]))
    assert pinned.name == "model" and (pinned.parent / "MLmodel").is_file() and same_model(final, pinned)
    download = pinned.parent
    assert download.parent == mlflow_home / "downloads" and (download.parent / f"{download.name}.complete").is_file()
    (pinned / "config.json").write_text("{}")  # a second call must not download again
    assert Path(tracking.resolve_model_uri(phase1["uri"])) == pinned and (pinned / "config.json").read_text() == "{}"
    shutil.rmtree(download)  # a marker without its folder is not trusted
    assert same_model(final, Path(tracking.resolve_model_uri(phase1["uri"])))
    by_alias = Path(tracking.resolve_model_uri(f"models:/{name}@base"))
    assert same_model(tiny_model_dir, by_alias) and by_alias.parent.parent != mlflow_home / "downloads"

    # Registering again finds the version on the server; nothing new.
    assert stages.register(cfg, "phase1", str(final), base) == phase1
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    # `concise-rl models` reads the same registry over HTTP.
    capsys.readouterr()  # MLflow's run links so far
    assert cli.main(["models", "--set", f"registry.tracking_uri={server.uri}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["aliases"], r["phase"], r["parent_version"]) for r in rows] == [
        ("1", ["base"], "base", ""), ("2", ["phase1"], "1", "1")]


@pytest.mark.slow
def test_training_rides_out_a_tracking_server_restart(servers, tmp_path, tiny_model_dir):
    """`concise-rl train` against the server; the server is stopped once the first PPO step is
    logged and started again, on the same port and database, a few seconds later.

    MLflow's client would retry each call for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES): here it
    gives up at once, so the outage reaches our code, which must neither lose training work nor
    leave a step out of the run.
    """
    from mlflow import MlflowClient

    from concise_rl.problems import save_problems
    from concise_rl.synthetic import generate_problems

    _, server = servers
    home, steps = tmp_path / "home", 8
    problems = tmp_path / "problems.jsonl"
    save_problems(generate_problems(6, seed=5, min_level=2, max_level=3), problems)
    args = [sys.executable, "-m", "concise_rl.cli", "train", "--phase", "1", "--model", str(tiny_model_dir),
            "--problems", str(problems)]
    for item in [f"registry.tracking_uri={server.uri}", f"ppo.steps={steps}", "ppo.prompts_per_step=2",
                 "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                 "ppo.max_new_tokens=16", "ppo.checkpoint_every=4", "grader.workers=0",
                 # The untrained tiny model truncates every response and solves nothing: the training
                 # guards would (rightly) stop it within 5 steps, so they are off for this test.
                 "ppo.guards.max_truncation_rate=null", "ppo.guards.reward_collapse_patience=null"]:
        args += ["--set", item]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    metrics = home / "checkpoints" / "phase1" / "metrics.jsonl"
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, f"train exited with {proc.returncode} before its first step: " \
                                        f"{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no PPO step within 300 s"
            time.sleep(0.05)
        kill(server)  # the server dies at once, mid-run, as in a crash or a pod eviction
        done_at_stop = len(metrics.read_text().splitlines())
        time.sleep(1)
        server.start()  # same port, same sqlite backend: up again some seconds after the kill
        assert proc.wait(timeout=300) == 0, err.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text()
    assert done_at_stop < steps, "the server went down while training was still running"
    assert "did not answer" in log and "answers again" in log, log[-4000:]

    client = MlflowClient(server.uri, server.uri)
    experiment = client.get_experiment_by_name("concise-rl")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train-phase1'")
    assert run.info.status == "FINISHED"
    # Every step's metrics are in the run, including those of the outage, each once.
    for key in ("reward", "kl", "response_length"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, steps + 1))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # Training finished and its policy was registered on the restarted server.
    (version,) = client.search_model_versions("name = 'concise-rl-demo'")
    assert version.tags["phase"] == "1" and version.tags["ppo_steps"] == str(steps)
    assert client.get_model_version_by_alias("concise-rl-demo", "phase1").version == version.version
    kill(server)  # nothing more to write: no need to wait for a graceful shutdown


def kill(server: MlflowServer) -> None:
    """SIGKILL to the server's whole process group, and wait for it to be gone."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
