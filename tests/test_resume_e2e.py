"""Crash and resume of the whole pipeline: SIGKILL in the middle of phase 1, then the same command again.

The killed run leaves phase 1's last checkpoint (policy, critic, optimizers,
schedulers, RNG, step; the data position follows from the step and seed) and an
MLflow run that never ended. The second run must pick up from that checkpoint in
the same MLflow run, finish, register exactly one version per phase, and end where
an uninterrupted run of the same command (same seed, same base) ends.

The tolerance: two processes on this CPU do not compute bit-identical matmuls
(oneDNN/MKL kernels depend on memory alignment), so two *uninterrupted* runs of
this command already differ, from step 1 on. Measured on two such runs (both
phases, every step): value loss up to 2.6e-4 relative, actor gradient norm 4e-4,
critic gradient norm 1.3e-3; the KL (per-sequence sum of the sampling pass's
log-probs minus the reference forward's: two different kernels) is round-off-sized
on this tiny model and moved by up to 2.6e-3 absolute. What must match exactly is
what was sampled and graded: accuracy, reward, lengths, truncation and box rates,
token counts, at every step. The float figures must agree to rel 1e-2 (abs 1e-3;
the KL to abs 1e-2), about ten times the spread of two uninterrupted runs; the
final weights to within 2 x lr per Adam update (see ``weight_bound``).
``explained_variance`` is left out: at step 1 the returns hardly vary and it swings
between -6e7 and -2e12 from round-off alone.
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

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from concise_rl.config import load_config
from tests.test_pipeline_e2e import MODEL, ROOT, TINY, versions

STEPS = 4
# Everything but timings (and the ill-conditioned explained variance, see above).
SKIP = ("step_time_s", "generation_time_s", "tokens_per_s", "explained_variance")
# What was sampled and graded: identical, or the runs took different paths.
EXACT = ("accuracy", "reward", "boxed_rate", "response_length", "response_length_correct",
         "response_length_incorrect", "truncation_rate", "generated_tokens")
EXTRA = [f"ppo.steps={STEPS}", "phase2.ppo.steps=2", "gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0"]


def command(home: Path) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml")]
    for item in [*TINY, *EXTRA]:
        args += ["--set", item]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "2"}
    return args, env


def run(home: Path) -> subprocess.CompletedProcess:
    args, env = command(home)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def kill_in_phase1(home: Path) -> int:
    """Start the pipeline, SIGKILL its whole process group once phase 1 has a checkpoint; the checkpoint's step."""
    args, env = command(home)
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
    return [{k: v for k, v in json.loads(line).items() if k not in SKIP} for line in lines]


def weight_bound(phase: str) -> float:
    """How far round-off alone can move a weight by the end of ``phase``: 2 x lr per Adam update.

    Adam divides each gradient by its own running scale, so a coordinate whose gradient
    is round-off-sized still moves by up to ~lr per update, in a direction round-off
    decides: two runs that differ only in round-off can differ by ~lr per update there.
    """
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, *EXTRA])
    total = 0.0
    for p in ("phase1", "phase2")[: ("phase1", "phase2").index(phase) + 1]:
        ppo = cfg.ppo_for(p)
        updates = ppo.steps * ppo.ppo_epochs * ppo.prompts_per_step * ppo.samples_per_prompt // ppo.mini_batch_size
        total += 2 * ppo.actor_lr * updates
    return total


def same_number(key: str, a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if key in EXACT:
        return a == b
    return math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-2 if key == "kl" else 1e-3)


@pytest.mark.slow
def test_sigkill_in_phase1_then_same_command_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight" / "home", tmp_path / "crashed" / "home"
    straight.parent.mkdir()
    crashed.parent.mkdir()

    first = run(straight)
    assert first.returncode == 0, first.stderr[-4000:]

    # The same base for both homes (the build is seeded, but copying it makes the comparison about PPO alone).
    (base,) = (straight / "models").glob("embedded-*")
    shutil.copytree(base, crashed / "models" / base.name)

    killed_at = kill_in_phase1(crashed)
    assert 1 <= killed_at < STEPS, f"killed at step {killed_at}: not in the middle of phase 1"
    assert not (crashed / "checkpoints" / "phase1" / "final").exists()
    assert sorted(versions(crashed)) == ["1"], "only the base is registered before phase 1 ends"
    (interrupted,) = train_runs(crashed, "phase1")
    assert interrupted.info.status == "RUNNING"  # SIGKILL left it open; the resume must close it

    second = run(crashed)
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

    # Same final step, same metrics and the same weights as the run that was never interrupted.
    for phase in ("phase1", "phase2"):
        a, b = metric_rows(straight, phase), metric_rows(crashed, phase)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
        for ra, rb in zip(a, b, strict=True):
            assert ra.keys() == rb.keys()
            diff = {k: (ra[k], rb[k]) for k in ra if not same_number(k, float(ra[k]), float(rb[k]))}
            assert not diff, f"{phase} step {ra['step']} differs from the uninterrupted run: {diff}"
        wa = load_file(str(straight / "checkpoints" / phase / "final" / "model.safetensors"))
        wb = load_file(str(crashed / "checkpoints" / phase / "final" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        drift = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert drift <= weight_bound(phase), f"{phase}: weights differ by up to {drift:.3g}"
    sa = json.loads((straight / "reports" / "latest" / "summary.json").read_text())
    sb = json.loads((crashed / "reports" / "latest" / "summary.json").read_text())
    assert sa["models"]["phase2"]["eval"] == sb["models"]["phase2"]["eval"]
    assert sb["promoted"] is True and sb["champion_version"] == "3"
    assert MODEL == sb["registered_model"]
