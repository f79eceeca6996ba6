"""Deployments against a real Prefect server and worker, and two pipelines at once.

1. `prefect server start` on a free loopback port (temporary PREFECT_HOME), a process
   work pool and deployments applied by `concise-rl deploy`, a real
   `prefect worker start`, then exactly CI's command, `concise-rl retrain --deployment
   retrain --param git_sha=SHA --wait`: the run completes on the worker, registers new
   versions in the sqlite MLflow registry of a temporary CONCISE_RL_HOME, and records
   the SHA. The retraining deployment is pointed at the shrunk demo config of
   tests/test_pipeline_e2e.py through its parameters.
2. Two `concise-rl run` processes against one registry: the second stops at once with
   exit 4 and a message naming the first; the first finishes with consistent aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from prefect_server import spawn, start_server, stop  # tests/, on the path
from tests.test_pipeline_e2e import MODEL, TINY, alias, versions

ROOT = Path(__file__).resolve().parents[1]
SHA = "5f3c2a9e0d41b7c86e2f9a1d3b5c7e9f0a2b4c6d"
PERMISSIVE = ["gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0"]


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):
        stop(proc)


@pytest.mark.slow
def test_ci_retrain_runs_the_deployment_on_a_worker_and_registers_with_the_sha(tmp_path: Path, processes) -> None:
    api = start_server(processes, tmp_path)  # its state in tmp_path/prefect, its log in tmp_path/server.log
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}

    # The project's deployments, the retraining one pointed at the shrunk demo config.
    project = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    for dep in project["deployments"]:
        dep["parameters"].update(config_path=str(ROOT / "configs" / "demo.yaml"), overrides=[*TINY, *PERMISSIVE])
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(project, sort_keys=False))
    deploy = subprocess.run([sys.executable, "-m", "concise_rl.cli", "deploy", "--config-file", str(prefect_file),
                             "--pool", "test-gpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert "work pool 'test-gpu' (process): created" in deploy.stdout
    assert "concise-rl-pipeline/retrain" in deploy.stdout and "cron 0 3 * * 1 (UTC)" in deploy.stdout

    retrain = httpx.get(f"{api}/deployments/name/concise-rl-pipeline/retrain", timeout=30).json()
    assert [(s["schedule"]["cron"], s["active"]) for s in retrain["schedules"]] == [("0 3 * * 1", True)]
    assert retrain["work_pool_name"] == "test-gpu"
    assert retrain["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert (retrain["global_concurrency_limit"] or {}).get("limit") == 1 or retrain["concurrency_limit"] == 1, retrain
    pool = httpx.get(f"{api}/work_pools/test-gpu", timeout=30).json()
    assert pool["type"] == "process"
    evaluate = httpx.get(f"{api}/deployments/name/concise-rl-evaluate/evaluate", timeout=30).json()
    assert evaluate["schedules"] == []
    # Applying again updates the deployments in place.
    again = subprocess.run([sys.executable, "-m", "concise_rl.cli", "deploy", "--config-file", str(prefect_file),
                            "--pool", "test-gpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "work pool 'test-gpu' (process): exists" in again.stdout, again.stderr[-3000:]

    spawn(processes, [sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-gpu", "--type", "process"],
          env, tmp_path / "worker.log")

    # Exactly CI's command (with a timeout so a stuck run fails the test instead of hanging it).
    ci = subprocess.run([sys.executable, "-m", "concise_rl.cli", "retrain", "--deployment", "retrain",
                         "--param", f"git_sha={SHA}", "--wait", "--timeout", "600", "--poll", "2"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    worker_log = (tmp_path / "worker.log").read_text()
    assert ci.returncode == 0, ci.stdout[-3000:] + ci.stderr[-3000:] + worker_log[-5000:]
    assert "Completed" in ci.stdout.splitlines()[-1]

    v = versions(home)
    assert sorted(v) == ["1", "2", "3"]
    assert [v[k].tags.get("git_sha") for k in ("1", "2", "3")] == [SHA] * 3
    assert alias(home, "champion") == "3"
    summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert summary["git_sha"] == SHA and summary["promoted"] is True
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("concise-rl-demo").experiment_id])
    assert runs and all(r.data.tags.get("git_sha") == SHA for r in runs)
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
    ours = [r for r in flow_runs if r["parameters"].get("git_sha") == SHA]
    assert len(ours) == 1 and ours[0]["state"]["type"] == "COMPLETED"

    # The evaluation-only deployment, on the champion just promoted (its evaluation is cached).
    evaluation = subprocess.run([sys.executable, "-m", "concise_rl.cli", "retrain", "--deployment",
                                 "concise-rl-evaluate/evaluate", "--param", f'models={{champion: "models:/{MODEL}@champion"}}',
                                 "--param", "git_sha=eval-check", "--wait", "--timeout", "300", "--poll", "2"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    assert sorted(versions(home)) == ["1", "2", "3"], "evaluation registers nothing"
    eval_runs = client.search_runs([client.get_experiment_by_name("concise-rl-demo").experiment_id],
                                   "tags.git_sha = 'eval-check'")
    assert [r.data.tags["stage"] for r in eval_runs] == ["evaluate"]

    # A run that fails on the worker makes the CI command fail, with the state printed.
    failing = subprocess.run([sys.executable, "-m", "concise_rl.cli", "retrain", "--deployment", "retrain",
                              "--param", "git_sha=bad-config", "--param", "overrides=[ppo.no_such_key=1]",
                              "--wait", "--timeout", "300", "--poll", "2"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert failing.returncode == 1, failing.stdout[-3000:] + failing.stderr[-3000:]
    assert "Failed" in failing.stdout.splitlines()[-1]
    assert alias(home, "champion") == "3"


@pytest.mark.slow
def test_a_second_pipeline_on_the_same_registry_stops_with_a_clear_message(tmp_path: Path, processes) -> None:
    home = tmp_path / "home"

    def run(name: str, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml")]
        for item in [*TINY, *PERMISSIVE, *extra]:
            args += ["--set", item]
        env = {**os.environ, "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "PREFECT_HOME": str(tmp_path / f"prefect-{name}")}  # each its own ephemeral server
        return spawn(processes, args, env, tmp_path / f"{name}.log")

    def locking_holder() -> dict | None:
        try:
            return json.loads((home / "locks" / f"{MODEL}.lock").read_text() or "null")
        except (OSError, ValueError):  # not there yet, or being written
            return None

    # Long enough to be running when the second starts. The tiny model never answers and is cut off at 32
    # tokens, which the training guards would (rightly) stop within 5 steps: they are off here.
    first = run("first", "phase2.ppo.steps=30", "ppo.guards.max_truncation_rate=null",
                "ppo.guards.reward_collapse_patience=null")
    deadline = time.monotonic() + 300
    while (locking_holder() or {}).get("pid") != first.pid:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first pipeline never took the registry lock"
        time.sleep(0.5)
    second = run("second")
    assert second.wait(300) == 4, (tmp_path / "second.log").read_text()[-3000:]
    message = (tmp_path / "second.log").read_text()
    assert f"another pipeline is already using registered model '{MODEL}'" in message
    assert f"pid {first.pid}" in message
    assert first.poll() is None, "the second pipeline must stop while the first still runs"
    assert first.wait(600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert sorted(versions(home)) == ["1", "2", "3"]
    assert [alias(home, a) for a in ("base", "phase1", "candidate", "champion")] == ["1", "2", "3", "3"]
