"""Each shipped real config, end to end on the CPU, as shipped except for what cannot run here.

`concise-rl run --config configs/<real>.yaml` in its own process, with only these changed:
- the model: a tiny stand-in of the same family (tests/real_family.py: Qwen2, the family's
  special tokens and real chat template, weights stored in bf16), as a local folder;
- the problem and benchmark sources: synthetic candidates in a local JSONL file, and the
  paper's benchmarks by name from ../shared/data/benchmarks ($CONCISE_RL_BENCHMARK_DIR);
- the device (cpu) and the sizes: RL steps, new tokens, evaluation samples and problems.
Everything else is the file's: bf16 (float32 masters and autocast), the prompt template and
chat template, the reward, prompts x samples per step and updates per rollout, the curation
bands, the evaluation sets and temperatures, and the gate, which each run must reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from concise_rl.config import load_config
from concise_rl.problems import save_problems
from concise_rl.synthetic import generate_problems
from real_family import BENCHMARKS, MAX_LEVEL, MIN_LEVEL, build_family_model, needs_shared  # tests/, on the path

ROOT = Path(__file__).resolve().parents[1]
# config -> the family of the model it names. The R1 7B config is the 1.5B's but for the model and the
# registry's names (test_the_r1_7b_config_takes_the_1_5b_path), so the 1.5B's run covers its path.
REAL_CONFIGS = {
    "r1-distill-qwen-1.5b.yaml": "deepseek-r1-distill",
    "qwen2.5-math-7b.yaml": "qwen2.5-math-base",
    "qwen2.5-math-1.5b-instruct.yaml": "qwen2.5-math-instruct",
}
SAME_PATH = {"r1-distill-qwen-7b.yaml": "r1-distill-qwen-1.5b.yaml"}


@pytest.mark.parametrize(("config", "runs_as"), list(SAME_PATH.items()))
def test_the_r1_7b_config_takes_the_1_5b_path(config: str, runs_as: str) -> None:
    """A config left out of the end-to-end runs differs from the one that runs only in names: the model it
    loads, its own name and its registry's. Any other difference would be a path no test took."""
    names = {"name": None, "model": {"name_or_path"}, "registry": {"model_name", "experiment"}}
    a = load_config(ROOT / "configs" / config).model_dump(mode="json")
    b = load_config(ROOT / "configs" / runs_as).model_dump(mode="json")
    for section, keys in names.items():
        for d in (a, b):
            if keys is None:
                d.pop(section)
            else:
                for key in keys:
                    d[section].pop(key)
    assert a == b, f"{config} now differs from {runs_as} beyond names: add it to REAL_CONFIGS"
NEW_TOKENS = 96
SIZES = [
    "device=cpu",
    "ppo.steps=1", "phase2.ppo.steps=1", f"ppo.max_new_tokens={NEW_TOKENS}", "ppo.checkpoint_every=1",
    f"curation.max_new_tokens={NEW_TOKENS}", "curation.batch_size=96",
    f"evaluation.max_new_tokens={NEW_TOKENS}", "evaluation.samples=1", "evaluation.batch_size=64",
    "evaluation.bootstrap_samples=200", "gate.bootstrap_samples=200",
    "evaluation.heldout.limit=8", "evaluation.benchmarks.aime24.limit=4", "evaluation.benchmarks.amc23.limit=4",
    "evaluation.benchmarks.mmlu_stem.limit=4",
]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """One trained stand-in per family and prompt format (the two R1 configs share theirs)."""
    models: dict[tuple[str, str], Path] = {}
    for config, family in REAL_CONFIGS.items():
        prompt = load_config(ROOT / "configs" / config).prompt
        key = (family, prompt.model_dump_json())
        if key not in models:
            models[key] = build_family_model(tmp_path_factory.mktemp(family), family, prompt)
    return {config: models[(family, load_config(ROOT / "configs" / config).prompt.model_dump_json())]
            for config, family in REAL_CONFIGS.items()}


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("config", list(REAL_CONFIGS))
def test_a_real_config_runs_end_to_end_to_the_gate(config: str, stand_ins: dict[str, Path], tmp_path: Path,
                                                   prefect_api: str) -> None:
    shipped = load_config(ROOT / "configs" / config)
    candidates = tmp_path / "candidates.jsonl"
    save_problems(generate_problems(24, seed=11, min_level=MIN_LEVEL, max_level=MAX_LEVEL, split="heldout"), candidates)
    home = tmp_path / "home"
    changes = [f"model.name_or_path={stand_ins[config]}", f"curation.candidates={{kind: file, path: {candidates}}}",
               *SIZES]
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / config)]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "CONCISE_RL_BENCHMARK_DIR": str(BENCHMARKS), "OMP_NUM_THREADS": "2", "PREFECT_API_URL": prefect_api}
    done = subprocess.run([*args, *(a for c in changes for a in ("--set", c))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    # 0: promoted; 3: the gate refused it. Either way the run reached the gate.
    assert done.returncode in (0, 3), done.stderr[-4000:]

    summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
    assert summary["registered_model"] == shipped.registry.model_name
    assert set(summary["models"]) == {"base", "phase1", "phase2"}
    assert summary["promoted"] is (done.returncode == 0)
    criteria = {c["name"] for c in summary["gate"]["criteria"]}
    assert any("accuracy change" in c for c in criteria) and any("length reduction" in c for c in criteria)
    sets = {"heldout", *shipped.evaluation.benchmarks}
    for model in summary["models"].values():
        assert set(model["eval"]) == sets
        for temps in model["eval"].values():
            assert set(temps) == {str(t) for t in shipped.evaluation.temperatures}

    # Trained as shipped: float32 masters under bf16, every optimiser update of a rollout.
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    versions = {v.tags["phase"]: v for v in client.search_model_versions(f"name = '{shipped.registry.model_name}'")}
    assert set(versions) == {"base", "1", "2"}
    ppo = shipped.ppo_for("phase2")
    for phase in ("phase1", "phase2"):
        ckpt = home / "checkpoints" / phase
        final = json.loads((ckpt / "final" / "config.json").read_text())
        assert final["dtype"] == "bfloat16", "the registered policy is stored in model.dtype"
        latest = ckpt / "checkpoints" / (ckpt / "checkpoints" / "latest").read_text().strip()
        policy = json.loads((latest / "policy" / "config.json").read_text())
        assert policy["dtype"] == "float32", "checkpoints keep the float32 master weights"
        import torch

        optim = torch.load(latest / "optim.pt", weights_only=False)
        per_rollout = ppo.prompts_per_step * ppo.samples_per_prompt // ppo.mini_batch_size
        assert optim["sched_actor"]["last_epoch"] == per_rollout, "one optimiser step per mini-batch of the rollout"
        state = optim["opt_actor"]["state"]
        assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
        rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["generated_tokens"] > 0
