"""Preemption: SIGTERM or SIGINT while PPO trains saves the last completed step, then stops.

Clusters preempt GPU jobs with SIGTERM and a grace period before SIGKILL (30 s by default
on Kubernetes; a spot reclaim does the same). Without this, a
SIGTERM unwinds at once and loses every step since the last ``ppo.checkpoint_every``
checkpoint. With it, the signal is only noted; the trainer acts on it at a safe point:

- while the rollout is being sampled (most of a step, and nothing has changed yet), the
  rollout is dropped at the next token, the step's random state is put back, and the
  checkpoint of the last completed step is written;
- during the updates (short, and the weights are half-changed), the step is finished and
  then checkpointed.

Under ``accelerate launch`` every process takes the signal and the processes agree at the
step boundary (sampling there has no collective to abandon safely, so they finish the
step); only the main process writes, as for any checkpoint. The run then stops with
:class:`concise_rl.errors.PreemptedError`, which the CLI turns into one line and exit code
128 + the signal (143 for SIGTERM, 130 for SIGINT); the same command resumes from that step.
A second SIGINT (Ctrl-C twice) stops at once, as before.

Kept free of torch so the CLI's signal handler can import it cheaply.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator


class StepAbandoned(Exception):
    """The rollout in flight was dropped because the run is being preempted."""


class _State:
    def __init__(self) -> None:
        self.signum: int | None = None  # the signal being acted on, if any
        self.at: float | None = None  # when it came (time.monotonic())
        self.loops = 0  # training loops watching for it
        self.abandon_ok = False  # whether the work in flight may be dropped (a rollout, one process)


STATE = _State()


def request(signum: int) -> bool:
    """Note ``signum`` for the training loop; False when no loop watches, or for a second SIGINT (stop at once)."""
    if STATE.loops == 0 or (STATE.signum is not None and signum == signal.SIGINT):
        return False
    if STATE.signum is None:
        STATE.signum, STATE.at = signum, time.monotonic()
    return True


def requested() -> int | None:
    """The signal a training loop must act on, if one came."""
    return STATE.signum


def check() -> None:
    """Raise :class:`StepAbandoned` where a preemption is pending and the work in flight may be dropped;
    called between sampled tokens and batches, so it costs an attribute read."""
    if STATE.signum is not None and STATE.abandon_ok:
        raise StepAbandoned(signal.Signals(STATE.signum).name)


@contextlib.contextmanager
def abandonable(ok: bool = True) -> Iterator[None]:
    """Within this block (a rollout), a pending preemption drops the work at the next :func:`check`."""
    before, STATE.abandon_ok = STATE.abandon_ok, ok
    try:
        check()
        yield
    finally:
        STATE.abandon_ok = before


def _note_or_stop(signum, frame) -> None:
    if not request(signum):
        raise KeyboardInterrupt(f"signal {signum}") if signum == signal.SIGINT else SystemExit(128 + signum)


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Around a training loop: SIGTERM and SIGINT are noted (:func:`request`) instead of stopping the process.

    The handlers are installed only in the main thread (Python runs them there); a loop in
    another thread is still reached by the CLI's own handler, which calls :func:`request`.
    """
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            saved[sig] = signal.signal(sig, _note_or_stop)
    STATE.loops += 1
    try:
        yield
    finally:
        STATE.loops -= 1
        if STATE.loops == 0:
            STATE.signum = STATE.at = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)
