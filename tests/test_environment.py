"""The venv holds the versions constraints.txt pins (Makefile: every install goes through it).

What was measured (README.md, BENCHMARKS.md) was measured with these versions; a package
that the project needs but the lock does not pin, or a version that differs from it, would
let a fresh clone resolve something else.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def needed(root: str, extras: tuple[str, ...]) -> set[str]:
    """``root`` and every distribution its requirements (with ``extras``) pull in, as installed."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            marker_env = [default_environment() | {"extra": e} for e in ("", *wanted)]
            if req.marker is None or any(req.marker.evaluate(env) for env in marker_env):
                todo.append((req.name, tuple(req.extras)))
    return seen - {canonicalize_name(root)}


def test_every_needed_package_is_pinned_and_installed_at_its_pin():
    pins = pinned()
    wanted = needed("concise-rl", ("dev",)) | {"deepspeed", "torch"} | needed("deepspeed", ())
    unpinned = sorted(wanted - pins.keys())
    assert not unpinned, f"constraints.txt does not pin {unpinned}; run `make lock`"
    wrong = {name: (metadata.version(name), pins[name]) for name in wanted
             if metadata.version(name).split("+")[0] != pins[name]}
    assert not wrong, f"installed version differs from constraints.txt (installed, pinned): {wrong}; run `make install`"
