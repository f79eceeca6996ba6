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

This module decides; the trainer stops, keeps its last checkpoint and writes the
stop record (``stopped.json``) that the pipeline reads to refuse registering or
promoting the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from concise_rl.config import GuardConfig

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
