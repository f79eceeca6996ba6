"""PPO checkpoints copied to the artifact store while a phase trains, for a restart on another machine.

On when ``store.mirror_checkpoints`` says so, by default for an ``s3://`` store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path

from concise_rl import store as artifact_store
from concise_rl.config import PipelineConfig
from concise_rl.files import point_latest

log = logging.getLogger(__name__)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class CheckpointMirror:
    """Copies of one training run's PPO checkpoints in the artifact store, for a restart elsewhere.

    Under ``runs/<model>/<phase>/<run key>/`` each checkpoint is a folder committed
    with its manifest, and ``LATEST`` (written after it) names the newest; the one
    before it is deleted once ``LATEST`` has moved, so the store holds one or two.
    A fresh machine (no local checkpoint) restores the folder ``LATEST`` names,
    checked file by file, and PPO resumes from it as from a local one.

    Uploads run in a background thread, one at a time: :meth:`push` waits for the
    previous one (raising its error, if it had one) and starts the next, so training
    does not stop for a multi-GB transfer. :meth:`close` waits for the last one.
    """

    STAGING = ".mirror-staging"

    def __init__(self, cfg: PipelineConfig, phase: str, run_key: str):
        self.store = artifact_store.open_store(cfg.store)
        self.root = self.store.uri("runs", cfg.registry.model_name, phase, run_key[:16])
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @staticmethod
    def enabled(cfg: PipelineConfig) -> bool:
        on = cfg.store.mirror_checkpoints
        return artifact_store.is_s3(cfg.store.uri or "") if on is None else on

    def push(self, path: Path) -> None:
        """Wait for the previous upload (raising its error), then start uploading ``path`` in the background."""
        self.close()
        staged = self._stage(path)
        self._thread = threading.Thread(target=self._upload, args=(staged, path.name),
                                        name=f"mirror-{path.name}")
        self._thread.start()

    def close(self) -> None:
        """Wait for the upload in flight, if any; raise the error it ended with."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _stage(self, path: Path) -> Path:
        # The trainer prunes old local checkpoints (keeping two) before it calls us, so with slow
        # uploads the folder being uploaded can be deleted under the upload. Hard links to its files
        # in a sibling folder keep their content alive until the upload is done; they cost no space
        # (same filesystem). Where linking fails, the files are copied.
        staged = path.parent / self.STAGING / path.name
        shutil.rmtree(staged, ignore_errors=True)  # left by a process killed mid-upload
        try:
            shutil.copytree(path, staged, copy_function=_link_or_copy)
        except BaseException:
            self._unstage(staged)
            raise
        return staged

    def _unstage(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # only once empty

    def _upload(self, staged: Path, name: str) -> None:
        """Commit ``staged`` as ``name``, then point ``LATEST`` at it, then delete the one before (in the thread)."""
        try:
            previous = self.store.read_text(artifact_store.join(self.root, "LATEST"))
            self.store.upload_dir(staged, artifact_store.join(self.root, name))
            self.store.write_text(artifact_store.join(self.root, "LATEST"), name)
            if previous and previous.strip() != name:
                self.store.delete_dir(artifact_store.join(self.root, previous.strip()))
            log.info("checkpoint %s mirrored to %s", name, self.root)
        except BaseException as exc:  # noqa: BLE001 - handed to the next push() or close()
            self._error = exc
        finally:
            self._unstage(staged)

    def restore(self, ckpt_dir: Path) -> str | None:
        """Download the newest mirrored checkpoint into ``ckpt_dir`` and point ``latest`` at it; its name."""
        name = self.store.read_text(artifact_store.join(self.root, "LATEST"))
        if not name:
            return None
        name = name.strip()
        self.store.download_dir(artifact_store.join(self.root, name), ckpt_dir / name)
        point_latest(ckpt_dir, name)
        log.info("restored checkpoint %s from %s", name, self.root)
        return name


def finish_uploads(mirrors: list[CheckpointMirror], training_failed: bool) -> None:
    """Wait for the last checkpoint upload; its error is raised, or only logged when training failed
    (that exception is the one to see)."""
    for m in mirrors:
        try:
            m.close()
        except Exception as exc:
            if not training_failed:
                raise
            log.error("the upload of the last checkpoint to %s failed as well: %s", m.root, exc)
