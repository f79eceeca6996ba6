"""Worker functions that fail on purpose, for the grader pool's fault tests.

A module of its own so that spawned grader workers can import it by name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from concise_rl.grader import verify_extracted


def crash_once(extracted: str, reference: str, timeout_s):
    """Kill the worker the first time an answer is seen (a marker file per answer), then grade it."""
    key = hashlib.sha256(f"{extracted}\0{reference}".encode()).hexdigest()[:16]
    marker = Path(os.environ["GRADER_FAULT_DIR"]) / f"seen-{key}"
    if not marker.exists():
        marker.touch()
        os._exit(9)
    return verify_extracted(extracted, reference, timeout_s)


def crash_always(extracted: str, reference: str, timeout_s):
    os._exit(9)


def crash_on_answer(extracted: str, reference: str, timeout_s):
    """Kill the worker the first time it grades the answer named by GRADER_CRASH_ON; grade everything else.

    One crash in the middle of a batch: the marker file (created atomically) makes it once only.
    """
    if extracted == os.environ["GRADER_CRASH_ON"]:
        try:
            fd = os.open(Path(os.environ["GRADER_FAULT_DIR"]) / "crashed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(9)
    return verify_extracted(extracted, reference, timeout_s)
