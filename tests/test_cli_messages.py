"""What a mistyped command line gets (issue 22, points 2-3), through the real CLI (``main()``).

Each case must end in one line on stderr, exit 2, no traceback, and, where a valid name is
near, offer it: a subcommand, an option, a choice, a ``--set`` key (blamed on the ``--set``
that wrote it, not on the config file), a benchmark, and a registry reference (a model, a
version or an alias), which also lists what the registry holds before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from concise_rl import paths
from concise_rl.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and no traceback. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # argparse prints its usage line first
    assert last.startswith("concise-rl"), err
    return last


@pytest.mark.parametrize(("argv", "expected"), [
    (["evalute"], "invalid choice: 'evalute' (did you mean 'evaluate'?)"),
    (["evaluate", "--modle", "x"], "unrecognized arguments: --modle x (did you mean --model for --modle?)"),
    (["compare", "--tempratures", "0", "a", "b"], "did you mean --temperatures for --tempratures?"),
    (["deploy", "--pool-type", "kubernets"], "invalid choice: 'kubernets' (did you mean 'kubernetes'?)"),
    (["evaluate", "--config", DEMO, "--benchmarks", "math50"], "unknown benchmark 'math50' (did you mean 'math500'?)"),
    (["evaluate", "--config", DEMO, "--set", "evaluation.temperature=0"],
     "concise-rl evaluate: --set evaluation.temperature=0: unknown key 'evaluation.temperature' "
     "(did you mean 'evaluation.temperatures'?)"),
    (["run", "--config", DEMO, "--set", "phase2.ppo.actor_l=1"],
     "--set phase2.ppo.actor_l=1: phase2.ppo: unknown key 'phase2.ppo.actor_l' (did you mean 'phase2.ppo.actor_lr'?)"),
    (["run", "--config", DEMO, "--set", "ppo.lam=abc"], "--set ppo.lam=abc: 'ppo.lam': Input should be a valid number"),
])
def test_a_typo_is_refused_in_one_line_with_the_nearest_name(argv, expected, capsys, mlflow_home):
    assert expected in _refused(argv, capsys)


def test_a_key_from_the_config_file_is_blamed_on_the_file(tmp_path, capsys, mlflow_home):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  lamda: 1.0\n")
    line = _refused(["run", "--config", str(bad), "--set", "ppo.lam=0.9"], capsys)
    assert f"config {bad}: unknown key 'ppo.lamda' (did you mean 'ppo.lam'?)" in line


@pytest.fixture
def registry(mlflow_home) -> str:
    """The demo's registered model with three versions and the pipeline's aliases, in the home's sqlite store."""
    paths.home().mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{paths.home() / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("concise-rl-demo")
    source = mlflow_home / "model"
    source.mkdir()
    for _ in range(3):
        client.create_model_version("concise-rl-demo", source=str(source))
    for alias, version in (("base", 1), ("phase1", 2), ("candidate", 3), ("champion", 3)):
        client.set_registered_model_alias("concise-rl-demo", alias, str(version))
    return uri


HELD = "its versions: 1-3; its aliases: base (v1), phase1 (v2), candidate (v3), champion (v3)"


@pytest.mark.parametrize(("command", "uri", "expected"), [
    (["evaluate", "--model"], "models:/concise-rl-demo@champoin",
     f"--model models:/concise-rl-demo@champoin: concise-rl-demo has no alias 'champoin' (did you mean 'champion'?); "
     f"{HELD}; `concise-rl models` lists"),
    (["evaluate", "--model"], "models:/concise-rl-demo/7", f"concise-rl-demo has no version 7; {HELD}"),
    (["compare", "models:/concise-rl-demo@phase1"], "models:/concise-rl-dmeo@champion",
     "B models:/concise-rl-dmeo@champion: no registered model 'concise-rl-dmeo' (did you mean 'concise-rl-demo'?), "
     "so no alias 'champion'; registered models: concise-rl-demo"),
    (["curate", "--model"], "models:/concise-rl-demo@phase3", "has no alias 'phase3' (did you mean 'phase1'?)"),
])
def test_a_registry_reference_that_names_nothing_lists_what_exists(command, uri, expected, registry, capsys):
    line = _refused([*command, uri, "--config", DEMO], capsys)
    assert expected in line
    # Refused before any work: no evaluation, curation or report was started.
    assert not (paths.home() / "evaluations").exists() and not (paths.home() / "curation").exists()
