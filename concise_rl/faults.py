"""Crash points: the instants where a kill is hardest to survive, named so a test can kill exactly there.

A SIGKILL sent from outside lands somewhere in a stage, and the instants that matter most
last microseconds: a checkpoint whose files are written but not yet renamed into place, a
version uploaded but not registered, a version registered whose alias has not moved. With
``CONCISE_RL_CRASH_AT=NAME`` (or ``NAME@N`` for its Nth passage) the process SIGKILLs
itself, and its whole process group when it leads one (as a lost node would), the moment
it reaches that point. ``python -m bench.killsoak --points`` and tests/test_killsoak.py use
them; in every other run the variable is unset and :func:`point` is a comparison.
"""

from __future__ import annotations

import os
import signal

POINTS = {
    "checkpoint-files": "a PPO checkpoint's files are written in its .tmp folder, nothing renamed yet",
    "checkpoint-pointer": "the checkpoint folder is renamed into place, the `latest` pointer not yet moved",
    "after-upload": "a trained policy is committed to the artifact store, its version not yet created",
    "before-alias": "the version is created with its lineage tags, its phase alias not yet moved",
    "before-champion": "the gate passed and the candidate is tagged with its figures, `champion` not yet moved",
}
ENV = "CONCISE_RL_CRASH_AT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    if name not in POINTS or (nth and not nth.isdigit()) or nth == "0":
        raise ValueError(f"{ENV}={spec!r}: expected NAME or NAME@N (N from 1) with NAME one of {', '.join(POINTS)}")
    return name, int(nth or 1)


_TARGET = _parse(os.environ.get(ENV))
_passed: dict[str, int] = {}


def point(name: str) -> None:
    """Crash here when ``$CONCISE_RL_CRASH_AT`` names this point (and this is its Nth passage)."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == _TARGET[1]:
        if os.getpgid(0) == os.getpid():  # a group leader (a job, a test's child): the group goes with it
            os.killpg(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
