"""Training keeps float32 master weights whatever model.dtype says (training/precision.py).

At the paper's actor learning rate (5e-7) an AdamW step on a bf16 weight of size ~0.02
is far below its last bit, so pure-bf16 training rounds the updates away. These tests
run the real trainer in float32 and in bfloat16 and compare how far the weights moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer  # tests/ is on the path (pytest rootdir conftest)

from concise_rl.config import ModelConfig, PPOConfig
from concise_rl.errors import ConfigError
from concise_rl.training.grpo import grpo_args
from concise_rl.training.precision import training_precision

# The paper's learning rates, no warm-up: every update is lr-sized from the first.
PAPER_LR = {"actor_lr": 5e-7, "critic_lr": 9e-6, "warmup_ratio": 0.0}


def mean_abs_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Mean |w_after - w_before| over every entry of the weights both hold, in float64."""
    total, count = 0.0, 0
    for key, value in before.items():
        change = after[key].double() - value.double()
        total += change.abs().sum().item()
        count += change.numel()
    return total / count


def trained_master_weights(model_dir: Path, out: Path, dtype: str) -> tuple[dict, dict]:
    """The policy and critic-body weights of the last checkpoint (the float32 masters), after 3 steps."""
    trainer = make_trainer(model_dir, out, model_cfg=ModelConfig(dtype=dtype), **PAPER_LR)
    trainer.train()
    ckpt = out / "checkpoints" / "step-000003"
    policy = load_file(str(ckpt / "policy" / "model.safetensors"))
    critic = load_file(str(ckpt / "critic.safetensors"))
    body = {"model." + k.removeprefix("backbone."): v for k, v in critic.items() if k.startswith("backbone.")}
    return policy, body


def test_bf16_training_moves_the_weights_as_far_as_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    start_body = {k: v for k, v in start.items() if k.startswith("model.")}
    moved = {}
    for dtype in ("float32", "bfloat16"):
        policy, body = trained_master_weights(tiny_model_dir, tmp_path / dtype, dtype)
        assert all(v.dtype == torch.float32 for v in policy.values()), "checkpoints keep the float32 masters"
        moved[dtype] = (mean_abs_change(start, policy), mean_abs_change(start_body, body))
    (actor32, critic32), (actor16, critic16) = moved["float32"], moved["bfloat16"]
    # 6 AdamW updates of about the learning rate each (cosine-decayed); most weights get a gradient.
    assert actor32 > 1e-7 and critic32 > 1e-6, moved
    assert 0.5 < actor16 / actor32 < 2.0, moved
    assert 0.5 < critic16 / critic32 < 2.0, moved

    final = tmp_path / "bfloat16" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(str(final / "model.safetensors")).values()} == {torch.bfloat16}


def test_pure_bf16_adamw_would_round_the_same_updates_away() -> None:
    """The failure the float32 masters prevent, at the weight scale of the test above (std 0.02):
    the same 6 AdamW steps at 5e-7 on bf16 parameters leave almost every weight where it was."""
    torch.manual_seed(0)
    init = torch.randn(256, 256) * 0.02
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(init.to(dtype).clone())
        opt = torch.optim.AdamW([weight], lr=5e-7, betas=(0.9, 0.95), weight_decay=0.0)
        grad = torch.randn(init.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        for _ in range(6):  # a steady gradient: each AdamW step moves every weight by the lr
            weight.grad = grad.clone()
            opt.step()
        moved[dtype] = (weight.detach().double() - init.to(dtype).double()).abs().mean().item()
    assert moved[torch.float32] == pytest.approx(6 * 5e-7, rel=0.2)
    assert moved[torch.bfloat16] < 0.2 * moved[torch.float32], moved


def test_bf16_starts_with_zero_kl_and_samples_from_a_bf16_copy(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model_dir, tmp_path, model_cfg=ModelConfig(dtype="bfloat16"), steps=1)
    trainer.setup()
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.critic.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.opt_actor.param_groups[0]["params"]} == {torch.float32}
    assert {p.dtype for p in trainer.ref.parameters()} == {torch.float32}, "computes as the policy does"
    with trainer.generation_model() as sampler:
        assert {p.dtype for p in sampler.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(sampler.lm_head.weight, policy.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)
    _, metrics = trainer.rollout(0)
    assert metrics["kl"] == 0.0


def test_precision_follows_model_dtype_and_refuses_a_conflicting_launcher() -> None:
    plain = training_precision("bfloat16", "no", deepspeed=False)
    assert (plain.compute, plain.load, plain.sampling_copy) == (torch.bfloat16, torch.float32, True)
    assert training_precision("bfloat16", "bf16", deepspeed=False) == plain
    zero = training_precision("bfloat16", "bf16", deepspeed=True)
    assert (zero.compute, zero.load, zero.sampling_copy) == (torch.bfloat16, torch.bfloat16, False)
    assert not training_precision("float32", "no", deepspeed=False).mixed

    with pytest.raises(ConfigError, match=r"model.dtype is float32 but the launcher's mixed precision is 'bf16'"):
        training_precision("float32", "bf16", deepspeed=False)
    with pytest.raises(ConfigError, match=r"model.dtype is bfloat16 but DeepSpeed's precision is 'no'.*--mixed_precision bf16"):
        training_precision("bfloat16", "no", deepspeed=True)
    with pytest.raises(ConfigError, match="float16 cannot train"):
        training_precision("float16", "fp16", deepspeed=False)


def test_grpo_keeps_float32_weights_and_autocasts_in_model_dtype(tmp_path: Path) -> None:
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, mini_batch_size=4, micro_batch_size=2)
    for dtype, bf16 in (("bfloat16", True), ("float32", False)):
        args = grpo_args(cfg, tmp_path, loss_type="grpo", model_cfg=ModelConfig(dtype=dtype), use_cpu=True)
        assert (args.bf16, args.fp16, args.model_init_kwargs) == (bf16, False, {"dtype": "float32"})


# What each stage's forwards may run as, (autocast dtype or None, dtype of the module's weights),
# given the two precision settings: the base's SFT follows model.embedded.sft_dtype (float32
# weights, bf16 autocast or none); PPO follows model.dtype (float32 masters, with bf16 autocast
# when model.dtype is bfloat16, and rollouts from a bf16 copy without autocast); everything else
# runs the weights as loaded, in model.dtype, without autocast.
def allowed(stage: str, sft_dtype: str, model_dtype: str) -> set[tuple[str | None, str]]:
    if stage == "sft":
        return {("bfloat16" if sft_dtype == "bfloat16" else None, "float32")}
    if stage.startswith("train-") and model_dtype == "bfloat16":
        return {("bfloat16", "float32"), (None, "bfloat16")}
    return {(None, model_dtype)}


@pytest.mark.slow
@pytest.mark.parametrize(("sft_dtype", "model_dtype"), [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_no_stage_runs_under_autocast_it_did_not_ask_for(sft_dtype: str, model_dtype: str, mlflow_home: Path,
                                                         monkeypatch) -> None:
    """Every module forward of every stage, watched by a global hook: under autocast exactly where the
    config asks for bf16, never inherited from a library's default or an earlier stage in the process."""
    from collections import defaultdict

    from concise_rl.config import load_config
    from concise_rl.tasks import stages
    from tests.test_pipeline_e2e import ROOT, TINY

    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"model.embedded.sft_dtype={sft_dtype}",
                                                       f"model.dtype={model_dtype}", "ppo.steps=1", "phase2.ppo.steps=1"])
    current, seen = ["-"], defaultdict(set)

    def watch(module, args):
        # Leaf modules, where the arithmetic runs: accelerate applies autocast inside the wrapped
        # forward of the top-level model, after its own pre-hooks have run.
        weight = next(module.parameters(recurse=False), None)
        if weight is None or next(module.children(), None) is not None:
            return
        autocast = str(torch.get_autocast_dtype("cpu")).removeprefix("torch.") if torch.is_autocast_enabled("cpu") else None
        seen[current[0]].add((autocast, str(weight.dtype).removeprefix("torch.")))

    def stage(name, fn, *args, **kwargs):
        outer, current[0] = current[0], name
        try:
            return fn(*args, **kwargs)
        finally:
            current[0] = outer

    build = stages.build_embedded_model
    monkeypatch.setattr(stages, "build_embedded_model", lambda *a, **k: stage("sft", build, *a, **k))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        base = stage("base", stages.prepare_base, cfg)
        curated = stage("curate", stages.curate, cfg, base["uri"])
        p1 = stage("train-phase1", stages.train_phase, cfg, "phase1", base["uri"], f"{curated}/phase1.jsonl")
        v1 = stage("register", stages.register, cfg, "phase1", p1, base)
        p2 = stage("train-phase2", stages.train_phase, cfg, "phase2", v1["uri"], f"{curated}/phase2.jsonl")
        v2 = stage("register", stages.register, cfg, "phase2", p2, v1)
        stage("evaluate", stages.evaluate, cfg, {"base": base, "phase1": v1, "phase2": v2})
    finally:
        handle.remove()
    assert seen["sft"] and seen["train-phase1"] and seen["curate"] and seen["evaluate"], seen
    for name, forwards in seen.items():  # registering the base or a phase may run no model at all
        assert forwards <= allowed(name, sft_dtype, model_dtype), (name, forwards)
    assert seen["sft"] == allowed("sft", sft_dtype, model_dtype), "the SFT ran in the precision it was given"
    if model_dtype == "bfloat16":
        assert ("bfloat16", "float32") in seen["train-phase1"], "PPO's forwards ran under the bf16 autocast asked for"
