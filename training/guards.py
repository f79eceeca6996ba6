"""Training guards: when a PPO phase must stop instead of training on.

Each guard reads the per-step metrics the trainer logs (``metrics.jsonl`` rows)
and names the first step that breaks it:

- non-finite: a NaN or infinite reward, policy or value loss, or gradient norm.
  Always on. The optimiser has already stepped on it, so the weights in memory are
  poisoned; the step is never checkpointed.
- runaway length: ``truncation_rate`` (responses that hit ``ppo.max_new_tokens``)
  above ``guards.max_truncation_rate`` for ``guards.truncation_patience`` steps in
  a row. A truncated response has no final answer, so it earns the no-box penalty
  whatever its reasoning: once most responses are cut off, the reward measures the
  budget, not the answers, and length is no longer under the policy's control.
- reward collapse: no correct response in a step (``accuracy`` 0, so every reward
  is a penalty, ``reward.wrong_boxed`` or ``reward.no_box``) for
  ``guards.reward_collapse_patience`` steps in a row. Such a step shows PPO only
  what not to do; the paper's analysis is that negative rewards alone make
  responses longer, which is the opposite of what either phase is for, and a long
  run of them means the problems are out of reach (or their answers cannot be
  matched) or the policy has degenerated. Identical rewards alone are not a
  collapse: the demo's phase 2 reaches steps where every response is correct, and
  those still shorten responses, which is the paper's mechanism.

This module decides, and keeps the stop record (``stopped.json``, :class:`StopRecord`)
that the pipeline reads to refuse registering or promoting the run; the trainer stops
and keeps its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from concise_rl.config import GuardConfig, PPOConfig
from concise_rl.errors import TrainingGuardError
from concise_rl.files import atomic_write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

STOP_FILE = "stopped.json"
# Metrics whose NaN or inf means the update itself went wrong.
FINITE_KEYS = ("reward", "policy_loss", "value_loss")


@dataclass(frozen=True)
class Trip:
    """Why and where a guard stopped a phase."""

    guard: str  # "non-finite", "runaway length", "reward collapse"
    step: int
    metric: str
    value: float
    threshold: str  # the rule that was broken, in config terms
    since: int  # first step of the streak (the step itself for non-finite)
    advice: str

    def as_dict(self) -> dict:
        return asdict(self)


def check(history: list[dict], cfg: GuardConfig, finite_keys: tuple[str, ...] = FINITE_KEYS) -> Trip | None:
    """The guard the last row of ``history`` (metrics rows in step order, each with ``step``) trips, if any."""
    if not history:
        return None
    row = history[-1]
    for key in finite_keys:
        value = row.get(key)
        if value is not None and not math.isfinite(value):
            return Trip(
                "non-finite", row["step"], key, value, "every reward, loss and gradient norm must be finite", row["step"],
                "lower ppo.actor_lr / ppo.critic_lr (or raise ppo.warmup_ratio), and check that the reward "
                "settings are finite numbers",
            )
    if cfg.max_truncation_rate is not None:
        streak = _streak(history, lambda r: r["truncation_rate"] > cfg.max_truncation_rate)
        if streak >= cfg.truncation_patience:
            return Trip(
                "runaway length", row["step"], "truncation_rate", row["truncation_rate"],
                f"truncation_rate above ppo.guards.max_truncation_rate={cfg.max_truncation_rate} for "
                f"ppo.guards.truncation_patience={cfg.truncation_patience} steps in a row",
                history[-streak]["step"],
                "raise ppo.max_new_tokens, lower ppo.actor_lr, or train on shorter problems; or loosen "
                "ppo.guards.max_truncation_rate / truncation_patience",
            )
    if cfg.reward_collapse_patience is not None:
        streak = _streak(history, lambda r: r["accuracy"] == 0.0)
        if streak >= cfg.reward_collapse_patience:
            return Trip(
                "reward collapse", row["step"], "accuracy", row["accuracy"],
                f"no correct response (accuracy 0) for ppo.guards.reward_collapse_patience="
                f"{cfg.reward_collapse_patience} steps in a row",
                history[-streak]["step"],
                "pick problems the model can solve (curation bands), check that their answers match the "
                "model's \\boxed{} format, raise ppo.max_new_tokens, or lower ppo.actor_lr",
            )
    return None


def _streak(history: list[dict], bad) -> int:
    """How many of the last rows, counting back from the newest, are ``bad``."""
    n = 0
    for row in reversed(history):
        if not bad(row):
            break
        n += 1
    return n


def read_stop(out_dir: str | Path) -> dict | None:
    """The stop record a guard left in a PPO output folder, or None when it has none."""
    try:
        return json.loads((Path(out_dir) / STOP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class StopRecord:
    """The stop record of one PPO run (``run_key``: same start, data and settings) in ``out_dir``.

    Every process holds one; the main process alone writes and removes the file.
    """

    def __init__(self, out_dir: Path, run_key: str, cfg: PPOConfig, accelerator: Accelerator):
        self.path = out_dir / STOP_FILE
        self.out_dir = out_dir
        self.run_key = run_key
        self.cfg = cfg
        self.accelerator = accelerator

    def read(self) -> dict | None:
        """What a guard recorded when it stopped this exact run (same start, data, settings); None if it did not."""
        stop = read_stop(self.out_dir)
        return stop if stop is not None and stop.get("run_key") == self.run_key else None

    def stop(self, trip: Trip, metrics: dict[str, float], latest: Path | None) -> NoReturn:
        """Record the stop in ``stopped.json`` (the main process) and raise on every process.

        The step that tripped is never checkpointed, so the ``latest`` checkpoint is the
        last good one; for a non-finite step that also keeps the poisoned weights off disk.
        """
        if latest is not None:
            kept_step = json.loads((latest / "trainer_state.json").read_text())["step"]
            kept = f"Kept the last good checkpoint {latest} (step {kept_step}); nothing after it was saved"
        else:
            kept_step = None
            kept = (f"No checkpoint was written before it (ppo.checkpoint_every={self.cfg.checkpoint_every}), "
                    "and nothing of this run was saved")
        streak = f" (and at every step since step {trip.since})" if trip.since != trip.step else ""
        message = (
            f"PPO in {self.out_dir} stopped at step {trip.step} by the {trip.guard} guard: {trip.metric} was "
            f"{trip.value:.4g}{streak}; threshold: {trip.threshold}. {kept}. "
            f"What to do: {trip.advice}; then run again."
        )
        stop = {
            **trip.as_dict(), "run_key": self.run_key, "guards": self.cfg.guards.model_dump(mode="json"),
            "checkpoint": str(latest) if latest else None, "checkpoint_step": kept_step, "message": message,
            "metrics": metrics,
        }
        if self.accelerator.is_main_process:
            atomic_write_json(self.path, stop)
        log.error(message)
        raise TrainingGuardError(message, stop)

    def raise_if_stopped(self) -> None:
        """Raise the recorded stop again if a guard stopped this run and its guards are unchanged.

        With the same guards the run would only stop again (it resumes from the same
        checkpoint with the same random state), so it is not retried. With other guard
        settings the record is cleared and the trainer resumes from the kept checkpoint.
        """
        stop = self.read()
        if stop is None:
            return
        path = self.path
        if stop.get("guards") == self.cfg.guards.model_dump(mode="json"):
            raise TrainingGuardError(
                f"{stop['message']} (Recorded in {path} by an earlier run with these settings; change them, or "
                "delete that file to retry from the checkpoint.)", stop,
            )
        log.info("the guards changed since a guard stopped this run (%s); resuming from its last checkpoint", path)
        self.accelerator.wait_for_everyone()  # every process has read the record before it goes
        if self.accelerator.is_main_process:
            path.unlink(missing_ok=True)
