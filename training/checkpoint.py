"""A PPO run's folder on disk: checkpoints, the ``latest`` pointer, the metrics log, the final policy.

``out_dir/checkpoints/step-NNNNNN/`` holds everything a run needs to resume exactly (the
float32 master weights, optimizers, schedules, random state, the metrics so far);
``latest`` names the newest complete one and moves only once it is complete, so a crash
or a full disk mid-write leaves the previous one in charge. ``out_dir/final/`` is the
trained policy in model.dtype. A checkpoint is resumed only by the run that wrote it
(same start, data and settings: its ``run_key``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from concise_rl import faults
from concise_rl.errors import DiskFullError
from concise_rl.files import read_jsonl, read_latest
from concise_rl.training.precision import Precision

log = logging.getLogger(__name__)

# A write that failed while the disk had less than this free is taken for a full disk: torch.save and
# safetensors report a short write without the OS error (ENOSPC) behind it.
NEARLY_FULL_BYTES = 1024 * 1024


@dataclass
class Models:
    """What a checkpoint saves and restores besides the random state: the policy and the critic as
    the trainer runs them (accelerate's wrappers or DeepSpeed engines), their optimizers and schedules."""

    policy: torch.nn.Module
    critic: torch.nn.Module
    opt_actor: torch.optim.Optimizer
    opt_critic: torch.optim.Optimizer
    sched_actor: torch.optim.lr_scheduler.LRScheduler
    sched_critic: torch.optim.lr_scheduler.LRScheduler


def read_state(path: Path) -> dict | None:
    """A ``trainer_state.json``; None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Checkpointer:
    """Writes and reads the checkpoints of one run (``run_key``) in ``out_dir``.

    Every process holds one with the same arguments. The main process writes (DeepSpeed:
    every process writes its optimizer shard too); every process reads. ``on_checkpoint``
    is called on the main process with each checkpoint folder once it is complete and
    ``latest`` points at it.
    """

    def __init__(
        self,
        out_dir: Path,
        accelerator: Accelerator,
        *,
        run_key: str,
        base_policy: str,
        problems_hash: str,
        tokenizer,
        precision: Precision,
        zero: int | None,
        keep: int,
        on_checkpoint: Callable[[Path], None] | None = None,
    ):
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.final_dir = out_dir / "final"
        self.accelerator = accelerator
        self.run_key = run_key
        self.base_policy = base_policy
        self.problems_hash = problems_hash
        self.tokenizer = tokenizer
        self.precision = precision
        self.zero = zero
        self.keep = keep
        self.on_checkpoint = on_checkpoint

    # ----------------------------------------------------------------- what is there
    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points at, if it is complete (whichever run wrote it)."""
        path = read_latest(self.ckpt_dir)
        return path if path is not None and (path / "trainer_state.json").is_file() else None

    def own(self) -> tuple[Path, dict] | None:
        """This run's last checkpoint and its state, if ``latest`` points at one of this run's."""
        latest = self.latest()
        state = read_state(latest / "trainer_state.json") if latest else None
        return (latest, state) if state and state.get("run_key") == self.run_key else None

    def finished(self, steps: int) -> Path | None:
        """The final policy dir if this run already completed its ``steps``."""
        state = read_state(self.final_dir / "trainer_state.json")
        if state and state.get("run_key") == self.run_key and state.get("step") == steps:
            return self.final_dir
        return None

    def resume_or_reset(self, models: Models) -> tuple[int, list[dict]]:
        """Load this run's last checkpoint into ``models``, or start ``out_dir`` afresh.

        Returns the step to go on from and the metrics rows up to it (none when afresh).
        """
        acc = self.accelerator
        own = self.own()
        resume, latest = own is not None, own[0] if own else None
        if acc.num_processes > 1:  # the main process decides for all, so none starts afresh while others resume
            resume, latest = broadcast_object_list([resume, latest])
        if resume:
            step = self.load(latest, models)
            log.info("resumed PPO from %s at step %d", latest, step)
            acc.wait_for_everyone()
            # The guards count streaks across the interruption, as if the run had not stopped.
            return step, [r for r in self.read_metrics() if r["step"] <= step]
        if acc.is_main_process:
            if self.out_dir.exists():
                log.info("starting %s afresh: its checkpoints belong to another run", self.out_dir)
                shutil.rmtree(self.out_dir)
            self.out_dir.mkdir(parents=True)
        acc.wait_for_everyone()
        return 0, []

    # ----------------------------------------------------------------- metrics
    def read_metrics(self) -> list[dict]:
        path = self.out_dir / "metrics.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    # ----------------------------------------------------------------- writing
    def save(self, step: int, models: Models) -> Path:
        """Write everything needed to resume; the ``latest`` pointer moves only once it is complete.

        The main process writes it (DeepSpeed: every process writes its optimizer shard too).
        """
        acc = self.accelerator
        name = f"step-{step:06d}"
        path = self.ckpt_dir / name
        tmp = self.ckpt_dir / f"{name}.tmp"
        pointer_tmp = self.ckpt_dir / "latest.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._writing(name, tmp):
                tmp.mkdir(parents=True)
        policy_state = critic_state = None
        if self.zero is not None:
            acc.wait_for_everyone()  # the folder exists before any process writes to it
            for tag, engine in (("actor", models.policy), ("critic", models.critic)):
                engine.save_checkpoint(str(tmp / "deepspeed"), tag=tag, save_latest=False)
            policy_state, critic_state = acc.get_state_dict(models.policy), acc.get_state_dict(models.critic)
        if acc.is_main_process:
            with self._writing(name, tmp, pointer_tmp):
                self._save_policy(models.policy, tmp / "policy", policy_state)
                self.tokenizer.save_pretrained(tmp / "policy")
                if critic_state is None:
                    acc.unwrap_model(models.critic).save(tmp / "critic.safetensors")
                else:
                    save_file({k: v.contiguous() for k, v in critic_state.items()}, str(tmp / "critic.safetensors"))
                # Under DeepSpeed the optimizer states are in deepspeed/ (one shard per process).
                optim = {} if self.zero is not None else {
                    "opt_actor": models.opt_actor.state_dict(), "opt_critic": models.opt_critic.state_dict()
                }
                optim |= {
                    "sched_actor": models.sched_actor.state_dict(), "sched_critic": models.sched_critic.state_dict()
                }
                torch.save(optim, tmp / "optim.pt")
                torch.save(
                    {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                    tmp / "rng.pt",
                )
                metrics = self.out_dir / "metrics.jsonl"
                if metrics.is_file():  # the history so far: a checkpoint copied to a new machine carries it
                    shutil.copy(metrics, tmp / "metrics.jsonl")
                (tmp / "trainer_state.json").write_text(
                    json.dumps({"step": step, "run_key": self.run_key, "base_policy": self.base_policy})
                )
                pointer_tmp.write_text(name)
            faults.point("checkpoint-files")
            # Renames only from here on: nothing more to write, so a full disk cannot stop them halfway.
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            faults.point("checkpoint-pointer")
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            self._prune()
            log.info("checkpoint %s written", path)
            if self.on_checkpoint:
                self.on_checkpoint(path)
        acc.wait_for_everyone()
        return path

    def save_final(self, step: int, policy: torch.nn.Module) -> Path:
        """The trained policy in model.dtype, in ``final/``, with the state that marks this run finished."""
        acc, final = self.accelerator, self.final_dir
        state = acc.get_state_dict(policy) if self.zero is not None else None  # a collective under ZeRO-3
        if acc.is_main_process:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with self._writing("the final policy", tmp):
                self._save_policy(policy, tmp, state, final=True)
                self.tokenizer.save_pretrained(tmp)
                (tmp / "trainer_state.json").write_text(
                    json.dumps({"step": step, "run_key": self.run_key, "problems_hash": self.problems_hash})
                )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final

    @contextlib.contextmanager
    def _writing(self, what: str, folder: Path, *leftovers: Path) -> Iterator[None]:
        """Write ``what`` into ``folder``; if that fails, remove it (and ``leftovers``) so no half-written
        folder is left, and report a full disk as :class:`DiskFullError`."""
        try:
            yield
        except BaseException as exc:
            free = free_bytes(self.ckpt_dir)  # before the partial folder is removed and frees its space
            written = tree_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            for path in leftovers:
                path.unlink(missing_ok=True)
            if isinstance(exc, Exception) and out_of_space(exc, free):
                raise DiskFullError(self._disk_full_message(what, folder, free, written)) from exc
            raise

    def _disk_full_message(self, what: str, folder: Path, free: int | None, written: int) -> str:
        latest = self.latest()
        need = tree_bytes(latest) if latest else None
        text = (f"no space left on the disk of {self.ckpt_dir} to write {what} ({folder}): "
                f"{human_bytes(written)} written when it failed, {human_bytes(free)} free")
        if latest is None:
            return (f"{text}. The partial folder was removed (no checkpoint of this run exists yet). Free space "
                    f"on that disk or point CONCISE_RL_HOME at a larger one, and run the same command again")
        return (f"{text}; the last checkpoint takes {human_bytes(need)}. The partial folder was removed; "
                f"{latest.name} is intact and `latest` still points at it. Free at least {human_bytes(need)} on "
                f"that disk (or point CONCISE_RL_HOME at a larger one) and run the same command again: it resumes "
                f"from {latest.name}")

    def _save_policy(self, model: torch.nn.Module, out: Path, state: dict[str, torch.Tensor] | None, *,
                     final: bool = False) -> None:
        """The policy ``model`` in Hugging Face format; ``state``: its full weights where they are sharded (ZeRO-3).

        Checkpoints keep the float32 master weights, so a resumed run continues exactly; the
        ``final`` policy, which is registered and starts the next phase, is saved in model.dtype,
        as the base model was.
        """
        policy = self.accelerator.unwrap_model(model)
        dtype = self.precision.compute
        if final and self.precision.sampling_copy:
            state = cast_state_dict(policy.state_dict(), dtype)
            policy.save_pretrained(out, state_dict=state, safe_serialization=True)
            # save_pretrained records the in-memory model's dtype (float32); the files hold model.dtype.
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(
                json.dumps(config | {"dtype": str(dtype).removeprefix("torch.")}, indent=2, sort_keys=True)
            )
        elif state is None:
            policy.save_pretrained(out, safe_serialization=True)
        else:
            policy.save_pretrained(out, state_dict=state, safe_serialization=True)

    def _prune(self) -> None:
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------------- reading
    def load(self, path: Path, models: Models) -> int:
        """Resume ``models`` and the random state from ``path`` (every process reads it); its step."""
        if self.zero is not None:
            self._load_deepspeed(path, models)
        else:
            self._load_weights_and_optimizers(path, models)
        optim = torch.load(path / "optim.pt", weights_only=False)
        models.sched_actor.load_state_dict(optim["sched_actor"])
        models.sched_critic.load_state_dict(optim["sched_critic"])
        rng = torch.load(path / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        step = json.loads((path / "trainer_state.json").read_text())["step"]
        metrics = self.out_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and not metrics.is_file() and (path / "metrics.jsonl").is_file():
            shutil.copy(path / "metrics.jsonl", metrics)  # restored from a store: the history came with it
        if self.accelerator.is_main_process and metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
            metrics.write_text("".join(line + "\n" for line in kept))
        return step

    def _load_deepspeed(self, path: Path, models: Models) -> None:
        for tag, engine in (("actor", models.policy), ("critic", models.critic)):
            loaded, _ = engine.load_checkpoint(str(path / "deepspeed"), tag=tag, load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(
                    f"checkpoint {path} has no DeepSpeed state for the {tag} (was it written without DeepSpeed?); "
                    f"delete {self.ckpt_dir} to start this phase afresh"
                )

    def _load_weights_and_optimizers(self, path: Path, models: Models) -> None:
        acc = self.accelerator
        from safetensors.torch import load_file

        policy = acc.unwrap_model(models.policy)
        result = policy.load_state_dict(load_file(str(path / "policy" / "model.safetensors")), strict=False)
        # save_pretrained leaves out weights tied to the embeddings; nothing else may be missing.
        tied = {"lm_head.weight"} if policy.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(
                f"checkpoint {path} does not match the policy (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}); delete {self.ckpt_dir} to start this phase afresh"
            )
        acc.unwrap_model(models.critic).load(path / "critic.safetensors")
        optim = torch.load(path / "optim.pt", weights_only=False)
        models.opt_actor.load_state_dict(optim["opt_actor"])
        models.opt_critic.load_state_dict(optim["opt_critic"])


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` in ``dtype``, each tensor once: a weight tied to another (the output head to the
    embeddings) is left out, as save_pretrained leaves it out of the files, and is tied again on load."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent); None if unknown."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def human_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def out_of_space(exc: BaseException, free: int | None) -> bool:
    """Whether a failed write failed for lack of disk space.

    ENOSPC (or EDQUOT, a quota) anywhere in the exception chain says so; torch.save and
    safetensors report only a short write, so a disk left with almost nothing free counts too.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "StorageFull" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free is not None and free < NEARLY_FULL_BYTES
