"""A real `prefect server start` for tests: start it, wait until healthy, stop its process group.

Each `concise-rl run` without $PREFECT_API_URL starts Prefect's ephemeral server, about 15 s
on 2 cores. The end-to-end tests that run the pipeline many times point it at one shared
server instead (the `prefect_api` fixture in conftest.py); tests/test_bad_input.py and
tests/test_ablate.py keep the ephemeral path that `make demo` takes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after 20 s (as the flow stops a training job)."""
    from concise_rl.tasks.launch import stop as stop_group

    stop_group(proc, 20.0)


def spawn(processes: list[subprocess.Popen], args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``args`` in its own process group, output to ``log``; appended to ``processes`` for teardown."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(proc)
    return proc


def wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    wait_http(f"{api}/health", server, log, "prefect server", timeout)


def wait_http(url: str, server: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Until ``url`` answers 200; fails with the end of ``log`` if ``server`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start_server(processes: list[subprocess.Popen], folder: Path, env: dict[str, str] | None = None) -> str:
    """A Prefect server on a free loopback port with its state in ``folder``; its API URL once healthy."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           **(env or {})}
    server = spawn(processes, [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env, folder / "server.log")
    wait_healthy(api, server, folder / "server.log")
    return api
