"""Security (issue 7, point 6): model output is never run, secrets stay out of the records,
paths stay inside their roots, and remote code runs only when the config allows it."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from test_store import BUCKET, make_checkpoint, s3_server  # noqa: F401 - s3_server: fixture

from concise_rl.benchmarks import load_benchmark
from concise_rl.cli import EXIT_BAD_INPUT, main
from concise_rl.config import ModelConfig, PipelineConfig, load_config
from concise_rl.errors import ConfigError, ModelLoadError, ProblemLoadError
from concise_rl.grader import Grader
from concise_rl.store import MANIFEST, ArtifactStore, StoreError, build_manifest
from concise_rl.training.models import load_policy, load_tokenizer
from concise_rl.training.reward import score_responses

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


# ----------------------------------------------------------------------------- model output is never run
def hostile_answers(markers: Path) -> list[str]:
    """Answers that would create ``markers/pwned-N`` if anything evaluated them as Python."""
    codes = [
        "__import__('os').system('touch {m}')",
        "eval(\"__import__('os').system('touch {m}')\")",
        "exec(\"open('{m}', 'w').close()\")",
        "S(\"__import__('os').system('touch {m}')\")",
        "sympify(\"__import__('os').system('touch {m}')\")",
        "(lambda: __import__('os').system('touch {m}'))()",
        "().__class__.__base__.__subclasses__()[0].__init__.__globals__['__builtins__']['__import__']('os')"
        ".system('touch {m}')",
        "\\text{__import__('os').system('touch {m}')}",
    ]
    markers.mkdir(exist_ok=True)
    return [code.replace("{m}", str(markers / f"pwned-{i}")) for i, code in enumerate(codes)]


def test_hostile_answers_are_graded_and_rewarded_without_running(tmp_path, capsys):
    markers = tmp_path / "markers"
    codes = hostile_answers(markers)
    responses = [f"So the result is \\boxed{{{code}}}." for code in codes]
    n = len(codes)
    with Grader(workers=1, timeout_s=5) as grader:
        as_responses = grader.grade_many(responses, ["5"] * n)
        # Reference answers are data, and untrusted too: they go through the same parser.
        as_references = grader.grade_many(["\\boxed{5}"] * n, codes)
        grades, rewards = score_responses(responses, ["5"] * n, PipelineConfig().reward, grader)
    assert [g.correct for g in as_responses + as_references + grades] == [False] * (3 * n)
    assert [g.extracted for g in as_responses] == codes
    assert rewards == [-0.5] * n  # boxed, wrong: the paper's reward, nothing more

    rows = [{"response": r, "answer": "5"} for r in responses] + [{"response": "\\boxed{5}", "answer": c} for c in codes]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["grade", str(src), "-o", str(tmp_path / "graded.jsonl"), "--workers", "1"]) == 0
    assert "0 correct" in capsys.readouterr().out
    assert sorted(markers.iterdir()) == []


def test_hostile_problems_are_evaluated_without_running(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`concise-rl evaluate` on a set whose questions and answers are payloads: graded, reported, never run."""
    markers = tmp_path / "markers"
    codes = hostile_answers(markers)
    heldout = tmp_path / "hostile.jsonl"
    heldout.write_text("".join(json.dumps({"id": f"h{i}", "problem": f"Compute {c}.", "answer": c}) + "\n"
                               for i, c in enumerate(codes)))
    home = tmp_path / "home"
    monkeypatch.setenv("CONCISE_RL_HOME", str(home))
    argv = ["evaluate", "--config", DEMO, "--model", f"tiny={tiny_model_dir}",
            "--set", f"evaluation.heldout={{kind: file, path: {heldout}}}", "--set", "evaluation.benchmarks={}",
            "--set", "evaluation.temperatures=[0]",
            "--set", "evaluation.max_new_tokens=4", "--set", "prompt.max_prompt_tokens=2048",
            "--set", "evaluation.bootstrap_samples=10", "--set", "grader.workers=1"]
    assert main(argv) == 0, capsys.readouterr().err
    responses = [json.loads(line) for line in next(home.glob("evaluations/local-*/responses.jsonl")).open()]
    assert [r["answer"] for r in responses] == codes and not any(r["correct"] for r in responses)
    assert sorted(markers.iterdir()) == []


# ----------------------------------------------------------------------------- secrets
def _found_in(secret: str, roots: list[Path], texts: list[str]) -> list[str]:
    where = [f"captured text {i}" for i, text in enumerate(texts) if secret in text]
    for root in roots:
        where += [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    return where


def test_no_secret_reaches_params_tags_artifacts_or_logs(s3_server, mlflow_home, tiny_model_dir, tmp_path,
                                                          monkeypatch, caplog, capsys):
    """A real stage run against S3 (rclone) with credentials planted where they would be picked up,
    then every byte it left (the MLflow database, artifact folders, the bucket) and every log line is scanned."""
    token = "mlflow-token-0f9e8d7c6b5a"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    store = [f"store.uri=s3://{BUCKET}/sec", f"store.endpoint_url={s3_server.endpoint}", "store.region=us-east-1",
             "store.max_attempts=2", "store.retry_base_s=0.05"]
    small = ["curation.candidates.num_problems=2", "curation.samples_per_problem=1", "curation.max_new_tokens=4",
             "curation.phase1_band.high=1.0", "curation.phase2_band={low: 0.0, high: 1.0}",
             "prompt.max_prompt_tokens=512", "grader.workers=1"]
    argv = ["curate", "--config", DEMO, "-v", "--set", f"model.name_or_path={tiny_model_dir}"]
    for item in store + small:
        argv += ["--set", item]
    # A secret that does reach the AWS client: the server's real secret key, from the environment.
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr()

    roots = [mlflow_home, s3_server.backend]
    texts = [caplog.text, out.out, out.err]
    db = mlflow_home / "mlflow.db"
    with sqlite3.connect(db) as con:
        texts += [json.dumps(con.execute(f"SELECT * FROM {t}").fetchall())
                  for t in ("params", "tags", "model_versions", "model_version_tags")]
    # The scan sees what the run wrote: the checkpoint's S3 key (a tag), params, uploaded files, S3 traffic.
    assert _found_in(f"s3://{BUCKET}/sec/checkpoints/", roots, texts)
    assert _found_in("curation.max_new_tokens", roots, texts)
    assert list(s3_server.backend.rglob(MANIFEST))
    assert "botocore" in caplog.text
    for secret in (s3_server.secret_key, token):
        assert _found_in(secret, roots, texts) == [], f"secret {secret[:6]}... leaked"


def test_credentials_in_urls_are_left_out_of_the_logged_params(mlflow_home):
    from mlflow import MlflowClient

    from concise_rl.tasks import tracking

    cfg = PipelineConfig(store={"uri": "s3://bucket/prefix", "endpoint_url": "http://minio:pw-7a7a7a@127.0.0.1:9000"})
    with tracking.stage_run(cfg, "probe") as run:
        pass
    uri = f"sqlite:///{mlflow_home / 'mlflow.db'}"
    params = MlflowClient(uri, uri).get_run(run.info.run_id).data.params
    assert params["store.endpoint_url"] == "http://127.0.0.1:9000"
    assert not [k for k, v in params.items() if "pw-7a7a7a" in v]
    loggable = PipelineConfig(registry={"tracking_uri": "https://me:tok-1b1b@mlflow.example:5000"}).loggable()
    assert loggable["registry"]["tracking_uri"] == "https://mlflow.example:5000"
    # Credentials have no field of their own: the store's come from boto3's chain, never from the config.
    with pytest.raises(ConfigError, match=r"unknown key 'store\.aws_secret_access_key'"):
        load_config(overrides=["store.aws_secret_access_key=abc"])


# ----------------------------------------------------------------------------- paths stay inside their roots
@pytest.mark.parametrize("name", ["demo/../../evil", "../evil", "a/b", "..", ".hidden", "a\\..\\b"])
def test_a_model_name_that_is_a_path_is_refused(name, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"'registry\.model_name'"):
        load_config(overrides=[f"registry.model_name={name}"])
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path / "home"))
    assert main(["models", "--set", f"registry.model_name={name}"]) == EXIT_BAD_INPUT
    assert "registry.model_name" in capsys.readouterr().err


@pytest.mark.parametrize("label", ["../../x", "a/b", ".."])
def test_an_evaluation_label_that_is_a_path_is_refused(label, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path / "home"))
    assert main(["evaluate", "--model", f"{label}={tiny_model_dir}"]) == EXIT_BAD_INPUT
    assert f"label {label!r} would be a path" in capsys.readouterr().err


def test_store_keys_and_manifests_cannot_leave_their_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path / "home"))
    store = ArtifactStore()
    src = make_checkpoint(tmp_path / "ckpt", big_mb=0.01)
    for parts in (("checkpoints", "..", "..", "evil"), ("evaluations", "x/../../y")):
        with pytest.raises(StoreError, match="would lead out of"):
            store.uri(*parts)
    with pytest.raises(StoreError, match="would lead out of"):
        store.upload_checkpoint(src, model_name="m", phase="../../evil")

    # A stored folder whose manifest lists ../../evil (a tar-slip): the download refuses it and writes nothing.
    folder = tmp_path / "home" / "store" / "checkpoints" / "m" / "base-x"
    folder.mkdir(parents=True)
    manifest = build_manifest(src)
    manifest["files"]["../../evil"] = manifest["files"]["config.json"]
    shutil.copy(src / "config.json", folder.parent.parent / "evil")
    for rel in build_manifest(src)["files"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, folder / rel)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    dest = tmp_path / "out" / "a" / "b"
    with pytest.raises(StoreError, match=r"unsafe file name '\.\./\.\./evil'"):
        store.download_dir(folder.as_uri(), dest)
    assert not dest.exists() and not (tmp_path / "out" / "evil").exists()
    assert not list(tmp_path.glob("out/a/.b.partial-*"))


def test_benchmark_names_cannot_name_files_outside_the_data_dir(tmp_path):
    (tmp_path / "outside.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ProblemLoadError, match="unknown benchmark '../outside'"):
        load_benchmark("../outside", data_dir=data)


# ----------------------------------------------------------------------------- remote code
CUSTOM_CONFIG = '''\
from pathlib import Path

from transformers import Qwen2Config

Path({marker!r}).write_text("custom code ran")


class CustomConfig(Qwen2Config):
    model_type = "concise_rl_custom"
'''

CUSTOM_MODEL = '''\
from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration_custom import CustomConfig


class CustomModel(Qwen2Model):
    config_class = CustomConfig


class CustomForCausalLM(Qwen2ForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(tiny: Path, out: Path, marker: Path) -> Path:
    """The tiny model, but its config.json points (auto_map) at Python files in the folder that write ``marker``."""
    shutil.copytree(tiny, out)
    (out / "configuration_custom.py").write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    (out / "modeling_custom.py").write_text(CUSTOM_MODEL)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "concise_rl_custom"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModel": "modeling_custom.CustomModel",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_trust_remote_code_is_off_by_default_in_every_shipped_config():
    assert ModelConfig().trust_remote_code is False
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(path).model.trust_remote_code is False, path.name


def test_custom_code_in_a_model_folder_runs_only_when_the_config_allows_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from transformers import dynamic_module_utils

    # transformers copies trusted code into its modules cache before importing it: keep that under tmp_path.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    marker = tmp_path / "custom-code-ran"
    model_dir = custom_code_model(tiny_model_dir, tmp_path / "custom", marker)

    with pytest.raises(ModelLoadError, match="ships its own Python code.*model.trust_remote_code=true"):
        load_policy(str(model_dir), ModelConfig())
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path / "home"))
    argv = ["evaluate", "--config", DEMO, "--model", str(model_dir), "--set", "evaluation.heldout.num_problems=2",
            "--set", "prompt.max_prompt_tokens=512"]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "custom ships its own Python code" in err and "model.trust_remote_code=true" in err
    assert not marker.exists()

    # Turned on, the same folder loads through its own code: the flag is passed through.
    model = load_policy(str(model_dir), ModelConfig(trust_remote_code=True))
    assert type(model).__name__ == "CustomForCausalLM" and marker.read_text() == "custom code ran"
    assert load_tokenizer(str(model_dir), trust_remote_code=True).chat_template
