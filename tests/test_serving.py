"""A registered version is an MLflow Model: `mlflow models serve` answers chat requests with it,
and mlflow.transformers / mlflow.pyfunc load it (tasks/mlflow_model.py).

The model is the demo's base (shipped in training/prebuilt/, registered through the real base
stage), which answers the embedded task with a \\boxed{} answer; the server is a real
`mlflow models serve` process on loopback, reading the registry the pipeline wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pytest
from prefect_server import free_port, spawn, stop, wait_http

from concise_rl.answers import extract_boxed
from concise_rl.grader import Grader
from concise_rl.tasks import mlflow_model
from concise_rl.training.models import prompt_messages


def test_mlflow_serves_the_champion_and_answers_a_chat_request(champion, tmp_path: Path) -> None:
    cfg, uri, problem = champion
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = mlflow.get_tracking_uri()  # the home's sqlite registry, which the pipeline wrote
    # mlflow models serve execs `uvicorn` by name: the venv's bin/ must be on PATH, as it is for a user
    # who activated the venv (CI calls .venv/bin/python without activating it).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store,
           "OMP_NUM_THREADS": "1"}
    processes: list[subprocess.Popen] = []
    log = tmp_path / "serve.log"
    server = spawn(processes, [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env, log)
    try:
        wait_http(f"{url}/ping", server, log, "mlflow models serve", timeout=240)
        request = {"messages": prompt_messages(problem.prompt, cfg.prompt), "max_tokens": 300}
        response = httpx.post(f"{url}/invocations", json=request, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        answer = body[0]["choices"][0]["message"]["content"]
        boxed = extract_boxed(answer)
        assert boxed is not None, answer
        grader = Grader(workers=0)
        assert grader.grade(answer, problem.answer).correct, f"{answer!r} against {problem.answer}"
    finally:
        for proc in processes:
            stop(proc)
    assert server.poll() is not None, "the server is stopped"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/ping", timeout=2)


def test_mlflow_transformers_and_pyfunc_load_a_registered_version(champion) -> None:
    cfg, uri, problem = champion
    pipe = mlflow.transformers.load_model(uri)
    assert type(pipe.model).__name__ == "Qwen2ForCausalLM" and pipe.tokenizer.chat_template
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert pyfunc.metadata.flavors["transformers"]["inference_task"] == mlflow_model.CHAT_TASK
    assert pyfunc.metadata.get_input_schema() is not None, "a signature"
    out = pyfunc.predict({"messages": prompt_messages(problem.prompt, cfg.prompt), "max_tokens": 300})
    answer = out[0]["choices"][0]["message"]["content"]
    assert extract_boxed(answer) == problem.answer, answer
