"""`concise-rl models` and the figures `promote` records, on the local sqlite registry.

Three versions are registered through the real stages (prepare_base, register for
phase 1 and phase 2, all copies of the tiny model), evaluated on a few held-out
problems at two temperatures and promoted under a gate every candidate passes; the
listing must show what the registry holds, tag for tag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from concise_rl import cli
from concise_rl.config import load_config

SETTINGS = ["evaluation.heldout.num_problems=4", "evaluation.max_new_tokens=8", "evaluation.temperatures=[0,0.6]",
            "evaluation.bootstrap_samples=50", "gate.bootstrap_samples=50", "gate.min_length_reduction_pct=-100",
            "gate.max_accuracy_drop=1.0"]


def trained_copy(tiny_model_dir: Path, dest: Path, run_key: str) -> str:
    """A final-policy folder as the trainer leaves it: the weights and trainer_state.json."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "trainer_state.json").write_text(json.dumps({"step": 2, "run_key": run_key, "problems_hash": "ph"}))
    return str(dest)


def models_cli(capsys, sets: list[str], *extra: str) -> tuple[int, str, str]:
    argv = ["models", *[x for s in sets for x in ("--set", s)], *extra]
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_lists_versions_aliases_lineage_and_promoted_figures(tmp_path, tiny_model_dir, mlflow_home,
                                                                    capsys, monkeypatch):
    from concise_rl.tasks import stages

    sets = [f"model.name_or_path={tiny_model_dir}", *SETTINGS]
    cfg = load_config(None, sets)
    base = stages.prepare_base(cfg)
    phase1 = stages.register(cfg, "phase1", trained_copy(tiny_model_dir, tmp_path / "p1", "rk1"), base)
    phase2 = stages.register(cfg, "phase2", trained_copy(tiny_model_dir, tmp_path / "p2", "rk2"), phase1)
    results = stages.evaluate(cfg, {"phase1": phase1, "phase2": phase2})
    summary = stages.promote(cfg, results)
    assert summary["promoted"] is True

    code, out, _ = models_cli(capsys, sets, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    assert [r["phase"] for r in rows] == ["base", "1", "2"]
    assert [r["parent_version"] for r in rows] == ["", "1", "2"]
    assert [r["aliases"] for r in rows] == [["base"], ["phase1"], ["candidate", "champion"]]
    assert [r["gate"] for r in rows] == ["", "", "passed"]
    assert rows[0]["eval"] == rows[1]["eval"] == {}
    assert all(r["created"].endswith("Z") and r["config_hash"] == cfg.config_hash() for r in rows)
    assert all(r["checkpoint_uri"].startswith((mlflow_home / "store").as_uri()) for r in rows)

    # The promoted version's figures: accuracy and length as evaluated, the cut and the paired
    # accuracy change with its CI as the gate computed them, for every set and temperature.
    figures = rows[2]["eval"]
    assert set(figures) == {"heldout"} and set(figures["heldout"]) == {"0.0", "0.6"}
    criteria = {c["name"].split(" accuracy change,")[0]: c for c in summary["gate"]["criteria"] if "ci" in c}
    for t, f in figures["heldout"].items():
        evaluated = summary["models"]["phase2"]["eval"]["heldout"][t]
        assert f["accuracy_pct"] == pytest.approx(100 * evaluated["accuracy"], abs=0.01)
        assert f["mean_length"] == pytest.approx(evaluated["mean_length"], abs=0.05)
        assert f["length_reduction_pct"] == pytest.approx(summary["length_reduction_pct"]["heldout"][t], abs=0.005)
        gate = criteria[f"heldout@T={t}"]
        assert (f["accuracy_change_pts"], f["accuracy_change_ci_low_pts"], f["accuracy_change_ci_high_pts"]) == \
            pytest.approx(tuple(100 * x for x in (gate["difference"], *gate["ci"])), abs=0.01)

    # The table: one row per version, the figures of the promoted one on it, each on one line
    # although the output is not a terminal (rich would fold it to 80 columns there).
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = models_cli(capsys, sets)
    assert code == 0
    assert "candidate, champion" in out and "passed" in out
    for t in ("0.0", "0.6"):
        acc = figures["heldout"][t]["accuracy_pct"]
        assert f"heldout T={t}: acc {acc:.1f}%" in out
    assert "cut " in out and "len " in out
    assert "len: mean response length (tokens)" in out, "the caption says what the figures are"
    assert "serve the champion (v3): mlflow models serve -m models:/concise-rl-demo@champion --env-manager local" in out

    # A model that is not registered: bad input, exit 2, the store named.
    code, _, err = models_cli(capsys, [*sets, "registry.model_name=nothing-here"])
    assert code == 2 and "no registered model 'nothing-here'" in err and "mlflow.db" in err


def test_an_mlflow_server_that_does_not_answer_fails_at_once_in_one_line(mlflow_home, capsys):
    """MLflow's client alone would retry a refused connection for about two minutes, then print a traceback."""
    import time

    from test_store import free_port

    from concise_rl.config import PipelineConfig
    from concise_rl.errors import TrackingServerError
    from concise_rl.tasks import tracking

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingServerError, match="no MLflow server answers at registry.tracking_uri"):
        tracking.setup(PipelineConfig(registry={"tracking_uri": uri}))
    code, _, err = models_cli(capsys, [f"registry.tracking_uri={uri}"])
    assert code == 1 and err.strip().startswith(f"concise-rl models: tracking server: no MLflow server answers at "
                                                f"registry.tracking_uri {uri}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert time.monotonic() - start < 10
    assert not (mlflow_home / "mlflow.db").exists()


def test_models_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(["models", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: concise-rl models")
    assert all(option in out for option in ("--config", "--set", "--json", "registry.tracking_uri"))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "models     list the registered versions" in capsys.readouterr().out


def test_promote_writes_each_versions_model_card_and_logs_the_gate_figures(tmp_path, tiny_model_dir, mlflow_home):
    """The card (README.md in the MLflow Model, in its model/ folder, and the version's description)
    gets the evaluation table in percent once evaluated, the candidate's the gate verdict too; the
    promoting run has the gate's figures as metrics."""
    from mlflow import MlflowClient

    from concise_rl.tasks import stages, tracking

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", *SETTINGS])
    base = stages.prepare_base(cfg)
    client = tracking.setup(cfg)
    name = cfg.registry.model_name
    registered = client.get_model_version(name, base["version"]).description
    assert "## Lineage" in registered and "Not evaluated yet" in registered
    phase1 = stages.register(cfg, "phase1", trained_copy(tiny_model_dir, tmp_path / "p1", "rk1"), base)
    phase2 = stages.register(cfg, "phase2", trained_copy(tiny_model_dir, tmp_path / "p2", "rk2"), phase1)
    card = client.get_model_version(name, phase2["version"]).description
    assert "`actor_lr`" in card and "| curated problems (sha256) | `ph` |" in card

    results = stages.evaluate(cfg, {"phase1": phase1, "phase2": phase2})
    summary = stages.promote(cfg, results)
    for label, info in (("phase1", phase1), ("phase2", phase2)):
        version = client.get_model_version(name, info["version"])
        card = version.description
        assert card.startswith("---\nlibrary_name: transformers") and f"v{info['version']}" in card
        for t in ("0.0", "0.6"):
            m = results[label]["eval"]["heldout"][t]
            low, high = m["accuracy_ci"]
            assert f"| heldout | {t} | 4 | {100 * m['accuracy']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%] |" in card
        files = {}
        for folder in ("model", "model/model"):
            local = client.download_artifacts(version.run_id, f"{folder}/README.md", str(tmp_path / label / folder))
            files[folder] = Path(local).read_text()
        assert files["model"] == files["model/model"] == card
        assert ("## Gate" in card) == (label == "phase2")
    cut = summary["length_reduction_pct"]["heldout"]["0.6"]
    assert "| heldout | 0.6 | 4 |" in card and f"{cut:.1f}%" in card and "pts" in card

    [run] = MlflowClient().search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                                       "tags.stage = 'promote'")
    metrics = run.data.metrics
    assert metrics["gate_passed"] == 1.0
    assert metrics["gate.heldout.T0.6.accuracy_pct"] == pytest.approx(
        100 * results["phase2"]["eval"]["heldout"]["0.6"]["accuracy"], abs=0.01)
    assert metrics["gate.heldout.T0.6.length_reduction_pct"] == pytest.approx(cut, abs=0.01)
    gate = {c["name"].split(" accuracy change,")[0]: c for c in summary["gate"]["criteria"] if "ci" in c}
    assert metrics["gate.heldout.T0.0.accuracy_change_ci_low_pts"] == pytest.approx(
        100 * gate["heldout@T=0.0"]["ci"][0], abs=0.01)


def test_versions_promoted_with_fraction_tags_are_listed_in_percent(tiny_model_dir, mlflow_home):
    """Versions promoted before the tags were in percent (accuracy 0.9220) list as the new ones do."""
    from concise_rl.tasks import stages, tracking

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}"])
    base = stages.prepare_base(cfg)
    client = tracking.setup(cfg)
    for key, value in (("accuracy", "0.9220"), ("accuracy_diff", "-0.0040"), ("accuracy_diff_ci_low", "-0.0160"),
                       ("accuracy_diff_ci_high", "0.0080"), ("length_reduction_pct", "50.20")):
        client.set_model_version_tag(cfg.registry.model_name, base["version"], f"eval.heldout.T0.0.{key}", value)
    [row] = tracking.describe_versions(cfg)
    assert row["eval"]["heldout"]["0.0"] == pytest.approx({
        "accuracy_pct": 92.2, "accuracy_change_pts": -0.4, "accuracy_change_ci_low_pts": -1.6,
        "accuracy_change_ci_high_pts": 0.8, "length_reduction_pct": 50.2})


def test_a_card_longer_than_the_registry_column_is_cut_at_a_line_with_a_pointer() -> None:
    from concise_rl.tasks.tracking import DESCRIPTION_LIMIT, description

    card = "\n".join(f"| row {i} | {'x' * 60} |" for i in range(200))
    cut = description(card)
    assert len(cut) <= DESCRIPTION_LIMIT and cut.endswith("the whole card is README.md in this version's artifacts)")
    assert card.startswith(cut.split("\n\n(cut")[0]) and cut.split("\n\n(cut")[0].endswith("|")
    assert description("# short") == "# short"
