"""The flow's PPO stages as ``accelerate launch`` child jobs (``launch.num_processes`` > 1).

A Prefect flow run is one process; a 7B phase needs several GPUs (the paper's ZeRO-3). With
``launch: {num_processes: N, config_file: infra/accelerate/...}`` the flow's train task starts

    python -m accelerate.commands.launch --num_processes N [--config_file F] [extra_args] \\
        -m concise_rl.tasks.launch --config CONFIG.json --phase P --model URI --problems PATH --result R.json

and waits for it. Every process of the child job runs :func:`concise_rl.tasks.stages.train_phase`
(the main one tracks the MLflow run and writes checkpoints, as under ``concise-rl train``), so
a re-run resumes from the last checkpoint as a one-process phase does. The parent:

- streams the child's output, line by line, into the task's log (Prefect's run logger in a
  flow, this module's logger elsewhere);
- on exit 0, reads the final policy folder from ``R.json`` (written by the main process) and
  publishes the phase's metrics table as the one-process stage does;
- when a training guard stopped the phase (the main process says so in ``R.json``; torchrun
  reports the processes' exit 5 as a failure of its own) raises :class:`TrainingGuardError`
  with the stop record, which the flow does not retry and the CLI turns into exit 5;
- on any other exit raises :class:`LaunchError` with the exit code, the failing process's
  one-line report and the child's last lines;
- on SIGTERM or SIGINT to the parent (Ctrl-C, a cancelled flow run, a Kubernetes eviction), or
  any error while waiting, stops the child's whole process group (SIGTERM, then SIGKILL after
  ``launch.stop_grace_s``); a child whose parent dies anyway gets SIGTERM from the kernel.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from concise_rl import paths
from concise_rl.config import PipelineConfig
from concise_rl.errors import ConfigError, TrainingGuardError

log = logging.getLogger(__name__)

EXIT_TRAINING_STOPPED = 5  # concise_rl.cli's code for a guard stop
TAIL_LINES = 30
ERROR_MARK = "concise-rl launch error: "  # how a process of the child job reports its failure in one line


class LaunchError(RuntimeError):
    """The ``accelerate launch`` child job of a PPO stage failed."""


def command(cfg: PipelineConfig, config_file: Path, phase: str, model_uri: str, problems_path: str,
            result: Path) -> list[str]:
    """The child job's command line."""
    launch = cfg.launch
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.config_file:
        args += ["--config_file", launch.config_file]
    else:
        # DDP, precision as the config says (no autocast from accelerate). On a machine without GPUs
        # --multi_gpu starts the processes with torchrun and each runs on the CPU over gloo (--cpu
        # would go through mpirun).
        args += ["--multi_gpu", "--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no"]
    args += ["--main_process_port", str(_free_port()), *launch.extra_args,
             "-m", "concise_rl.tasks.launch", "--config", str(config_file), "--phase", phase,
             "--model", model_uri, "--problems", problems_path, "--result", str(result)]
    return args


def _free_port() -> int:
    """A free port for the job's rendezvous, so two jobs on one machine do not collide (extra_args may set another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The child starts through this, which asks the kernel for SIGTERM when the parent dies (Linux's
# PR_SET_PDEATHSIG, kept across exec) and then execs `accelerate launch`: a flow-run process killed
# outright does not leave a training job on the GPUs. (Not Popen's preexec_fn, which is unsafe in a
# process with threads, as a Prefect flow run is.) Elsewhere prctl is missing and the exec goes on.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                    "except (OSError, AttributeError):\n    pass\n"
                    "os.execv(sys.argv[1], sys.argv[1:])")


def _task_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return log


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL what is
    left after ``grace_s``; returns once no process of the group is left (not only the leader:
    the launcher's workers, or a server's worker, may outlive it by a moment)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        proc.poll()  # reap the leader if it has exited, or it counts as a member
        if not _group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)


class _Signals:
    """SIGTERM and SIGINT raise in the waiting thread (the main one) for as long as the child runs,
    so the parent stops the child before it exits; elsewhere the handlers are left alone."""

    def __init__(self):
        self.saved: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}") if signum == signal.SIGINT else SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def train_phase_launched(cfg: PipelineConfig, phase: str, model_uri: str, problems_path: str) -> str:
    """:func:`stages.train_phase` as an ``accelerate launch`` child job of ``cfg.launch.num_processes`` processes;
    returns the final policy folder."""
    from concise_rl.training.distributed import check_divides_across_processes

    try:  # refused here, in one line, not by every process of the child job
        check_divides_across_processes(cfg.ppo_for(phase), cfg.launch.num_processes)
    except ValueError as exc:
        raise ConfigError(f"launch.num_processes={cfg.launch.num_processes}: {exc}") from None
    folder = paths.home() / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    config_file, result = folder / f"{phase}-config.json", folder / f"{phase}-result.json"
    config_file.write_text(cfg.model_dump_json())
    result.unlink(missing_ok=True)
    args = command(cfg, config_file, phase, model_uri, problems_path, result)
    logger = _task_logger()
    logger.info("%s: %d processes, `%s`", phase, cfg.launch.num_processes, " ".join(args[1:]))
    # A progress bar redraws many times a second; in a task log one line every 30 s is enough.
    env = {**os.environ, "CONCISE_RL_HOME": str(paths.home()), "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []  # the processes' own one-line reports (main() below), ahead of the launcher's noise
    proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace", start_new_session=True)
    try:
        with _Signals():
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if line.startswith(ERROR_MARK):
                    errors.append(line.removeprefix(ERROR_MARK))
                logger.info("[%s] %s", phase, line)
            code = proc.wait()
    finally:
        stop(proc, cfg.launch.stop_grace_s)  # a no-op once it has exited
        proc.stdout.close()
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    if "stopped" in outcome:  # whatever code the launcher turned the processes' exit 5 into
        raise TrainingGuardError(outcome["stopped"], outcome["stop"])
    if code == 0 and "final" in outcome:
        from concise_rl.tasks import stages

        stages.publish_training_table(phase)
        return outcome["final"]
    first = f" {errors[0]};" if errors else ""
    raise LaunchError(f"{phase}: the `accelerate launch` job ({cfg.launch.num_processes} processes) exited with "
                      f"code {code}:{first} its last lines:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    """One process of the child job: train the phase; the main process writes the final folder to --result."""
    parser = argparse.ArgumentParser(prog="python -m concise_rl.tasks.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the pipeline config as JSON")
    parser.add_argument("--phase", choices=("phase1", "phase2"), required=True)
    parser.add_argument("--model", required=True, help="the start model's URI")
    parser.add_argument("--problems", required=True, help="the phase's problems (JSONL)")
    parser.add_argument("--result", type=Path, required=True, help="where the main process writes the final folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from concise_rl.tasks import stages

    cfg = PipelineConfig.model_validate_json(args.config.read_text())
    acc = stages.accelerator(cfg)
    log.info("%s: process %d of %d", args.phase, acc.process_index, acc.num_processes)
    try:
        final = stages.train_phase(cfg, args.phase, args.model, args.problems, acc)
        if acc.is_main_process:
            args.result.write_text(json.dumps({"final": final}))
        return 0
    except TrainingGuardError as exc:
        if acc.is_main_process:
            args.result.write_text(json.dumps({"stopped": str(exc), "stop": exc.stop}))
        print(f"concise-rl: {exc}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except Exception as exc:
        print(f"{ERROR_MARK}process {acc.process_index}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
