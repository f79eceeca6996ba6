"""Training guards (training/guards.py) in real PPO steps on the tiny model, through `concise-rl train`.

Each guard is tripped by a real cause (an absurd critic learning rate, a token budget
nothing fits in, answers the model never gives); each test checks the one-line
message and exit code 5, that the last checkpoint written before the trip is the one
kept (the weights it held just before the guard looked, loadable), that the tripping
step left nothing on disk, and that nothing was registered.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from test_registry_listing import trained_copy

from concise_rl import cli
from concise_rl.config import GuardConfig, ModelConfig, load_config
from concise_rl.errors import ConfigError, TrainingGuardError
from concise_rl.problems import Problem, save_problems
from concise_rl.synthetic import generate_problems
from concise_rl.tasks import stages, tracking
from concise_rl.training.guards import FINITE_KEYS, STOP_FILE, check
from concise_rl.training.models import load_policy

MODEL = "concise-rl-demo"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# 2 prompts x 2 samples a step, one optimiser step, a checkpoint after every step.
PPO = ["device=cpu", "ppo.steps=3", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4",
       "ppo.micro_batch_size=2", "ppo.max_new_tokens=8", "ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3",
       "ppo.warmup_ratio=0.0", "ppo.checkpoint_every=1"]
# Only the guard under test: the random tiny model never answers, so the other guards would trip too.
ONLY_NAN = ["ppo.guards.max_truncation_rate=null", "ppo.guards.reward_collapse_patience=null"]


def row(step: int, truncation_rate: float = 0.0, accuracy: float = 0.5, **extra: float) -> dict:
    """One metrics.jsonl row, as the trainer logs it (the fields the guards read)."""
    return {"step": step, "truncation_rate": truncation_rate, "accuracy": accuracy, "reward": 0.1,
            "policy_loss": 0.01, "value_loss": 0.2, **extra}


def test_guards_judge_streaks_of_consecutive_steps() -> None:
    cfg = GuardConfig(max_truncation_rate=0.5, truncation_patience=3, reward_collapse_patience=2)
    # Above, above, exactly at the rate (not above: the streak ends), above, above: no trip yet.
    rows = [row(1, 0.6), row(2, 0.9), row(3, 0.5), row(4, 0.6), row(5, 0.7)]
    assert [check(rows[:i], cfg) for i in range(1, 6)] == [None] * 5
    trip = check([*rows, row(6, 1.0)], cfg)
    assert (trip.guard, trip.step, trip.since, trip.metric, trip.value) == ("runaway length", 6, 4, "truncation_rate", 1.0)

    # Every response correct gives every response the same reward too, and is no collapse.
    assert check([row(1, accuracy=1.0), row(2, accuracy=1.0), row(3, accuracy=1.0)], cfg) is None
    assert check([row(1, accuracy=0.0), row(2, accuracy=1 / 64), row(3, accuracy=0.0)], cfg) is None
    trip = check([row(1, accuracy=0.5), row(2, accuracy=0.0), row(3, accuracy=0.0)], cfg)
    assert (trip.guard, trip.step, trip.since) == ("reward collapse", 3, 2)

    # A non-finite value stops at once, before any streak is looked at.
    trip = check([row(1, 0.9), row(2, 0.9, grad_norm_actor=math.inf)], cfg, (*FINITE_KEYS, "grad_norm_actor"))
    assert (trip.guard, trip.step, trip.metric) == ("non-finite", 2, "grad_norm_actor")
    assert check([row(1, value_loss=math.nan)], cfg).metric == "value_loss"

    off = GuardConfig(max_truncation_rate=None, reward_collapse_patience=None)
    assert check([row(i, 1.0, 0.0) for i in range(1, 40)], off) is None


def test_guard_settings_validate_and_a_phase_overrides_one_of_them() -> None:
    cfg = load_config(DEMO, ["ppo.guards.reward_collapse_patience=7", "phase2.ppo.guards.truncation_patience=2"])
    assert cfg.ppo_for("phase2").guards == GuardConfig(truncation_patience=2, reward_collapse_patience=7)
    assert cfg.ppo_for("phase1").guards == GuardConfig(reward_collapse_patience=7)
    with pytest.raises(ConfigError, match=r"'ppo\.guards\.max_truncation_rate': Input should be less than 1"):
        load_config(DEMO, ["ppo.guards.max_truncation_rate=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'ppo\.guards\.patience'"):
        load_config(DEMO, ["ppo.guards.patience=3"])


def train(capsys, tiny_model_dir: Path, problems: Path, *settings: str) -> tuple[int, str]:
    argv = ["train", "--phase", "1", "--model", str(tiny_model_dir), "--problems", str(problems)]
    settings = (f"model.name_or_path={tiny_model_dir}", *PPO, *settings)
    code = cli.main(argv + [a for s in settings for a in ("--set", s)])
    return code, capsys.readouterr().err


def problems_file(tmp_path: Path, problems: list[Problem]) -> Path:
    save_problems(problems, tmp_path / "problems.jsonl")
    return tmp_path / "problems.jsonl"


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    policy = load_file(str(checkpoint / "policy" / "model.safetensors"))
    return policy | {f"critic.{k}": v for k, v in load_file(str(checkpoint / "critic.safetensors")).items()}


def latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text()


@pytest.fixture
def before_guards(monkeypatch, mlflow_home: Path) -> dict[int, dict[str, torch.Tensor]]:
    """{step: the newest checkpoint's weights when that step's metrics were logged}, i.e. just before
    the guards judged the step (a spy on the stage's MLflow logging; the real logging still runs)."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    out, real = mlflow_home / "checkpoints" / "phase1", tracking.StepMetrics.__call__

    def spy(self, step: int, metrics: dict) -> None:
        if (out / "checkpoints" / "latest").is_file():
            seen[step] = weights(latest(out))
        real(self, step, metrics)

    monkeypatch.setattr(tracking.StepMetrics, "__call__", spy)
    return seen


def registry(home: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")


def assert_stopped(home: Path, err: str, before: dict, *, guard: str, step: int, metric: str | set[str]) -> dict:
    """The phase stopped at ``step`` by ``guard``, kept step ``step - 1`` as it was, saved and registered nothing."""
    out = home / "checkpoints" / "phase1"
    kept = out / "checkpoints" / f"step-{step - 1:06d}"
    line = next(x for x in err.splitlines() if x.startswith("concise-rl train: "))
    metrics = {metric} if isinstance(metric, str) else metric
    assert any(line.startswith(f"concise-rl train: PPO in {out} stopped at step {step} by the {guard} guard: {m} was ")
               for m in metrics), line
    assert f"Kept the last good checkpoint {kept} (step {step - 1}); nothing after it was saved." in line
    assert "threshold: " in line and "What to do: " in line
    assert line.endswith("phase1 was not registered. Nothing was promoted; 'champion' is unchanged.")

    stop = json.loads((out / STOP_FILE).read_text())
    assert (stop["guard"], stop["step"], stop["checkpoint_step"]) == (guard, step, step - 1)
    assert stop["metric"] in metrics
    assert latest(out) == kept, "the tripping step must not move the latest pointer"
    assert not (out / "checkpoints" / f"step-{step:06d}").exists() and not (out / "final").exists()
    saved = weights(kept)
    assert saved.keys() == before[step].keys()
    for key, value in saved.items():
        assert torch.equal(value, before[step][key]), f"{key} changed after the trip"
        assert torch.isfinite(value).all(), f"{key} holds NaN or inf"
    policy = load_policy(str(kept / "policy"), ModelConfig()).state_dict()
    for key, value in saved.items():
        if not key.startswith("critic."):
            assert torch.equal(policy[key], value)

    client = registry(home)
    assert client.search_model_versions(f"name = '{MODEL}'") == [], "a stopped phase must not be registered"
    runs = client.search_runs([client.get_experiment_by_name("concise-rl").experiment_id], "tags.stage = 'train-phase1'")
    assert [(r.data.tags["stopped_by_guard"], r.data.tags["stopped_at_step"], r.info.status) for r in runs] == [
        (guard, str(step), "FAILED")]
    return stop


def test_a_nan_loss_stops_the_phase_before_the_poisoned_weights_are_saved(
        tiny_model_dir, tmp_path, mlflow_home, before_guards, capsys):
    # The real cause: a critic learning rate no run would survive. Step 1 updates the critic by
    # ~1e30 per weight; step 2's value estimates overflow and its losses are NaN or inf.
    problems = problems_file(tmp_path, generate_problems(4, seed=5, min_level=2, max_level=3))
    code, err = train(capsys, tiny_model_dir, problems, "ppo.critic_lr=1e30", *ONLY_NAN)
    assert code == cli.EXIT_TRAINING_STOPPED, err[-3000:]
    stop = assert_stopped(mlflow_home, err, before_guards, guard="non-finite", step=2,
                          metric={"policy_loss", "value_loss"})
    assert not math.isfinite(stop["value"])
    assert "threshold: every reward, loss and gradient norm must be finite" in err
    assert "lower ppo.actor_lr / ppo.critic_lr" in err


def test_runaway_length_stops_the_phase_and_only_looser_guards_resume_it(
        tiny_model_dir, tmp_path, mlflow_home, before_guards, capsys):
    # Two new tokens: every response is cut off, so the truncation rate is 1 at every step.
    problems = problems_file(tmp_path, generate_problems(4, seed=5, min_level=2, max_level=3))
    runaway = ["ppo.max_new_tokens=2", "ppo.guards.truncation_patience=2", "ppo.guards.reward_collapse_patience=null"]
    code, err = train(capsys, tiny_model_dir, problems, *runaway)
    assert code == cli.EXIT_TRAINING_STOPPED, err[-3000:]
    stop = assert_stopped(mlflow_home, err, before_guards, guard="runaway length", step=2, metric="truncation_rate")
    assert stop["value"] == 1.0 and stop["since"] == 1
    assert ("truncation_rate was 1 (and at every step since step 1); threshold: truncation_rate above "
            "ppo.guards.max_truncation_rate=0.5 for ppo.guards.truncation_patience=2 steps in a row") in err
    assert "raise ppo.max_new_tokens" in err

    # The same command again stops at once with the recorded reason: no step, no new MLflow run.
    before_guards.clear()
    code, err = train(capsys, tiny_model_dir, problems, *runaway)
    assert code == cli.EXIT_TRAINING_STOPPED
    assert "stopped at step 2 by the runaway length guard" in err and f"Recorded in {stop_file(mlflow_home)}" in err
    assert before_guards == {}
    client = registry(mlflow_home)
    assert len(client.search_runs([client.get_experiment_by_name("concise-rl").experiment_id])) == 1

    # Looser guards change nothing that was trained: the run resumes from the kept step-1
    # checkpoint, finishes, and only then is registered.
    code, err = train(capsys, tiny_model_dir, problems, *runaway, "ppo.guards.max_truncation_rate=null")
    assert code == 0, err[-3000:]
    assert sorted(before_guards) == [2, 3], "resumed after step 1"
    assert not stop_file(mlflow_home).exists()
    rows = (mlflow_home / "checkpoints" / "phase1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert [v.tags["phase"] for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]


def stop_file(home: Path) -> Path:
    return home / "checkpoints" / "phase1" / STOP_FILE


def test_collapsed_rewards_stop_the_phase(tiny_model_dir, tmp_path, mlflow_home, before_guards, capsys):
    # Answers no response can match: every reward is a penalty at every step.
    unreachable = [Problem(id=f"u{i}", prompt=f"What is {i} plus {i}?", answer=r"\text{no model says this}",
                           source="test") for i in range(4)]
    problems = problems_file(tmp_path, unreachable)
    code, err = train(capsys, tiny_model_dir, problems, "ppo.guards.reward_collapse_patience=2",
                      "ppo.guards.max_truncation_rate=null")
    assert code == cli.EXIT_TRAINING_STOPPED, err[-3000:]
    stop = assert_stopped(mlflow_home, err, before_guards, guard="reward collapse", step=2, metric="accuracy")
    assert stop["value"] == 0.0 and stop["metrics"]["reward"] < 0
    assert "no correct response (accuracy 0) for ppo.guards.reward_collapse_patience=2 steps in a row" in err
    assert "pick problems the model can solve" in err


def test_the_gate_refuses_a_version_whose_run_a_guard_stopped(tiny_model_dir, tmp_path, mlflow_home):
    """Defence in depth: a stopped run is never registered, but if a version of one reaches the
    gate anyway (registered before its stop record was written), promote refuses it."""
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}"])
    base = stages.prepare_base(cfg)
    client = tracking.setup(cfg)
    client.set_registered_model_alias(MODEL, "champion", base["version"])
    phase2_dir = mlflow_home / "checkpoints" / "phase2"
    final = trained_copy(tiny_model_dir, phase2_dir / "final", "stopped-run")
    candidate = stages.register(cfg, "phase2", final, base)
    stop = {"guard": "runaway length", "step": 7, "run_key": "stopped-run", "message": "PPO in X stopped at step 7."}
    (phase2_dir / STOP_FILE).write_text(json.dumps(stop))

    with pytest.raises(TrainingGuardError, match=rf"the gate refuses version {candidate['version']} \(phase2\)"):
        stages.promote(cfg, {"base": base, "phase2": {**candidate, "eval": {}}}, parent_label="base")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == base["version"]
    assert "gate" not in client.get_model_version(MODEL, candidate["version"]).tags
    with pytest.raises(TrainingGuardError, match="phase2 is not registered: a training guard stopped its run"):
        stages.register(cfg, "phase2", final, base)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
