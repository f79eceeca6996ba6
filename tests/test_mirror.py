"""PPO checkpoints mirrored to the artifact store while a phase trains (concise_rl/mirror.py), against the real
S3-compatible server of tests/test_store.py, and a fresh machine resuming from that copy."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
from test_store import BUCKET, make_checkpoint, s3_server, same_tree  # noqa: F401 - s3_server: fixture

from concise_rl.config import PipelineConfig
from concise_rl.mirror import CheckpointMirror, finish_uploads
from concise_rl.store import ArtifactStore, StoreError


def test_ppo_checkpoints_are_mirrored_and_a_new_machine_resumes_from_the_store(s3_server, tmp_path, tiny_model_dir,
                                                                                mlflow_home, caplog):
    """With an s3:// store every checkpoint is also committed there; a machine without it resumes from that copy."""
    import torch
    from safetensors.torch import load_file

    from concise_rl import paths
    from concise_rl.problems import save_problems
    from concise_rl.synthetic import generate_problems
    from concise_rl.tasks import stages

    problems = tmp_path / "problems.jsonl"
    save_problems(generate_problems(4, seed=0), problems)
    ppo = {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "mini_batch_size": 2, "micro_batch_size": 1,
           "max_new_tokens": 16, "warmup_ratio": 0.0, "checkpoint_every": 1}
    cfg = PipelineConfig(model={"name_or_path": str(tiny_model_dir)}, ppo=ppo,
                         store=s3_server.store_config("mirror").model_dump())
    assert CheckpointMirror.enabled(cfg)
    final = Path(stages.train_phase(cfg, "phase1", str(tiny_model_dir), str(problems)))
    trained = load_file(str(final / "model.safetensors"))
    history = (paths.checkpoints("phase1") / "metrics.jsonl").read_text()

    store = ArtifactStore(cfg.store)
    runs = f"s3://{BUCKET}/mirror/runs/{cfg.registry.model_name}/phase1"
    (key,) = {k.split("/")[0] for k in store._folder(runs).sizes()}
    root = f"{runs}/{key}"
    assert store.read_text(f"{root}/LATEST") == "step-000002"
    assert store.read_manifest(f"{root}/step-000001") is None, "the older mirrored checkpoint is deleted"
    files = store.verify(f"{root}/step-000002")["files"]
    assert {"policy/model.safetensors", "critic.safetensors", "optim.pt", "rng.pt", "trainer_state.json",
            "metrics.jsonl"} <= set(files)

    # A new machine: nothing local. The same call restores step 2 from the store and finishes from it.
    shutil.rmtree(paths.checkpoints("phase1"))
    with caplog.at_level(logging.INFO):
        again = Path(stages.train_phase(cfg, "phase1", str(tiny_model_dir), str(problems)))
    assert "restored checkpoint step-000002" in caplog.text and "resumed PPO from" in caplog.text
    restored = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    assert (paths.checkpoints("phase1") / "metrics.jsonl").read_text() == history, "the history came with it"


def test_mirror_upload_runs_in_the_background_and_survives_the_local_checkpoint_being_pruned(s3_server, tmp_path):
    """push() returns before the upload; the trainer may delete the folder meanwhile (pruning) and the store
    still gets all of it, from the hard-linked staging folder, committed in order (folder, LATEST, old deleted)."""
    cfg = PipelineConfig(store=s3_server.store_config("bg").model_dump())
    mirror = CheckpointMirror(cfg, "phase1", "0123456789abcdef-run")
    ckpts = tmp_path / "checkpoints"
    reference = {}
    for name in ("step-000001", "step-000002"):
        make_checkpoint(ckpts / name, big_mb=6)
        reference[name] = shutil.copytree(ckpts / name, tmp_path / "reference" / name)

    # Each upload waits until the test has deleted the local folder, so one that read the original folder
    # (or ran before push() returned) would find nothing there.
    pruned = {name: threading.Event() for name in reference}
    waited = []
    upload_dir = mirror.store.upload_dir

    def gated_upload_dir(local_dir, uri, manifest=None):
        waited.append(pruned[Path(local_dir).name].wait(timeout=30))
        return upload_dir(local_dir, uri, manifest)

    mirror.store.upload_dir = gated_upload_dir
    for name in reference:
        mirror.push(ckpts / name)
        assert (ckpts / ".mirror-staging" / name).is_dir(), "staged before push() returns"
        shutil.rmtree(ckpts / name)  # what _prune_checkpoints does to an older checkpoint
        pruned[name].set()
    mirror.close()
    assert waited == [True, True], "an upload had to go on before its push() returned"
    assert not (ckpts / ".mirror-staging").exists(), "the staging folder is removed once uploaded"

    assert mirror.store.read_text(f"{mirror.root}/LATEST") == "step-000002"
    assert mirror.store.read_manifest(f"{mirror.root}/step-000001") is None, "the older mirrored checkpoint is deleted"
    mirror.store.verify(f"{mirror.root}/step-000002")
    fresh = tmp_path / "fresh"
    assert mirror.restore(fresh) == "step-000002"
    assert same_tree(reference["step-000002"], fresh / "step-000002")
    mirror.close()  # nothing in flight: a no-op


def test_a_failed_background_upload_is_raised_by_the_next_push_or_close_and_unstaged(s3_server, tmp_path):
    """The StoreError an upload thread ends with (after its retries) surfaces, with its message, at the next
    push() (which then starts nothing) or at close(); the staging folder is removed either way."""
    cfg = PipelineConfig(store=s3_server.store_config("fail", max_attempts=2, retry_base_s=0.05).model_dump())
    mirror = CheckpointMirror(cfg, "phase1", "0123456789abcdef-run")
    ckpts = tmp_path / "checkpoints"
    for name in ("step-000001", "step-000002", "step-000003"):
        make_checkpoint(ckpts / name, big_mb=1)
    s3_server.stop()

    mirror.push(ckpts / "step-000001")  # returns: the error comes with the next call
    with pytest.raises(StoreError, match=f"failed 2 times against {s3_server.endpoint}"):
        mirror.push(ckpts / "step-000002")
    assert not (ckpts / ".mirror-staging").exists(), "the failed upload's staging folder is removed"
    mirror.close()  # the error was raised once; step 2 never started

    mirror.push(ckpts / "step-000003")
    with pytest.raises(StoreError, match=f"failed 2 times against {s3_server.endpoint}"):
        mirror.close()
    assert not (ckpts / ".mirror-staging").exists()
    assert all((ckpts / n / "model.safetensors").is_file() for n in ("step-000001", "step-000002", "step-000003")), \
        "the local checkpoints are left alone"


def test_the_last_upload_error_is_raised_only_when_training_succeeded(caplog):
    """A failed last upload fails a finished phase; after a crash it is logged and the crash is what is raised."""
    class FailedMirror:
        root = "s3://bucket/runs/x"

        def close(self):
            raise StoreError("upload of step-000003 failed 5 times")

    with pytest.raises(StoreError, match="step-000003 failed 5 times"):
        finish_uploads([FailedMirror()], training_failed=False)
    with caplog.at_level(logging.ERROR):
        finish_uploads([FailedMirror()], training_failed=True)
    assert "step-000003 failed 5 times" in caplog.text
    finish_uploads([], training_failed=False)
