"""SIGTERM and SIGINT during PPO (issue 23, point 1): the last completed step is checkpointed at once,
whatever ``ppo.checkpoint_every`` says, the run stops with PreemptedError, and the same trainer resumes
from that step and ends where an uninterrupted run ends.

The signals are real (``os.kill`` of this process), delivered while the rollout is sampled (the
rollout is dropped) or during the updates (the step is finished first). The pipeline-level test,
with the CLI's exit code and the MLflow run closed as KILLED, is in tests/test_resume_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

from concise_rl.errors import PreemptedError
from concise_rl.training import preempt, trainer

STEPS = 4


def _checkpoint_step(out: Path) -> int:
    ckpts = out / "checkpoints"
    return json.loads((ckpts / (ckpts / "latest").read_text().strip() / "trainer_state.json").read_text())["step"]


def _signal_when(monkeypatch, name: str, at_call: int, signum: int) -> None:
    """Send ``signum`` to this process on the ``at_call``-th call (from 1) of ``trainer.<name>``, then go on."""
    real = getattr(trainer, name) if name == "generate" else getattr(trainer.PPOTrainer, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    if name == "generate":
        monkeypatch.setattr(trainer, "generate", wrapped)
    else:
        monkeypatch.setattr(trainer.PPOTrainer, name, wrapped)


@pytest.mark.parametrize(("where", "signum", "stopped_at"), [
    ("generate", signal.SIGTERM, 2),  # in step 3's rollout: dropped, step 2 is the last completed one
    ("update", signal.SIGTERM, 3),  # in step 3's updates: finished first
    ("generate", signal.SIGINT, 2),
])
def test_a_signal_checkpoints_the_last_completed_step_and_the_run_resumes_to_the_same_end(
        where, signum, stopped_at, tiny_model_dir, tmp_path, monkeypatch):
    straight = make_trainer(tiny_model_dir, tmp_path / "straight", steps=STEPS, checkpoint_every=100)
    final_straight = straight.train()

    out = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        _signal_when(patch, where, 3, signum)
        with pytest.raises(PreemptedError) as stopped:
            make_trainer(tiny_model_dir, out, steps=STEPS, checkpoint_every=100).train()
    error = stopped.value
    assert (error.step, error.signum) == (stopped_at, signum)
    assert f"{signal.Signals(signum).name} at step {stopped_at} of {STEPS}" in str(error)
    assert "run the same command to resume" in str(error)
    # checkpoint_every=100 wrote nothing on its own: this checkpoint is the preemption's.
    assert _checkpoint_step(out) == stopped_at
    assert len((out / "metrics.jsonl").read_text().splitlines()) == stopped_at
    assert not (out / "final").exists()
    # The handlers are the process's own again once the trainer has stopped.
    assert signal.getsignal(signal.SIGTERM) is not preempt._note_or_stop and preempt.requested() is None

    final = make_trainer(tiny_model_dir, out, steps=STEPS, checkpoint_every=100).train()
    a, b = load_file(str(Path(final_straight) / "model.safetensors")), load_file(str(Path(final) / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "the resumed run ends where the uninterrupted one does"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_without_a_training_loop_a_signal_stops_as_before():
    assert preempt.request(signal.SIGTERM) is False
    with preempt.watching():
        assert preempt.request(signal.SIGTERM) is True
        assert preempt.request(signal.SIGINT) is False, "a second signal, Ctrl-C, stops at once"
    assert preempt.requested() is None
