"""One pipeline at a time per registered model and concise-rl home.

Two pipelines started at once against one registry would interleave their
registrations and alias moves (run A's phase 2 trained from run B's ``phase1``,
``champion`` moved by whichever promotes last) and share the checkpoint folders.
:func:`registry_lock` takes an exclusive ``flock`` on
``<home>/locks/<model>.lock`` without waiting: the second pipeline stops at once
with :class:`RegistryBusyError`, whose message names the holder (pid, host,
command, start time). The kernel drops the lock when the holder exits, however
it exits, so a killed run never leaves a stale lock behind.

The lock covers every process that shares the home folder (one machine, or a
shared filesystem with working ``flock``). Deployment runs are also limited to
one at a time by the retraining deployment's ``concurrency_limit: 1``
(infra/prefect.yaml), which the Prefect server enforces across workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from concise_rl import paths

_held: dict[str, int] = {}  # lock path -> nesting depth in this process


class RegistryBusyError(RuntimeError):
    """Another pipeline holds the lock of this registered model."""


def lock_path(model_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return paths.home() / "locks" / f"{safe}.lock"


def holder(model_name: str) -> dict | None:
    """What the lock file says about its last holder (None when it was never taken)."""
    try:
        return json.loads(lock_path(model_name).read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def registry_lock(model_name: str, what: str) -> Iterator[Path]:
    """Hold the model's pipeline lock for the block, or raise :class:`RegistryBusyError` at once.

    Re-entrant within one process (the CLI and the flow it calls may both take it).
    """
    path = lock_path(model_name)
    key = str(path)
    if _held.get(key):
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = holder(model_name) or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"])) if "started" in info else "?"
            raise RegistryBusyError(
                f"another pipeline is already using registered model '{model_name}' under {paths.home()} "
                f"(pid {info.get('pid', '?')} on {info.get('host', '?')}: {info.get('what', '?')}, since {since}); "
                "two at once would mix its aliases and checkpoints. Wait for it to finish and run again, "
                "or use another CONCISE_RL_HOME / registry.model_name."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "started": time.time(), "argv": sys.argv[:8]}).encode())
        os.fsync(fd)
        _held[key] = 1
        try:
            yield path
        finally:
            _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
