"""The temporary Prefect server of ``concise-rl run``, in its own session, so a stop signal stops the run only.

Without ``$PREFECT_API_URL`` Prefect starts an ephemeral API server as a child of the
command, in the command's process group. A Ctrl-C in a terminal (SIGINT to the whole
foreground group) or a SIGTERM to the group (``kill -- -PGID``, systemd's default
``KillMode``) then stops that server at the same moment as the run. The run stops
cleanly (a PPO phase first checkpoints its last step), but Prefect then retries the flow
run's final state against the dead server for about half a minute before the command
exits, past a 30 s grace period (bench/killsoak.py with ``--sigterm`` found it).

So ``concise-rl run`` starts the same server itself, as Prefect's ephemeral mode does
(``prefect.server.api.server:create_app`` under uvicorn, the UI off), but in a session of
its own, and points Prefect at it for the command. The server asks Linux to SIGTERM it
when the command dies (``PR_SET_PDEATHSIG``), so not even a SIGKILL of the command leaves
it running, and it is stopped when the command exits. Its log is
``$PREFECT_HOME/temporary-server.log``.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_SETTINGS = None  # the settings context that points Prefect at the temporary server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def start_temporary_server() -> Starting | None:
    """Start the temporary server and return at once: the caller can import the pipeline (several seconds)
    while the server boots (as long again), then :meth:`Starting.wait` for it. None (and nothing started)
    when ``$PREFECT_API_URL`` names a server already.

    The server stops when the interpreter exits, after Prefect's own exit hooks have flushed the run's
    last states and events to it (they run at threading's shutdown, before ``atexit``'s): stopped any
    earlier, Prefect waits on a dead server at exit, without end."""
    if os.environ.get("PREFECT_API_URL", "").strip():
        return None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    home.mkdir(parents=True, exist_ok=True)
    server_log = home / "temporary-server.log"
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    with open(server_log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(port), str(os.getpid())], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atexit.register(_stop, proc)
    return Starting(proc, f"http://127.0.0.1:{port}/api", server_log)


class Starting:
    """A temporary server on its way up (:func:`start_temporary_server`)."""

    def __init__(self, proc: subprocess.Popen, url: str, server_log: Path):
        self.proc, self.url, self.server_log = proc, url, server_log

    def wait(self) -> str:
        """Wait until the server answers, then point Prefect at it for the rest of the command; its API URL."""
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        proc, url, server_log = self.proc, self.url, self.server_log
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited ({proc.returncode}) before it answered; "
                                   f"its log: {server_log}")
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:g} s "
                                   f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its log: {server_log}")
            time.sleep(0.2)
        log.info("temporary Prefect server on %s (pid %d)", url, proc.pid)
        # Prefect read its settings when it was imported; these hold until the command exits (the reference
        # keeps the context open: collected, it would restore the old settings).
        global _SETTINGS
        # No UI URL: the server serves none (as in Prefect's ephemeral mode), so Prefect prints no dead "View at"
        # link.
        _SETTINGS = temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""})
        _SETTINGS.__enter__()
        os.environ["PREFECT_API_URL"] = url  # and child processes (accelerate launch jobs) find it too
        return url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(port: int, parent: int) -> None:
    """The server process: SIGTERM when the command that started it dies, then Prefect's app under uvicorn."""
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the command died before the request took effect
            sys.exit(0)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
