"""The demo's base, built once by this project's own code and shipped in the repository.

The embedded base is the input of the pipeline, as DeepSeek-R1-Distill is of a real run:
the pipeline's work starts at curation. Building it (the float32 SFT on 9,000 traces) takes
about 6.6 of the demo's minutes on 2 cores, so the repository ships the base that
``training/embedded.py`` builds for ``configs/demo.yaml`` (``training/prebuilt/NAME/``, with
the sha256 of every file and how it was built in ``manifest.json``), and ``make demo`` copies
it into the home instead of building it. Every user then starts from the base the figures in
BENCHMARKS.md were measured with, whatever their CPU's arithmetic.

A base is shipped under the name :func:`concise_rl.training.models.embedded_dir` gives it,
which hashes the embedded config and the code of the task and the build; any change to either
names another base, which is then built as before (the tests fail until the shipped one is
rebuilt: ``python -m bench.base --ship``). ``model.embedded.use_prebuilt: false`` always builds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from concise_rl.errors import ModelLoadError
from concise_rl.files import atomic_write_json, replaced_dir
from concise_rl.store import sha256_file

log = logging.getLogger(__name__)

PREBUILT = Path(__file__).resolve().parent / "prebuilt"
MANIFEST = "manifest.json"


def manifest(root: Path = PREBUILT) -> dict:
    """``{name: {"files": {file: sha256}, "built": {...}}}`` of every shipped base (empty if none)."""
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(model_dir).iterdir()) if p.is_file()}


def install(model_dir: Path, root: Path = PREBUILT) -> bool:
    """Copy the shipped base named ``model_dir.name`` to ``model_dir``; whether one was copied.

    Nothing happens when ``model_dir`` already holds a model or no base of that name is shipped.
    A shipped file whose sha256 differs from the manifest's (a bad checkout, a Git LFS pointer)
    is refused rather than trained on.
    """
    model_dir = Path(model_dir)
    entry = manifest(root).get(model_dir.name)
    if (model_dir / "config.json").is_file() or entry is None:
        return False
    source = root / model_dir.name
    found = file_hashes(source) if source.is_dir() else {}
    if found != entry["files"]:
        bad = sorted(n for n in set(found) | set(entry["files"]) if found.get(n) != entry["files"].get(n))
        raise ModelLoadError(
            f"the shipped base {source} does not match {root / MANIFEST} ({', '.join(bad)} missing or changed); "
            "restore it with `git checkout -- training/prebuilt`, or build the base here with "
            "--set model.embedded.use_prebuilt=false"
        )
    with replaced_dir(model_dir) as tmp:
        for name in entry["files"]:
            shutil.copy2(source / name, tmp / name)
    log.info("using the base shipped in %s (%s); model.embedded.use_prebuilt=false builds it here instead",
             source, entry["built"].get("command", "built by training/embedded.py"))
    return True


def ship(model_dir: Path, name: str, built: dict, root: Path = PREBUILT) -> Path:
    """Make the base in ``model_dir`` the only shipped one, as ``name`` (its ``embedded_dir`` name),
    recording ``built`` (how, where, when) in the manifest."""
    model_dir = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    for old in manifest(root):
        if old != name:
            shutil.rmtree(root / old, ignore_errors=True)
    target = root / name
    with replaced_dir(target) as tmp:
        for path in sorted(model_dir.iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
    atomic_write_json(root / MANIFEST, {name: {"files": file_hashes(target), "built": built}})
    return target
