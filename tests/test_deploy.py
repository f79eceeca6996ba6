"""The deployment files, `concise-rl deploy`/`retrain` argument handling, and the registry lock.

The real server, worker and retraining run are in tests/test_deploy_e2e.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from concise_rl import locking
from concise_rl.deploy import parse_params
from concise_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_defines_a_scheduled_gpu_retraining_and_an_evaluation_deployment() -> None:
    data = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in data["deployments"]}
    assert set(deps) == {"retrain", "retrain-7b", "evaluate"}
    # The 7B: PPO stages as accelerate launch jobs of 4 processes under ZeRO-3, on a 4-GPU pool.
    multi = deps["retrain-7b"]
    from concise_rl.config import load_config
    from concise_rl.training.distributed import check_divides_across_processes

    cfg = load_config(ROOT / multi["parameters"]["config_path"], multi["parameters"]["overrides"])
    assert cfg.launch.num_processes == 4 and (ROOT / cfg.launch.config_file).is_file()
    for phase in ("phase1", "phase2"):
        check_divides_across_processes(cfg.ppo_for(phase), cfg.launch.num_processes)
    assert multi["work_pool"]["job_variables"]["gpu_count"] == 4
    assert multi["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    retrain = deps["retrain"]
    assert retrain["entrypoint"] == "flows/pipeline.py:pipeline"
    assert [s["cron"] for s in retrain["schedules"]] == ["0 3 * * 1"]
    assert retrain["concurrency_limit"] == 1
    assert retrain["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert "git_sha" in retrain["parameters"]
    assert deps["evaluate"]["entrypoint"] == "flows/evaluate.py:evaluate_models"
    for dep in deps.values():
        assert (ROOT / dep["entrypoint"].split(":")[0]).is_file()
        assert (ROOT / dep["parameters"]["config_path"]).is_file()


def test_k8s_job_template_requests_gpu_count_gpus_one_by_default() -> None:
    template = json.loads((ROOT / "infra" / "k8s-gpu-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    gpus = template["variables"]["properties"]["gpu_count"]
    assert (gpus["type"], gpus["default"], gpus["minimum"]) == ("integer", 1, 1)
    # N processes share memory through /dev/shm, which is 64Mi in a container by default.
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}} in pod["volumes"]
    # Every {{ placeholder }} of the job has a variable to fill it.
    text = json.dumps(template["job_configuration"])
    import re

    used = set(re.findall(r"\{\{ (\w+) \}\}", text))
    assert used <= set(template["variables"]["properties"])


def test_ci_workflow_runs_the_retrain_command_on_config_changes() -> None:
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    on = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as true
    assert on["push"]["paths"] == ["configs/**"] and "workflow_dispatch" in on
    steps = " ".join(s.get("run", "") for s in wf["jobs"]["retrain"]["steps"])
    assert "concise-rl retrain --deployment" in steps and "--param git_sha=$GITHUB_SHA --wait" in steps


def test_pipeline_flows_take_git_sha() -> None:
    from concise_rl.flows.evaluate import evaluate_models
    from concise_rl.flows.pipeline import pipeline

    assert "git_sha" in pipeline.parameters.properties
    assert {"models", "config_path", "git_sha"} <= set(evaluate_models.parameters.properties)


def test_parse_params_keeps_string_parameters_as_text() -> None:
    schema = {"properties": {"git_sha": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                             "overrides": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}}}
    assert parse_params(["git_sha=1234567", "overrides=[ppo.steps=2, seed=1]"], schema) == {
        "git_sha": "1234567", "overrides": ["ppo.steps=2", "seed=1"]}
    with pytest.raises(ConfigError, match="no such parameter"):
        parse_params(["gitsha=1"], schema)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_params(["git_sha"], schema)


def test_deploy_and_retrain_refuse_without_a_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"CONCISE_RL_HOME": str(tmp_path)}
    for args in (["deploy"], ["retrain", "--deployment", "retrain", "--wait"]):
        done = subprocess.run([sys.executable, "-m", "concise_rl.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "PREFECT_API_URL is not set" in done.stderr


HOLD = """
import sys, time
from concise_rl import locking
with locking.registry_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_registry_lock_refuses_a_second_process_and_frees_on_exit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONCISE_RL_HOME", str(tmp_path))
    env = {**os.environ, "CONCISE_RL_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "m"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locking.RegistryBusyError) as err:
            with locking.registry_lock("m", "second"):
                pass
        assert f"pid {holder.pid}" in str(err.value) and "test holder" in str(err.value)
        with locking.registry_lock("other-model", "another model is free"):
            pass
    finally:
        holder.kill()  # killed, not released: the kernel drops the lock with the process
        holder.wait()
    deadline = time.monotonic() + 10
    with locking.registry_lock("m", "after the holder died") as path:
        with locking.registry_lock("m", "re-entrant in one process"):
            assert json.loads(path.read_text())["what"] == "after the holder died"
        assert time.monotonic() < deadline
