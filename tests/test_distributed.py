"""PPO in 2 processes on the CPU (gloo), started with `accelerate launch` as on a GPU machine.

`--multi_gpu` is what starts the DDP processes here: with `--cpu`, accelerate launches
more than one process through mpirun; with `--multi_gpu` on a machine without GPUs it
starts them with torchrun and each runs as MULTI_CPU over gloo. The DeepSpeed variants
launch with infra/accelerate/deepspeed-zero{2,3}.yaml and run on DeepSpeed's CPU
accelerator (gloo); they are slow-marked and skipped where deepspeed is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_worker import PAPER_LR, PROBLEMS, SETTINGS  # tests/, on the path as in test_grader's grader_faults
from mlflow import MlflowClient
from safetensors.torch import load_file

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.grader import Grader
from concise_rl.problems import save_problems
from concise_rl.training import ppo
from concise_rl.training.experience import Rollout, Scored, experience
from concise_rl.training.trainer import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, how=None):
    """``accelerate launch`` with 2 CPU processes; the code is this checkout's (PYTHONPATH).

    ``how``: the launcher's options (default: DDP, as ``--multi_gpu``, in float32).
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    how = how or ["--multi_gpu", "--mixed_precision", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--num_machines", "1",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args,
    ]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def pad_right(t: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass
class Run:
    out: Path
    distributed_type: str
    float32: bool  # comparable with a single float32 process
    model_dtype: str  # the config's model.dtype, which follows the launcher's precision


def deepspeed(config: str, *extra: str) -> list[str]:
    return ["--config_file", f"infra/accelerate/{config}.yaml", *extra]


# DDP; the repository's DeepSpeed configs as they are (bf16); ZeRO-3 in float32 for the
# comparison with one process. DeepSpeed's CPU accelerator runs ZeRO over gloo, so these
# exercise the DeepSpeed code paths without a GPU (where deepspeed is installed).
VARIANTS = {
    "ddp": (["--multi_gpu", "--mixed_precision", "no"], "MULTI_CPU", True),
    "zero2-bf16": (deepspeed("deepspeed-zero2"), "DEEPSPEED", False),
    "zero3-bf16": (deepspeed("deepspeed-zero3"), "DEEPSPEED", False),
    "zero3-fp32": (deepspeed("deepspeed-zero3", "--mixed_precision", "no"), "DEEPSPEED", True),
}
# DeepSpeed is a test dependency (the dev extra), so these variants run in CI; without it they
# fail rather than skip, unless a run says it has no DeepSpeed on purpose.
NO_DEEPSPEED_OK = os.environ.get("CONCISE_RL_TESTS_WITHOUT_DEEPSPEED") == "1"


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=[] if name == "ddp" else [pytest.mark.slow]) for name in VARIANTS],
)
def two_process_run(request, tiny_model_dir: Path, tmp_path_factory) -> Run:
    how, distributed_type, float32 = VARIANTS[request.param]
    if how[0] == "--config_file" and importlib.util.find_spec("deepspeed") is None:
        message = "deepspeed is not installed (make install puts it in; by hand: pip install --no-build-isolation deepspeed)"
        if NO_DEEPSPEED_OK:
            pytest.skip(message)
        pytest.fail(message + "; set CONCISE_RL_TESTS_WITHOUT_DEEPSPEED=1 to skip these variants on purpose")
    out = tmp_path_factory.mktemp(request.param)
    done = accelerate_launch(
        ["tests/distributed_worker.py", "--model", str(tiny_model_dir), "--out", str(out)], how=how
    )
    assert done.returncode == 0, launch_failure(done, out)
    return Run(out, f"DistributedType.{distributed_type}", float32, "float32" if float32 else "bfloat16")


def launch_failure(done: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed launch left: whether each rank wrote its record, the lines that name an error (which a
    tail of torchrun's summary hides), then the tail."""
    written = {r: (out / f"rank{r}.json").is_file() for r in (0, 1)}
    marks = ("Error", "error:", "terminate called", "what():", "Traceback", "Signal", "Fatal")
    lines = [line for line in done.stderr.splitlines() if any(m in line for m in marks)]
    return (f"exit {done.returncode}; records written: {written}\n" + "\n".join(lines[:40])
            + "\n--- tail ---\n" + done.stderr[-2500:])


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_each_process_samples_its_own_share_of_the_step(two_process_run: Run) -> None:
    r0, r1 = ranks(two_process_run.out)
    assert r0["num_processes"] == r1["num_processes"] == 2
    assert r0["distributed_type"] == two_process_run.distributed_type
    assert [s["step"] for s in r0["shards"]] == [0, 1, 2]
    for s0, s1 in zip(r0["shards"], r1["shards"], strict=True):
        assert s0["batch"] == s1["batch"], "the processes disagree on the step's prompts"
        assert len(s0["shard"]) == len(s1["shard"]) == SETTINGS["prompts_per_step"] // 2
        # Disjoint positions of the step's prompts whose union, in process order, is the step's prompts.
        assert s0["shard"] + s1["shard"] == s0["batch"]
    assert r0["shards"][0]["shard"] != r1["shards"][0]["shard"]


def test_a_step_that_does_not_divide_among_the_processes_is_refused(two_process_run: Run) -> None:
    for r in ranks(two_process_run.out):
        prompts, mini = r["refused"]
        assert "ppo.prompts_per_step=3 does not divide among 2 processes" in prompts
        assert "ppo.mini_batch_size=1 does not divide among 2 processes" in mini


def test_batch_statistics_are_the_whole_steps_and_the_same_on_both(two_process_run: Run) -> None:
    r0, r1 = ranks(two_process_run.out)
    assert len(r0["metrics"]) == len(r1["metrics"]) == SETTINGS["steps"]
    for m0, m1 in zip(r0["metrics"], r1["metrics"], strict=True):
        assert m0.keys() == m1.keys()
        assert all(same(m0[k], m1[k]) for k in m0), {k: (m0[k], m1[k]) for k in m0 if not same(m0[k], m1[k])}
    step0 = [torch.load(two_process_run.out / f"rank{r}-step0.pt", weights_only=False) for r in (0, 1)]
    n = SETTINGS["prompts_per_step"] * SETTINGS["samples_per_prompt"]
    assert r0["metrics"][0]["response_length"] == pytest.approx(
        sum(float(d["local"].response_mask.sum()) for d in step0) / n
    ), "response length is over both processes' rollouts"
    # Advantages were whitened over both processes' tokens: zero mean and unit variance over the
    # union, while one process's own share is off zero.
    adv = [d["rollout"].advantages for d in step0]
    masks = [d["rollout"].response_mask for d in step0]
    width = max(a.shape[1] for a in adv)
    union, union_mask = torch.cat([pad_right(a, width) for a in adv]), torch.cat([pad_right(m, width) for m in masks])
    assert float(ppo.masked_mean(union, union_mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(ppo.masked_var(union, union_mask)) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(ppo.masked_mean(adv[0], masks[0]))) > 1e-3


def test_processes_end_with_the_same_weights_and_one_writer(two_process_run: Run) -> None:
    out = two_process_run.out
    r0, r1 = ranks(out)
    assert r0["policy"] == r1["policy"] and r0["critic"] == r1["critic"]
    # The micro-batches were split unevenly by the token budget and evened out across processes.
    before = list(zip((m[0] for m in r0["micro_batches"]), (m[0] for m in r1["micro_batches"]), strict=True))
    assert any(a != b for a, b in before), before
    assert all(m0[1] == m1[1] for m0, m1 in zip(r0["micro_batches"], r1["micro_batches"], strict=True))
    # Checkpoints and metrics written by the main process only, once each.
    logs = [(out / f"rank{r}.log").read_text() for r in (0, 1)]
    written = [[line for line in log.splitlines() if line.endswith(" written")] for log in logs]
    # straight: steps 1-3; resumed: 1-2, crash, then 3; paper-lr: 1-3.
    assert len(written[0]) == 3 + 2 + 1 + 3 and written[1] == []
    ckpts = out / "straight" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000001", "step-000002", "step-000003"]
    steps = [json.loads(line)["step"] for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_on_both_processes_matches_the_uninterrupted_run(two_process_run: Run) -> None:
    out = two_process_run.out
    r0, r1 = ranks(out)
    assert r0["crashed"] and r1["crashed"]
    assert [s["step"] for s in r0["resumed_shards"]] == [s["step"] for s in r1["resumed_shards"]] == [2]
    assert all(r["resumed_policy"] == r0["policy"] and r["resumed_critic"] == r0["critic"] for r in (r0, r1))
    assert "resumed PPO from" in (out / "rank1.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.fixture(scope="module")
def float32_paper_lr_moved(tiny_model_dir: Path, tmp_path_factory) -> dict[str, float]:
    """How far one float32 process moves the weights in the worker's paper-lr run (its checkpoint's masters)."""
    from distributed_worker import mean_abs_change

    out = tmp_path_factory.mktemp("paper-lr-float32")
    PPOTrainer(
        policy_path=str(tiny_model_dir), problems=PROBLEMS, out_dir=out,
        ppo_cfg=PPOConfig(**SETTINGS | PAPER_LR | {"warmup_ratio": 0.0}),
        model_cfg=ModelConfig(), prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), grader=Grader(workers=0),
    ).train()
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    ckpt = out / "checkpoints" / f"step-{SETTINGS['steps']:06d}"
    critic = load_file(str(ckpt / "critic.safetensors"))
    body = {"model." + k.removeprefix("backbone."): v for k, v in critic.items() if k.startswith("backbone.")}
    return {
        "policy": mean_abs_change(start, load_file(str(ckpt / "policy" / "model.safetensors"))),
        "critic": mean_abs_change({k: v for k, v in start.items() if k.startswith("model.")}, body),
    }


def test_the_paper_lr_moves_the_master_weights_as_far_as_in_float32(
    two_process_run: Run, float32_paper_lr_moved: dict[str, float]
) -> None:
    """Under DeepSpeed bf16 (the paper's precision) the float32 masters take the 5e-7 updates that
    bf16 weights would round away: they move as far as one float32 process's weights."""
    r0, r1 = ranks(two_process_run.out)
    assert r0["model_dtype"] == r1["model_dtype"] == two_process_run.model_dtype
    assert r0["paper_lr_moved"] == r1["paper_lr_moved"]
    for model, moved in r0["paper_lr_moved"].items():
        reference = float32_paper_lr_moved[model]
        assert reference > 0 and 0.5 < moved / reference < 2.0, (model, moved, reference)


def test_two_processes_make_the_update_one_process_makes_on_the_same_rollouts(
    two_process_run: Run, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Both processes' step-0 rollouts, put together in one process: same advantages, metrics and update."""
    if not two_process_run.float32:
        pytest.skip("bf16 weights: compared with one float32 process by the zero3-fp32 run")
    out = two_process_run.out
    step0 = [torch.load(out / f"rank{r}-step0.pt", weights_only=False) for r in (0, 1)]
    single = PPOTrainer(
        policy_path=str(tiny_model_dir), problems=PROBLEMS, out_dir=tmp_path, ppo_cfg=PPOConfig(**SETTINGS),
        model_cfg=ModelConfig(), prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), grader=Grader(workers=0),
    )
    assert single.world == 1
    single.setup()

    locals_ = [d["local"] for d in step0]
    width = max(s.response_mask.shape[1] for s in locals_)
    per_token = ("response_mask", "logprobs", "ref_logprobs", "values", "entropy")
    batch = Scored(
        *(torch.cat([pad_right(getattr(s, f), width) for s in locals_]) for f in per_token),
        *(torch.cat([getattr(s, f) for s in locals_]) for f in ("scores", "correct", "boxed", "truncated")),
    )
    advantages, returns, metrics = experience(batch, single.cfg)
    for r, d in enumerate(step0):
        rows, w = slice(4 * r, 4 * (r + 1)), d["rollout"].advantages.shape[1]
        torch.testing.assert_close(advantages[rows, :w], d["rollout"].advantages, atol=1e-6, rtol=0)
        torch.testing.assert_close(returns[rows, :w], d["rollout"].returns, atol=1e-6, rtol=0)
    for key, value in metrics.items():
        assert same(value, step0[0]["metrics"][key]) or value == pytest.approx(step0[0]["metrics"][key], abs=1e-6), key

    # One rollout of both processes' rows: prompts left-padded, responses right-padded to one width.
    ros = [d["rollout"] for d in step0]
    prompt = max(ro.input_ids.shape[1] - ro.response_mask.shape[1] for ro in ros)
    pad_id = single.tokenizer.pad_token_id

    def joined(ro: Rollout, t: torch.Tensor, value: int) -> torch.Tensor:
        p = ro.input_ids.shape[1] - ro.response_mask.shape[1]
        return torch.cat([F.pad(t[:, :p], (prompt - p, 0), value=value), pad_right(t[:, p:], width, value)], 1)

    union = Rollout(
        torch.cat([joined(ro, ro.input_ids, pad_id) for ro in ros]),
        torch.cat([joined(ro, ro.attention_mask, 0) for ro in ros]),
        *(torch.cat([pad_right(getattr(ro, f), width) for ro in ros])
          for f in ("response_mask", "logprobs", "values", "advantages", "returns")),
    )
    stats = single.update(union)
    logged = ranks(out)[0]["metrics"][0]
    for key in ("policy_loss", "value_loss", "grad_norm_actor", "grad_norm_critic", "clip_frac", "approx_kl"):
        assert stats[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-7), key

    # The weights after step 1. Adam moves each weight by about the learning rate (1e-3) whatever
    # the gradient's size, so a weight whose gradient is near zero can move differently on float
    # noise: 1% of a step is the tolerance (in practice all but a rare weight agree to 1e-6).
    ckpt = out / "straight" / "checkpoints" / "step-000001"
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    saved_models = ((ckpt / "policy" / "model.safetensors", single.policy), (ckpt / "critic.safetensors", single.critic))
    for saved, model in saved_models:
        theirs, mine = load_file(str(saved)), single.accelerator.unwrap_model(model).state_dict()
        assert theirs.keys() <= mine.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, atol=1e-2 * SETTINGS["actor_lr"], rtol=0, msg=key)
    policy = load_file(str(ckpt / "policy" / "model.safetensors"))
    moved = [k for k in start if (policy[k] - start[k]).abs().max() > 0.5 * SETTINGS["actor_lr"]]
    assert len(moved) > len(start) // 2, "the update moved too few weights for the comparison to mean much"


@pytest.mark.slow
def test_concise_rl_train_under_accelerate_launch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`concise-rl train` in 2 processes: both train, the main one alone logs to MLflow and registers."""
    problems = tmp_path / "problems.jsonl"
    save_problems(PROBLEMS[:4], problems)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | {"CONCISE_RL_HOME": str(home)}
    settings = ["ppo.steps=2", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4",
                "ppo.micro_batch_size=2", "ppo.max_new_tokens=16", "ppo.checkpoint_every=1",
                "prompt.max_prompt_tokens=256", "device=cpu"]
    args = ["-m", "concise_rl.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"), "--phase", "1",
            "--model", str(tiny_model_dir), "--problems", str(problems)]
    done = accelerate_launch([*args, *(x for s in settings for x in ("--set", s))], env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("phase1 trained:") == 1, done.stdout

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'concise-rl-demo'")
    assert [v.tags["phase"] for v in versions] == ["1"]
    runs = client.search_runs([client.get_experiment_by_name("concise-rl-demo").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["register-phase1", "train-phase1"]
    train = next(r for r in runs if r.data.tags["stage"] == "train-phase1")
    assert [m.step for m in client.get_metric_history(train.info.run_id, "accuracy")] == [1, 2]
    rows = (home / "checkpoints" / "phase1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_other_commands_refuse_to_run_as_several_processes(tmp_path: Path) -> None:
    env = dict(os.environ, WORLD_SIZE="2", CONCISE_RL_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "concise_rl.cli", "evaluate", "--config", str(ROOT / "configs" / "demo.yaml")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "only `concise-rl train` runs data-parallel" in done.stderr
