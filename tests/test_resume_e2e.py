"""Crash and resume of the whole pipeline: SIGKILL in the middle of phase 1, then the same command again.

The killed run leaves phase 1's last checkpoint (policy, critic, optimizers,
schedulers, RNG, step; the data position follows from the step and seed) and an
MLflow run that never ended. The second run must pick up from that checkpoint in
the same MLflow run, finish, register exactly one version per phase, and end where
an uninterrupted run of the same command (same seed, same base) ends.

The tolerance is zero: apart from its timings, every per-step figure of both
phases and every final weight must be bit-for-bit those of the uninterrupted run.
On this CPU two runs of the same command in two processes are bitwise identical
(measured: both phases, every figure and weight), so anything less would let a
resume bug hide inside round-off. (Before the base's SFT stopped leaving accelerate
in bf16, a run that built its base trained PPO under bf16 autocast and one that
found it trained in float32, and the two differed from step 1.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.test_pipeline_e2e import MODEL, ROOT, TINY, versions

STEPS = 4
# Timings differ from run to run; everything else a step logs must not.
TIMING = ("step_time_s", "generation_time_s", "tokens_per_s")
EXTRA = [f"ppo.steps={STEPS}", "phase2.ppo.steps=2", "gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0"]


def command(home: Path, api: str) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml")]
    for item in [*TINY, *EXTRA]:
        args += ["--set", item]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "2",
           "PREFECT_API_URL": api}
    return args, env


def run(home: Path, api: str) -> subprocess.CompletedProcess:
    args, env = command(home, api)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def kill_in_phase1(home: Path, api: str) -> int:
    """Start the pipeline, SIGKILL its whole process group once phase 1 has a checkpoint; the checkpoint's step."""
    args, env = command(home, api)
    log = open(home.parent / "killed.log", "w")  # noqa: SIM115 (closed below, after the process is gone)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pointer = home / "checkpoints" / "phase1" / "checkpoints" / "latest"
    deadline = time.monotonic() + 540
    try:
        while not pointer.is_file():
            if proc.poll() is not None:
                pytest.fail(f"the pipeline exited ({proc.returncode}) before phase 1 wrote a checkpoint: "
                            f"{(home.parent / 'killed.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("phase 1 wrote no checkpoint within 9 minutes")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    step = json.loads((pointer.parent / pointer.read_text().strip() / "trainer_state.json").read_text())["step"]
    return step


def train_runs(home: Path, phase: str) -> list:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("concise-rl-demo")
    return client.search_runs([experiment.experiment_id], f"tags.stage = 'train-{phase}'")


def metric_rows(home: Path, phase: str) -> list[dict]:
    lines = (home / "checkpoints" / phase / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def wait_for_a_step(proc: subprocess.Popen, metrics: Path) -> None:
    """Until the phase whose ``metrics`` log this is has completed a step (the run still going)."""
    deadline = time.monotonic() + 540
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, f"exited ({proc.returncode}) before phase 1's first step"
        assert time.monotonic() < deadline, "phase 1 took no step within 9 minutes"
        time.sleep(0.01)


def same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prefect_api: str) -> Path:
    """The home of one uninterrupted run of the command, which every interrupted run must end like."""
    home = tmp_path_factory.mktemp("straight") / "home"
    first = run(home, prefect_api)
    assert first.returncode == 0, first.stderr[-4000:]
    return home


def home_with_the_same_base(straight: Path, tmp_path: Path, name: str) -> Path:
    # The same base for both homes (the build is seeded, but copying it makes the comparison about PPO alone).
    home = tmp_path / name / "home"
    (base,) = (straight / "models").glob("embedded-*")
    shutil.copytree(base, home / "models" / base.name)
    return home


def assert_ends_like(straight: Path, home: Path) -> None:
    """The same final step, and bit for bit the same metrics (timings aside) and weights as the run never
    interrupted."""
    for phase in ("phase1", "phase2"):
        a, b = metric_rows(straight, phase), metric_rows(home, phase)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
        for ra, rb in zip(a, b, strict=True):
            assert ra.keys() == rb.keys()
            diff = {k: (ra[k], rb[k]) for k in ra if not same_number(float(ra[k]), float(rb[k]))}
            assert not diff, f"{phase} step {ra['step']} differs from the uninterrupted run: {diff}"
        wa = load_file(str(straight / "checkpoints" / phase / "final" / "model.safetensors"))
        wb = load_file(str(home / "checkpoints" / phase / "final" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        changed = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not changed, f"{phase}: weights differ from the uninterrupted run in {changed}"
    sa = json.loads((straight / "reports" / "latest" / "summary.json").read_text())
    sb = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert sa["models"]["phase2"]["eval"] == sb["models"]["phase2"]["eval"]
    assert sb["promoted"] is True and sb["champion_version"] == "3"
    assert MODEL == sb["registered_model"]


@pytest.mark.slow
def test_sigkill_in_phase1_then_same_command_resumes_and_matches_an_uninterrupted_run(
        straight: Path, tmp_path: Path, prefect_api: str) -> None:
    crashed = home_with_the_same_base(straight, tmp_path, "crashed")

    killed_at = kill_in_phase1(crashed, prefect_api)
    assert 1 <= killed_at < STEPS, f"killed at step {killed_at}: not in the middle of phase 1"
    assert not (crashed / "checkpoints" / "phase1" / "final").exists()
    assert sorted(versions(crashed)) == ["1"], "only the base is registered before phase 1 ends"
    (interrupted,) = train_runs(crashed, "phase1")
    assert interrupted.info.status == "RUNNING"  # SIGKILL left it open; the resume must close it

    second = run(crashed, prefect_api)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed PPO from" in second.stderr
    assert f"step-{killed_at:06d}" in second.stderr

    # Exactly one version per phase, with the lineage of an ordinary run.
    v = versions(crashed)
    assert sorted(v) == ["1", "2", "3"]
    assert [v[k].tags["phase"] for k in ("1", "2", "3")] == ["base", "1", "2"]
    assert v["2"].tags["ppo_steps"] == str(STEPS)

    # One MLflow run for phase 1, reopened and finished, holding every step's metrics.
    (resumed,) = train_runs(crashed, "phase1")
    assert resumed.info.run_id == interrupted.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    client = MlflowClient(f"sqlite:///{crashed / 'mlflow.db'}", f"sqlite:///{crashed / 'mlflow.db'}")
    assert {m.step for m in client.get_metric_history(resumed.info.run_id, "reward")} == set(range(1, STEPS + 1))

    assert_ends_like(straight, crashed)


@pytest.mark.slow
def test_sigterm_in_phase1_checkpoints_its_last_step_at_once_and_the_same_command_resumes(
        straight: Path, tmp_path: Path, prefect_api: str) -> None:
    """A preemption (issue 23, point 1): SIGTERM to the pipeline's process, as Kubernetes or a cancelled run
    sends it, with checkpoint_every far above the phase's steps, so only the preemption writes one."""
    home = home_with_the_same_base(straight, tmp_path, "preempted")
    args, env = command(home, prefect_api)
    args += ["--set", "ppo.checkpoint_every=100"]
    metrics = home / "checkpoints" / "phase1" / "metrics.jsonl"
    with open(tmp_path / "preempted.log", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            wait_for_a_step(proc, metrics)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "preempted.log").read_text()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM
    last = err.strip().splitlines()[-1]
    assert last.startswith("concise-rl run: preempted by SIGTERM at step ") and f"of {STEPS}" in last, last
    assert "run the same command to resume" in last and "over ppo.preempt_grace_s" not in last, last
    pointer = home / "checkpoints" / "phase1" / "checkpoints" / "latest"
    step = json.loads((pointer.parent / pointer.read_text().strip() / "trainer_state.json").read_text())["step"]
    assert 1 <= step < STEPS and f"at step {step} of" in last
    assert len(metrics.read_text().splitlines()) == step, "no step after the checkpointed one was kept"
    (stopped,) = train_runs(home, "phase1")
    assert stopped.info.status == "KILLED"  # not FAILED: nothing went wrong, and it is resumed below
    assert sorted(versions(home)) == ["1"]

    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"step-{step:06d}" in second.stderr
    (resumed,) = train_runs(home, "phase1")
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    assert_ends_like(straight, home)


LONG = 300  # phase-1 steps of the cancelled deployment run: about 15 s of tiny PPO


def flow_run_state(api: str, flow_run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()["state"]


def wait_final(api: str, flow_run_id: str, worker_log: Path, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (state := flow_run_state(api, flow_run_id))["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"flow run still {state['type']}:\n{worker_log.read_text()[-4000:]}"
        time.sleep(1)
    return state


@pytest.mark.slow
def test_a_cancelled_deployment_run_checkpoints_its_last_step_and_the_next_run_resumes(
        straight: Path, tmp_path: Path, prefect_api: str) -> None:
    """Issue 23, point 1, through Prefect: a flow run of the retraining deployment on a real process worker,
    cancelled while phase 1 trains. The worker sends the flow run's process SIGTERM (then SIGKILL after its
    grace period); the run must checkpoint its last completed step at once, end its MLflow run KILLED and
    leave the flow run Cancelled, and the deployment's next run must resume there and finish the phase in
    the same MLflow run. Phase 1 is long here (the worker takes a second or two to act on a cancellation,
    longer than 4 tiny steps); that a resume ends bit for bit as an uninterrupted run is the SIGTERM
    test's job above."""
    from prefect_server import spawn, stop

    home = home_with_the_same_base(straight, tmp_path, "cancelled")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": prefect_api,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT)}
    project = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    project["deployments"] = [d for d in project["deployments"] if d["name"] == "retrain"]
    (dep,) = project["deployments"]
    dep["schedules"] = []  # only the runs this test starts
    # The tiny model never answers and is cut off at 32 tokens, which the training guards would (rightly)
    # stop within 5 steps: they are off here.
    dep["parameters"].update(config_path=str(ROOT / "configs" / "demo.yaml"),
                             overrides=[*TINY, *EXTRA, f"phase1.ppo.steps={LONG}", "ppo.checkpoint_every=10000",
                                        "ppo.guards.max_truncation_rate=null",
                                        "ppo.guards.reward_collapse_patience=null"])
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    deploy = subprocess.run([sys.executable, "-m", "concise_rl.cli", "deploy", "--config-file",
                             str(tmp_path / "prefect.yaml"), "--pool", "cancel-test"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployment = httpx.get(f"{prefect_api}/deployments/name/concise-rl-pipeline/retrain", timeout=30).json()

    processes: list[subprocess.Popen] = []
    worker_log = tmp_path / "worker.log"
    try:
        spawn(processes, [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cancel-test",
                          "--type", "process"], env, worker_log)
        first = httpx.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={},
                           timeout=30).json()["id"]
        metrics = home / "checkpoints" / "phase1" / "metrics.jsonl"
        deadline = time.monotonic() + 540
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert flow_run_state(prefect_api, first)["type"] in ("SCHEDULED", "PENDING", "RUNNING"), \
                worker_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "phase 1 took no step within 9 minutes"
            time.sleep(0.05)
        cancel = httpx.post(f"{prefect_api}/flow_runs/{first}/set_state",
                            json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}, timeout=30)
        assert cancel.status_code in (200, 201), cancel.text
        state = wait_final(prefect_api, first, worker_log, timeout=180)
        log = worker_log.read_text()
        assert state["type"] == "CANCELLED", f"{state}\n{log[-4000:]}"
        assert "preempted by SIGTERM at step " in log, log[-4000:]

        pointer = home / "checkpoints" / "phase1" / "checkpoints" / "latest"
        step = json.loads((pointer.parent / pointer.read_text().strip() / "trainer_state.json").read_text())["step"]
        assert 1 <= step < LONG and len(metrics.read_text().splitlines()) == step
        (stopped,) = train_runs(home, "phase1")
        assert stopped.info.status == "KILLED"
        assert sorted(versions(home)) == ["1"]

        # The deployment's next run (a retry, or the next schedule) resumes from that step.
        second = httpx.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={},
                            timeout=30).json()["id"]
        state = wait_final(prefect_api, second, worker_log)
        log = worker_log.read_text()
        assert state["type"] == "COMPLETED", f"{state}\n{log[-4000:]}"
        assert f"step-{step:06d}" in log
    finally:
        for proc in reversed(processes):
            stop(proc)
    (resumed,) = train_runs(home, "phase1")
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, LONG + 1))
    assert sorted(versions(home)) == ["1", "2", "3"]


def _server_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if "temporary Prefect server on http://127.0.0.1:" in line:
            return int(line.rsplit("(pid ", 1)[1].rstrip(")"))
    raise AssertionError(f"no temporary Prefect server in the log:\n{log.read_text()[-3000:]}")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_ctrl_c_to_the_whole_group_stops_in_seconds_and_a_killed_command_leaves_no_prefect_server(
        straight: Path, tmp_path: Path, prefect_api: str) -> None:
    """Without $PREFECT_API_URL, `concise-rl run` starts a temporary Prefect server. Prefect's own would be
    in the command's process group, so a Ctrl-C (SIGINT to the group) stopped it with the run, and the
    run then waited on it for minutes before exiting. concise_rl/local_server.py keeps the server in its
    own session, tied to the command's life."""
    home = home_with_the_same_base(straight, tmp_path, "ctrl-c")
    args, env = command(home, prefect_api)
    env.pop("PREFECT_API_URL")
    metrics = home / "checkpoints" / "phase1" / "metrics.jsonl"
    log = tmp_path / "ctrl-c.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_a_step(proc, metrics)
        server = _server_pid(log)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = log.read_text().strip().splitlines()[-1]
    assert proc.returncode == 130, log.read_text()[-3000:]  # 128 + SIGINT
    assert last.startswith(("concise-rl run: preempted by SIGINT at step ", "concise-rl run: interrupted")), last
    assert took < 20, f"the run took {took:.0f} s to stop after Ctrl-C"
    assert _gone(server, 10), "the temporary Prefect server outlived the command"

    # SIGKILL to the command alone (not its group): the server goes with it.
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "temporary Prefect server on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        server = _server_pid(log)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _gone(server, 10), "a SIGKILLed command left its temporary Prefect server running"
