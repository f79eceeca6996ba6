"""Prefect deployments: apply infra/prefect.yaml (``concise-rl deploy``) and trigger runs (``concise-rl retrain``).

Both talk to the Prefect server in ``$PREFECT_API_URL`` (Prefect's ephemeral
server cannot hold schedules or serve workers, so they refuse to run without one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from concise_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
K8S_TEMPLATE = ROOT / "infra" / "k8s-gpu-job-template.json"
DEFAULT_FLOW = "concise-rl-pipeline"


class DeployError(RuntimeError):
    """The Prefect server refused or failed a deployment step."""


def require_api_url() -> str:
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: point it at your Prefect server, e.g. "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api` after `prefect server start` "
                          "(the ephemeral server cannot hold schedules or serve workers)")
    return url


def _base_job_template(pool_type: str) -> dict:
    if pool_type == "kubernetes":
        return json.loads(K8S_TEMPLATE.read_text())
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    raise ConfigError(f"--pool-type {pool_type!r}: expected process or kubernetes")


def ensure_work_pool(client, name: str, pool_type: str) -> bool:
    """Create the work pool when it does not exist; True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type,
                                               base_job_template=_base_job_template(pool_type)))
        return True
    if pool.type != pool_type:
        print(f"work pool {name!r} exists with type {pool.type!r} (not {pool_type!r}); left as it is")
    return False


def load_prefect_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config-file {path}: {exc}") from None
    if not isinstance(data, dict) or not data.get("deployments"):
        raise ConfigError(f"--config-file {path}: no `deployments:` list (expected a prefect.yaml project file)")
    return data


def deploy(prefect_file: Path | None = None, pool: str | None = None, pool_type: str = "process") -> list[dict]:
    """Create the work pools that are missing, then apply every deployment of ``prefect_file``.

    ``pool`` replaces the work pool of every deployment. Returns what the server holds
    afterwards: one ``{name, id, work_pool, schedules}`` per deployment.
    """
    from prefect.client.orchestration import get_client

    require_api_url()
    path = Path(prefect_file or DEFAULT_PREFECT_FILE).resolve()
    data = load_prefect_file(path)
    for dep in data["deployments"]:
        if pool:
            dep["work_pool"] = {**(dep.get("work_pool") or {}), "name": pool}
        if not (dep.get("work_pool") or {}).get("name"):
            raise ConfigError(f"{path}: deployment {dep.get('name')!r} names no work pool; pass --pool NAME")
    with get_client(sync_client=True) as client:
        for name in sorted({dep["work_pool"]["name"] for dep in data["deployments"]}):
            created = ensure_work_pool(client, name, pool_type)
            print(f"work pool {name!r} ({pool_type}): {'created' if created else 'exists'}")
    env = {**os.environ, "CONCISE_RL_ROOT": os.environ.get("CONCISE_RL_ROOT") or str(ROOT)}
    # `prefect deploy` reads entrypoints relative to its working directory: the repository root.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="prefect-", dir=path.parent, delete=False) as f:
        yaml.safe_dump(data, f, sort_keys=False)
    try:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", f.name], cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise DeployError(f"prefect deploy failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    applied = []
    with get_client(sync_client=True) as client:
        on_server = client.read_deployments()
        for dep in data["deployments"]:
            for d in on_server:
                if d.name == dep["name"] and d.entrypoint == dep["entrypoint"]:
                    applied.append({"name": f"{client.read_flow(d.flow_id).name}/{d.name}", "id": str(d.id),
                                    "work_pool": d.work_pool_name,
                                    "schedules": [_schedule_text(s.schedule) for s in d.schedules if s.active]})
    return applied


def _schedule_text(schedule) -> str:
    cron = getattr(schedule, "cron", None)
    if cron:
        return f"cron {cron} ({schedule.timezone or 'UTC'})"
    return str(schedule)


def parse_params(items: list[str], schema: dict | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs: the value is YAML, except for parameters that can only be a string."""
    props = (schema or {}).get("properties", {})
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        if props and key not in props:
            raise ConfigError(f"--param {key}: the flow has no such parameter (it has {', '.join(sorted(props))})")
        if _string_only(props.get(key, {})):
            out[key] = text
            continue
        try:
            out[key] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {key}: not valid YAML: {exc}") from None
    return out


def _string_only(prop: dict) -> bool:
    types = {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])}
    types.discard(None)
    return bool(types) and types <= {"string", "null"}


def trigger(deployment: str, params: list[str], wait: bool, timeout_s: float | None, poll_s: float = 5.0) -> int:
    """Start a run of ``deployment`` (``FLOW/NAME``, or ``NAME`` of the pipeline flow) with ``params``.

    With ``wait``, poll until the run is terminal and return 0 when it completed, 1
    otherwise (failed, crashed, cancelled, or still running after ``timeout_s``).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    api = require_api_url()
    name = deployment if "/" in deployment else f"{DEFAULT_FLOW}/{deployment}"
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise LookupError(f"--deployment {deployment}: no deployment {name!r} on {api}; "
                              "apply them with `concise-rl deploy`") from None
        parameters = parse_params(params, dep.parameter_openapi_schema)
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        print(f"flow run {run.name} ({run.id}) of {name} created with {json.dumps(parameters)}", flush=True)
        if not wait:
            return 0
        start, last = time.monotonic(), None
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.name != last:
                last = state.name
                print(f"[{time.monotonic() - start:6.0f}s] {run.name}: {state.name}", flush=True)
            if state is not None and state.is_final():
                break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                print(f"flow run {run.name} ({run.id}) is still {last} after {timeout_s:.0f}s; left running",
                      file=sys.stderr)
                return 1
            time.sleep(poll_s)
    print(f"flow run {run.name} ({run.id}): {state.name}" + (f": {state.message}" if state.message else ""))
    return 0 if state.is_completed() else 1
