"""bench/gpu.py runs every part on the CPU with --tiny: the three rollout engines (graph compiled by
torch.compile there), the speed-up line, the greedy checks, a PPO step,
and the DeepSpeed part (its steps where deepspeed is installed, else a line saying it was skipped)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--work", str(tmp_path), "--port", "29577",
         "--deepspeed", "infra/accelerate/deepspeed-zero2.yaml"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    stages = [x["stage"] for x in lines]
    assert stages[0] == "setup" and stages[-1] == "done"
    assert lines[0]["device"] == "cpu" and lines[0]["parameters"] > 0

    rollouts = {x["engine"]: x for x in lines if x["stage"] == "rollout" and "engine" in x}
    assert rollouts.keys() == {"hf", "kv", "graph"}, rollouts
    for r in rollouts.values():
        assert r["prompts"] == 8 and r["prompt_tokens"] == 16
        assert 0 < r["generated_tokens"] <= 8 * 16 and r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
    assert any("speedup_kv_over_hf" in x for x in lines) and any("speedup_graph_over_hf" in x for x in lines)
    speedup = [line for line in done.stdout.splitlines() if line.startswith("rollout speedup ")]
    assert len(speedup) == 1 and " x (graph " in speedup[0] and "; hf " in speedup[0], done.stdout
    checks = {(x["engine"], x["against"]): x["rows_identical"] for x in lines if x["stage"] == "greedy_check"}
    assert checks == {("kv", "hf"): "8/8", ("graph", "kv"): "8/8"}

    plain = [x for x in lines if x["stage"] == "ppo" and x["mode"] == "plain" and "step" in x]
    assert [x["step"] for x in plain] == [1]
    for x in plain:
        assert x["rollouts"] == 4 and x["step_time_s"] >= x["rollout_time_s"] > 0
        assert math.isfinite(x["policy_loss"]) and math.isfinite(x["value_loss"])

    deepspeed = [x for x in lines if x["stage"] == "ppo" and x["mode"] == "deepspeed:deepspeed-zero2"]
    assert deepspeed and not any("failed" in x for x in deepspeed), deepspeed
    if not any("skipped" in x for x in deepspeed):
        assert [x["step"] for x in deepspeed if "step" in x] == [1]
    assert not list(tmp_path.iterdir()), "the saved model is removed at the end"


def test_gpu_bench_names_missing_packages_before_any_work() -> None:
    """A GPU image with only torch and transformers once ran the rollouts for minutes, then failed in the
    PPO part on the grader's and TRL's imports. The bench now says so before it builds anything."""
    hide = "import sys; sys.modules.update(pebble=None, trl=None); from bench.gpu import main; main(sys.argv[1:])"
    base = [sys.executable, "-c", hide, "--tiny", "--port", "29578"]
    done = subprocess.run([*base, "--deepspeed", "infra/accelerate/deepspeed-zero2.yaml"], check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr[-2000:])
    assert "needs pebble, trl" in done.stderr and "--ppo-steps 0" in done.stderr

    no_deepspeed = subprocess.run(base, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert no_deepspeed.returncode == 1 and "trl" not in no_deepspeed.stderr
    assert "needs pebble, which" in no_deepspeed.stderr

    rollouts_only = subprocess.run([*base, "--ppo-steps", "0"], check=False, capture_output=True, text=True,
                                   cwd=ROOT, timeout=300)
    assert rollouts_only.returncode == 0, rollouts_only.stderr[-2000:]
    assert '"stage": "done"' in rollouts_only.stdout
