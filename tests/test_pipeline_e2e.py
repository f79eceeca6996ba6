"""The whole flow, end to end, on a shrunk embedded config: the real CLI, Prefect's
ephemeral server, the sqlite MLflow registry, real PPO on a tiny Qwen2 model.

Run against one registry: a permissive gate promotes the candidate; a strict gate
(with a changed PPO seed, so both phases retrain) refuses it, exits 3, and leaves
``champion`` where it was; the same command again reuses every stage; a changed
phase-2 setting re-trains phase 2 alone; a changed evaluation setting re-evaluates
and trains nothing; a phase 2 that a training guard stops exits 5 and registers
nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.killsoak import SHRUNK
from concise_rl.problems import load_problems, problems_hash
from concise_rl.store import MANIFEST, ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
MODEL = "concise-rl-demo"

# The demo config on a tiny model (shared with bench/killsoak.py, which kills the same run).
TINY = SHRUNK


def run_cli(home: Path, *extra: str, api: str | None = None) -> subprocess.CompletedProcess:
    """`concise-rl run` on the shrunk demo config; on the Prefect server at ``api``, else its ephemeral one."""
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml")]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    # Prefect's state goes under this home (the CLI's default), whatever an earlier test left in the environment.
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "2"}
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def versions(home: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    return {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}


def train_runs(home: Path) -> int:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("concise-rl-demo")
    runs = client.search_runs([experiment.experiment_id], "tags.stage LIKE 'train-%'")
    return len(runs)


def alias(home: Path, name: str) -> str:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    return str(client.get_model_version_by_alias(MODEL, name).version)


@pytest.mark.slow
def test_pipeline_promotes_on_pass_and_refuses_on_fail(tmp_path: Path, prefect_api: str) -> None:
    home = tmp_path / "home"

    # ---- run 1: a gate every candidate passes (on Prefect's ephemeral server, as `make demo` runs;
    # runs 2-5 on one shared server, to spare its start-up)
    first = run_cli(home, "gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0")
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert summary["promoted"] is True
    assert summary["registered_model"] == MODEL
    assert summary["champion_version"] == "3"
    assert set(summary["models"]) == {"base", "phase1", "phase2"}
    assert [summary["models"][k]["version"] for k in ("base", "phase1", "phase2")] == ["1", "2", "3"]
    for model in summary["models"].values():
        temps = model["eval"]["heldout"]
        assert set(temps) == {"0.0", "0.6"}
        for m in temps.values():
            assert 0.0 <= m["accuracy"] <= 1.0
            lo, hi = m["accuracy_ci"]
            assert 0.0 <= lo <= m["accuracy"] <= hi <= 1.0
            assert 0 < m["mean_length"] <= 32
            assert m["n"] == 8
    assert set(summary["length_reduction_pct"]["heldout"]) == {"0.0", "0.6"}
    assert summary["gate"]["passed"] is True
    assert len(summary["gate"]["criteria"]) == 4
    for c in summary["gate"]["criteria"]:
        if "accuracy change" in c["name"]:  # the paired, statistical criterion
            assert set(c) == {"name", "set", "T", "kind", "value", "threshold", "passed", "difference", "ci", "n"}
            assert c["ci"][0] == c["value"] and c["n"] == 8
        else:
            assert set(c) == {"name", "set", "T", "kind", "value", "threshold", "passed"}
    assert (home / "evaluations" / "reports").is_dir()
    # The Prefect UI's artifacts, read from the (stopped) local server's database.
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        artifacts = {key: (kind, data) for key, kind, data in db.execute("select key, type, data from artifact")}
    assert {"pipeline-summary", "evaluation-report", "curation-pass-rates", "phase1-metrics",
            "phase2-metrics", "gate-verdict"} <= set(artifacts)
    kind, data = artifacts["gate-verdict"]
    rows = json.loads(json.loads(data)) if isinstance(json.loads(data), str) else json.loads(data)
    assert kind == "table" and rows[-1]["criterion"] == "VERDICT" and rows[-1]["pass"] == "PASSED"
    assert [(r["set"], r["T"]) for r in rows[:-1]] == [(c["set"], c["T"]) for c in summary["gate"]["criteria"]]
    assert all(r["value"].endswith(("pts", "%")) for r in rows[:-1]), rows  # points and percent, not fractions
    # The plots are in the pages themselves: markdown images carrying the PNG (the UI shows data:image/ sources).
    for key, plots in (("pipeline-summary", ("training_curves", "pass_rates")),
                       ("evaluation-report", ("accuracy_vs_length", "length_histograms"))):
        kind, data = artifacts[key]
        for plot in plots:
            assert f"![{plot}](data:image/png;base64,iVBORw0KGgo" in data, (key, plot)
    assert "## heldout: 8 problems" in artifacts["pipeline-summary"][1]

    v = versions(home)
    assert sorted(v) == ["1", "2", "3"]
    assert [v[k].tags["phase"] for k in ("1", "2", "3")] == ["base", "1", "2"]
    assert [v[k].tags["parent_version"] for k in ("1", "2", "3")] == ["", "1", "2"]
    assert len({v[k].tags["config_hash"] for k in ("1", "2", "3")}) == 1
    assert (alias(home, "base"), alias(home, "phase1"), alias(home, "candidate"), alias(home, "champion")) == (
        "1", "2", "3", "3")
    # Lineage: every version points at a verified copy in the (default, local) artifact store.
    curated = home / "curation" / (home / "curation" / "latest").read_text().strip()
    assert [v[k].tags["problems_hash"] for k in ("1", "2", "3")] == [
        "", problems_hash(load_problems(curated / "phase1.jsonl")), problems_hash(load_problems(curated / "phase2.jsonl"))]
    assert len({v[k].tags["git_commit"] for k in ("1", "2", "3")}) == 1
    for k, phase in (("1", "base"), ("2", "phase1"), ("3", "phase2")):
        uri = v[k].tags["checkpoint_uri"]
        assert uri.startswith((home / "store" / "checkpoints" / MODEL / f"{phase}-").as_uri())
        assert "model.safetensors" in ArtifactStore().verify(uri)["files"]
    stored_evaluations = {p.parent.name for p in (home / "store" / "evaluations").glob(f"*/{MANIFEST}")}
    assert {f"{MODEL}-v{k}-" for k in ("1", "2", "3")} == {name[: len(MODEL) + 4] for name in stored_evaluations}
    assert list((home / "store" / "evaluations" / "reports").glob(f"*/{MANIFEST}"))
    promoted = v["3"].tags
    assert promoted["gate"] == "passed"
    assert float(promoted["eval.heldout.T0.0.accuracy_pct"]) == pytest.approx(
        100 * summary["models"]["phase2"]["eval"]["heldout"]["0.0"]["accuracy"], abs=0.01)
    assert "eval.heldout.T0.6.length_reduction_pct" in promoted

    for phase in ("phase1", "phase2"):
        ckpt = home / "checkpoints" / phase
        assert (ckpt / "final" / "model.safetensors").is_file()
        latest = ckpt / "checkpoints" / (ckpt / "checkpoints" / "latest").read_text().strip()
        for name in ("policy/model.safetensors", "critic.safetensors", "optim.pt", "rng.pt", "trainer_state.json"):
            assert (latest / name).is_file(), f"{phase} checkpoint lacks {name}"
        assert json.loads((latest / "trainer_state.json").read_text())["step"] == 2
        steps = [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]

    # ---- run 2: both phases retrain (new PPO seed) and the gate cannot be met
    strict = ["ppo.seed=1", "gate.min_length_reduction_pct=99", "gate.max_accuracy_drop=1.0"]
    second = run_cli(home, *strict, api=prefect_api)
    assert second.returncode == 3, second.stderr[-4000:]
    assert "not promoted" in second.stderr and "length reduction" in second.stderr
    summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert summary["promoted"] is False
    assert summary["champion_version"] == "3"
    v = versions(home)
    assert sorted(v) == ["1", "2", "3", "4", "5"], "the base is reused, each phase registers once"
    assert v["4"].tags["phase"] == "1" and v["4"].tags["parent_version"] == "1"
    assert v["5"].tags["phase"] == "2" and v["5"].tags["parent_version"] == "4"
    assert v["5"].tags["gate"] == "failed"
    assert "length reduction" in v["5"].tags["gate_failed_criteria"]
    assert alias(home, "champion") == "3"
    assert alias(home, "candidate") == "5"
    failed = [c for c in summary["gate"]["criteria"] if not c["passed"]]
    assert failed and all("length reduction" in c["name"] for c in failed)

    # ---- run 3: the same command again reuses every stage and trains nothing
    train_runs_before = train_runs(home)
    third = run_cli(home, *strict, api=prefect_api)
    assert third.returncode == 3, third.stderr[-4000:]
    assert sorted(versions(home)) == ["1", "2", "3", "4", "5"], "a re-run registers nothing new"
    assert train_runs(home) == train_runs_before, "a re-run opens no training run"
    assert alias(home, "champion") == "3"

    # ---- run 4: one phase-2 setting changes: only phase 2 and what follows it run again
    before = stage_counts(home)
    fourth = run_cli(home, *strict, "phase2.ppo.steps=3", api=prefect_api)
    assert fourth.returncode == 3, fourth.stderr[-4000:]
    after = stage_counts(home)
    assert after["curation"] == before["curation"], "curation does not depend on phase 2"
    assert after["train-phase1"] == before["train-phase1"], "phase 1 does not depend on phase 2"
    assert after["train-phase2"] == before["train-phase2"] + 1
    v = versions(home)
    assert sorted(v) == ["1", "2", "3", "4", "5", "6"]
    assert v["6"].tags["phase"] == "2" and v["6"].tags["parent_version"] == "4" and v["6"].tags["ppo_steps"] == "3"
    assert after["evaluated"] - before["evaluated"] == {"v6"}, "base and phase 1 evaluations are reused"

    # ---- run 5: one evaluation setting changes: nothing trains or registers, every model is evaluated again
    fifth = run_cli(home, *strict, "phase2.ppo.steps=3", "evaluation.max_new_tokens=24", api=prefect_api)
    assert fifth.returncode == 3, fifth.stderr[-4000:]
    final = stage_counts(home)
    assert {k: final[k] for k in ("curation", "train-phase1", "train-phase2")} == {
        k: after[k] for k in ("curation", "train-phase1", "train-phase2")}
    assert sorted(versions(home)) == ["1", "2", "3", "4", "5", "6"]
    assert final["evaluation_folders"] == after["evaluation_folders"] + 3
    summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert all(m["mean_length"] <= 24 for m in summary["models"]["phase2"]["eval"]["heldout"].values())


    # ---- run 6: phase 2 with a token budget nothing fits in; the runaway-length guard stops it
    # at step 2 (phase 1 and the curation are reused), and the gate never sees it. On the ephemeral
    # server again, whose database in the home shows the task's state below.
    stopped = run_cli(home, "ppo.seed=1", "gate.min_length_reduction_pct=99", "gate.max_accuracy_drop=1.0",
                      "phase2.ppo.max_new_tokens=2", "phase2.ppo.guards.truncation_patience=2")
    assert stopped.returncode == 5, stopped.stderr[-4000:]
    line = next(x for x in stopped.stderr.splitlines() if x.startswith("concise-rl run: "))
    ckpt = home / "checkpoints" / "phase2"
    assert line.startswith(f"concise-rl run: PPO in {ckpt} stopped at step 2 by the runaway length guard: "
                           "truncation_rate was 1 (and at every step since step 1)")
    assert f"Kept the last good checkpoint {ckpt / 'checkpoints' / 'step-000001'} (step 1)" in line
    assert line.endswith("phase2 was not registered. Nothing was promoted; 'champion' is unchanged.")
    assert sorted(versions(home)) == ["1", "2", "3", "4", "5", "6"], "no new candidate"
    assert (alias(home, "champion"), alias(home, "candidate")) == ("3", "6")
    assert json.loads((ckpt / "stopped.json").read_text())["checkpoint_step"] == 1
    assert (ckpt / "checkpoints" / "latest").read_text() == "step-000001" and not (ckpt / "final").exists()
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        train_task = db.execute("select state_type, run_count from task_run where name like 'train-%' "
                                "order by created desc limit 1").fetchone()
    assert train_task == ("FAILED", 1), "a guard's stop fails the task, which is not retried"

def stage_counts(home: Path) -> dict:
    """How many times each stage has done work in ``home``: curation folders, training runs, evaluations."""
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("concise-rl-demo")
    runs = client.search_runs([experiment.experiment_id], "tags.stage LIKE 'train-%'")
    folders = [p for p in (home / "evaluations").glob(f"{MODEL}-v*") if (p / "summary.json").is_file()]
    return {
        "curation": len([p for p in (home / "curation").iterdir() if (p / "done.json").is_file()]),
        "train-phase1": sum(r.data.tags["stage"] == "train-phase1" for r in runs),
        "train-phase2": sum(r.data.tags["stage"] == "train-phase2" for r in runs),
        "evaluation_folders": len(folders),
        "evaluated": {p.name[len(MODEL) + 1:].split("-")[0] for p in folders},
    }
