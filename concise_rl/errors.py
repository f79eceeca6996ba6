"""User-facing errors, each turned by the CLI into a one-line message and an exit code.

Most mean "the input is wrong" (exit code 2). They live here, free of heavy
imports, so the CLI can catch them without loading torch first; each message
names the input and says what to change.
"""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


class ProblemLoadError(ValueError):
    """A problem file or dataset that cannot be read into problems."""


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded."""


class CurationError(ValueError):
    """Curation found nothing usable in a configured band."""


class TrackingServerError(RuntimeError):
    """registry.tracking_uri names an MLflow server that does not answer (the CLI exits 1, in one line)."""


class DiskFullError(OSError):
    """A checkpoint or model folder could not be written for lack of disk space (the CLI exits 1, in one line).

    Nothing half-written is left behind: the folder being written is removed and the
    previous checkpoint, still the one ``latest`` points at, is kept for a resume.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


class TrainingGuardError(RuntimeError):
    """A training guard stopped a PPO phase (training/guards.py); the CLI exits 5, in one line.

    ``stop`` is the record the trainer wrote to the phase's ``stopped.json``: the guard,
    the step, the value and threshold, and the checkpoint that was kept.
    """

    def __init__(self, message: str, stop: dict | None = None):
        super().__init__(message)
        self.stop = stop or {}

    def __reduce__(self):  # Prefect may pickle a task's exception; keep the record with it
        return type(self), (str(self), self.stop)


class PreemptedError(RuntimeError):
    """SIGTERM or SIGINT stopped a PPO phase after its last completed step was checkpointed
    (training/preempt.py); the CLI exits 128 + the signal (143, 130) in one line."""

    def __init__(self, message: str, step: int = 0, signum: int = 15):
        super().__init__(message)
        self.step, self.signum = step, signum

    def __reduce__(self):  # Prefect may pickle a task's exception
        return type(self), (str(self), self.step, self.signum)


def nearest(word: str, choices) -> str | None:
    """The choice nearest ``word``, or None when none is near.

    difflib's ratio at 0.6 (its default) catches a dropped, doubled or swapped letter
    (``evalute``, ``champoin``, ``temperature``) without offering unrelated names.
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return close[0] if close else None


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """``" (did you mean 'PREFIXx'?)"`` for the choice x nearest ``word``, or ``""`` when none is near."""
    near = nearest(word, choices)
    return f" (did you mean '{prefix}{near}'?)" if near else ""
