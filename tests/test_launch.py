"""tasks/launch.py: the flow's PPO stages as `accelerate launch` child jobs (launch.num_processes > 1).

Real child jobs: two processes on the CPU (gloo) training the tiny model. What the flow's train
task sees: the final folder on success, the child's exit code and last lines on a failure,
TrainingGuardError on a guard stop, and no child left running after SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_guards import PPO, problems_file

from concise_rl.config import load_config
from concise_rl.errors import ConfigError, TrainingGuardError
from concise_rl.problems import Problem
from concise_rl.tasks import launch

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_model_dir: Path, *settings: str):
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", *PPO, "launch.num_processes=2", *settings])


def solvable(tmp_path: Path) -> Path:
    return problems_file(tmp_path, [Problem(id=f"p{i}", prompt=f"What is {i} plus {i}?", answer=str(2 * i),
                                            source="test") for i in range(4)])


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_a_phase_trains_as_a_two_process_child_job_and_streams_its_log(tiny_model_dir, tmp_path, mlflow_home):
    cfg = config(tiny_model_dir, "ppo.guards.max_truncation_rate=null", "ppo.guards.reward_collapse_patience=null")
    handler = Lines()
    logger = logging.getLogger(launch.__name__)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        final = Path(launch.train_phase_launched(cfg, "phase1", str(tiny_model_dir), str(solvable(tmp_path))))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert final == mlflow_home / "checkpoints" / "phase1" / "final" and (final / "config.json").is_file()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 3
    # Both processes trained: the run's metrics were gathered over the 2 x 2 x 2 rollouts of each step.
    logged = handler.lines
    assert any("--num_processes 2 --multi_gpu" in m for m in logged)
    for rank in (0, 1):
        assert any(m.endswith(f"phase1: process {rank} of 2") for m in logged), "two processes trained"
    assert any(m.startswith("[phase1] ") for m in logged), "the child's output is in the task's log"
    # A second launch finds the finished run and trains nothing.
    again = launch.train_phase_launched(cfg, "phase1", str(tiny_model_dir), str(solvable(tmp_path)))
    assert Path(again) == final and json.loads((final / "trainer_state.json").read_text()) == state


def test_a_failed_child_job_fails_the_task_with_its_exit_code_and_last_lines(tiny_model_dir, tmp_path, mlflow_home):
    cfg = config(tiny_model_dir)
    with pytest.raises(launch.LaunchError, match=r"exited with code 1: process [01]: ProblemLoadError: .*"
                                                r"no-such-problems.jsonl: no such file"):
        launch.train_phase_launched(cfg, "phase1", str(tiny_model_dir), str(tmp_path / "no-such-problems.jsonl"))


@pytest.mark.slow
def test_a_guard_stop_in_the_child_job_is_a_training_guard_error(tiny_model_dir, tmp_path, mlflow_home):
    unreachable = problems_file(tmp_path, [Problem(id=f"u{i}", prompt=f"What is {i} plus {i}?",
                                                   answer=r"\text{no model says this}", source="test")
                                           for i in range(4)])
    cfg = config(tiny_model_dir, "ppo.guards.reward_collapse_patience=2", "ppo.guards.max_truncation_rate=null")
    with pytest.raises(TrainingGuardError, match="phase1 was not registered") as caught:
        launch.train_phase_launched(cfg, "phase1", str(tiny_model_dir), str(unreachable))
    assert caught.value.stop["guard"] == "reward collapse" and caught.value.stop["step"] == 2


def test_a_step_the_processes_cannot_share_is_refused_before_launching(tiny_model_dir, tmp_path, mlflow_home):
    cfg = config(tiny_model_dir, "launch.num_processes=3")
    with pytest.raises(ConfigError, match=r"launch.num_processes=3: ppo.prompts_per_step=2 does not divide"):
        launch.train_phase_launched(cfg, "phase1", str(tiny_model_dir), str(solvable(tmp_path)))
    assert not (mlflow_home / "launch").exists()


def children_of(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (the child job's --result path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_the_whole_child_job(tiny_model_dir, tmp_path, mlflow_home):
    """What a cancelled flow run or a Kubernetes eviction does: the parent gets SIGTERM."""
    home = mlflow_home
    script = (
        "import sys\n"
        "from concise_rl.config import load_config\n"
        "from concise_rl.tasks import launch\n"
        f"cfg = load_config(None, {[f'model.name_or_path={tiny_model_dir}', *PPO, 'launch.num_processes=2', 'ppo.steps=100000', 'ppo.checkpoint_every=100000', 'ppo.guards.max_truncation_rate=null', 'ppo.guards.reward_collapse_patience=null']!r})\n"  # noqa: E501
        f"launch.train_phase_launched(cfg, 'phase1', {str(tiny_model_dir)!r}, {str(solvable(tmp_path))!r})\n"
    )
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    marker = str(home / "launch" / "phase1-result.json")
    metrics = home / "checkpoints" / "phase1" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # the child job is training
        assert parent.poll() is None and time.monotonic() < deadline, parent.stdout.read()[-3000:]
        time.sleep(1)
    assert len(children_of(marker)) >= 3, "accelerate launch and its two processes"
    parent.send_signal(signal.SIGTERM)
    parent.wait(60)
    assert parent.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while children_of(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert children_of(marker) == [], "no process of the child job is left"
    # A preemption of the child job (training/preempt.py): its processes stopped together at a step boundary
    # and the main one checkpointed that step, though checkpoint_every would have written none.
    ckpts = home / "checkpoints" / "phase1" / "checkpoints"
    step = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "trainer_state.json").read_text())["step"]
    assert step >= 1 and step == len(metrics.read_text().splitlines())


@pytest.mark.slow
def test_the_flow_with_two_processes_per_phase_registers_the_lineage_of_a_one_process_run(tmp_path, prefect_api):
    """`concise-rl run` on the demo config (shrunk) through the real flow to the gate, with each PPO
    stage an `accelerate launch` job of 2 processes (gloo, CPU), against the same run in one process."""
    from test_pipeline_e2e import alias, run_cli, versions

    passing = ("gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0")
    homes = {n: tmp_path / f"home-{n}" for n in (1, 2)}
    one = run_cli(homes[1], *passing, api=prefect_api)
    two = run_cli(homes[2], *passing, "launch.num_processes=2", api=prefect_api)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "phase1: process 1 of 2" in two.stderr and "phase2: process 1 of 2" in two.stderr
    lineage = {}
    for n, home in homes.items():
        v = versions(home)
        assert sorted(v) == ["1", "2", "3"], "one version per phase"
        lineage[n] = {k: {t: v[k].tags[t] for t in ("phase", "parent_version", "config_hash", "problems_hash")}
                      for k in v}
        assert alias(home, "champion") == "3"
    assert lineage[1] == lineage[2]
