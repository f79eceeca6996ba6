"""Files and folders written whole or not at all, the ``latest`` pointers, JSON lines.

A crash (a kill, a full disk) must never leave a half-written file where a reader,
a resumed run or the next stage would take it for a finished one. Everything is
written to a temporary sibling first and renamed into place (a rename within one
filesystem is atomic); on an error the temporary is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` to; renamed over ``path`` on success, removed on an error.

    The temporary's name is hidden and per process (``.NAME.partial-PID``), so two
    processes writing the same file (a shared store folder) do not clobber each other.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


@contextlib.contextmanager
def replaced_dir(path: Path, *, unique: bool = False) -> Iterator[Path]:
    """A new, empty temporary folder to fill; on success the folder at ``path`` is replaced by it.

    By default the temporary is ``NAME.tmp``, and one a killed process left is removed
    first, so a large leftover (a model) is reclaimed by the next try. ``unique``: a
    fresh hidden ``.NAME.partial-XXXX`` instead, for a folder that several processes
    may fill at once (a download cache). On an error the temporary is removed and
    ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    else:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def point_latest(folder: Path, name: str) -> None:
    """Record ``folder/name`` as the newest in ``folder/latest`` (atomically: readers see the old or the new)."""
    atomic_write_text(folder / "latest", name)


def read_latest(folder: Path) -> Path | None:
    """The folder that ``folder/latest`` names, or None when nothing was recorded there yet."""
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    return folder / pointer.read_text().strip()


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
