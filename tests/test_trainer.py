"""PPOTrainer on a tiny real model: checkpoints, resume, and what a step logs."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bench.mechanism import tiny_random_model
from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.errors import DiskFullError
from concise_rl.grader import Grader
from concise_rl.synthetic import generate_problems
from concise_rl.training.models import freeze_all_but_top_layers
from concise_rl.training.trainer import PPOTrainer

PROBLEMS = generate_problems(6, seed=5, min_level=2, max_level=3)
LOGGED = {
    "reward", "accuracy", "response_length", "response_length_correct", "response_length_incorrect",
    "truncation_rate", "kl", "entropy", "policy_loss", "value_loss", "explained_variance", "clip_frac",
    "tokens_per_s", "lr_actor", "lr_critic",
}


def make_trainer(model_dir: Path, out: Path, on_step=None, model_cfg: ModelConfig | None = None, **overrides) -> PPOTrainer:
    settings = {
        "steps": 3, "prompts_per_step": 2, "samples_per_prompt": 2, "mini_batch_size": 2, "micro_batch_size": 1,
        "max_new_tokens": 16, "actor_lr": 1e-3, "critic_lr": 1e-3, "warmup_ratio": 0.0, "checkpoint_every": 1,
    }
    cfg = PPOConfig(**(settings | overrides))
    return PPOTrainer(
        policy_path=str(model_dir), problems=PROBLEMS, out_dir=out, ppo_cfg=cfg, model_cfg=model_cfg or ModelConfig(),
        prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), grader=Grader(workers=0), on_step=on_step,
        keep_checkpoints=2,
    )


class Crash(Exception):
    pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_crash_matches_uninterrupted_run(request, tmp_path: Path, dtype: str) -> None:
    """bfloat16 too (from weights stored in bf16, as real models are): its checkpoints keep the
    float32 master weights, so a resumed run ends where an uninterrupted one does (the final
    policy, in bf16, bit for bit)."""
    tiny_model_dir = request.getfixturevalue("tiny_model_dir" if dtype == "float32" else "tiny_bf16_model_dir")
    model_cfg = ModelConfig(dtype=dtype)
    logged: list[tuple[int, dict]] = []
    straight = make_trainer(tiny_model_dir, tmp_path / "straight", on_step=lambda s, m: logged.append((s, m)),
                            model_cfg=model_cfg)
    final_straight = straight.train()

    assert [s for s, _ in logged] == [1, 2, 3]
    assert LOGGED <= set(logged[0][1])
    assert logged[0][1]["kl"] == pytest.approx(0.0, abs=1e-6), "the first rollout is sampled from the reference"

    def crash_at_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        make_trainer(tiny_model_dir, tmp_path / "resumed", on_step=crash_at_3, model_cfg=model_cfg).train()
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000002"
    final_resumed = make_trainer(tiny_model_dir, tmp_path / "resumed", model_cfg=model_cfg).train()

    a = load_file(str(final_straight / "model.safetensors"))
    b = load_file(str(final_resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert a["model.norm.weight"].dtype == getattr(torch, dtype), "the final policy is saved in model.dtype"
    assert any(not torch.equal(before[k].to(a[k].dtype), a[k]) for k in a), "PPO changed no weight"
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002", "step-000003"], "older pruned"


def test_finished_run_is_reused_and_other_settings_start_afresh(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_trainer(tiny_model_dir, out).train()
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    calls: list[int] = []
    make_trainer(tiny_model_dir, out, on_step=lambda s, m: calls.append(s)).train()
    assert calls == [] and (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    make_trainer(tiny_model_dir, out, on_step=lambda s, m: calls.append(s), lam=1.0).train()
    assert calls == [1, 2, 3], "a different config must not resume another run's checkpoint"


def test_empty_problem_set_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        PPOTrainer(
            policy_path=str(tiny_model_dir), problems=[], out_dir=tmp_path, ppo_cfg=PPOConfig(),
            model_cfg=ModelConfig(), prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(),
        )


def test_rollout_logprobs_from_the_kv_engine_match_a_recompute(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Reusing the sampling pass's log-probs (the float32 default) gives the rollout a
    recompute would: same tokens, log-probs and entropy to 1e-4, so the same advantages."""
    rollouts = {}
    for mode in ("reuse", "recompute"):
        trainer = make_trainer(tiny_model_dir, tmp_path / mode, rollout_logprobs=mode)
        trainer.setup()
        torch.manual_seed(7)
        rollouts[mode] = trainer.rollout(0)
    (a, ma), (b, mb) = rollouts["reuse"], rollouts["recompute"]
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.advantages, b.advantages, atol=1e-3, rtol=0)
    assert ma["entropy"] == pytest.approx(mb["entropy"], abs=1e-4)


def test_reuse_needs_the_kv_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model_dir, tmp_path, rollout_logprobs="reuse")
    trainer.model_cfg = ModelConfig(generation_engine="hf")
    trainer.setup()
    with pytest.raises(ValueError, match="rollout_logprobs='reuse' needs the KV generation engine"):
        trainer.rollout(0)


def test_micro_batches_group_by_length_within_the_token_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model_dir, tmp_path, micro_batch_size=2, micro_batch_tokens=40)
    lengths = torch.tensor([5, 30, 12, 1, 25, 7])
    groups = trainer.micro_batches(torch.arange(6), lengths, prompt_width=10)
    # Widths 40, 35, 22 fit one row in 40 tokens; 17 fits two; the 2-row cap applies too.
    assert [g.tolist() for g in groups] == [[1], [4], [2], [5, 0], [3]]
    assert sorted(torch.cat(groups).tolist()) == list(range(6))


def test_token_budget_changes_padding_not_the_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One PPO step with micro-batches split by a token budget ends at the same weights."""
    finals = {}
    for name, extra in {"whole": {}, "split": {"micro_batch_tokens": 30}}.items():
        trainer = make_trainer(tiny_model_dir, tmp_path / name, steps=1, mini_batch_size=4, micro_batch_size=4, **extra)
        finals[name] = load_file(str(trainer.train() / "model.safetensors"))
    # Summing micro-batches in another grouping changes gradients only by rounding, but
    # Adam divides each one by its own running scale, so a weight whose gradient is
    # near zero can move by ~1e-6 either way; a dropped or doubled sample would move
    # weights by about the lr (1e-3).
    for key, value in finals["whole"].items():
        torch.testing.assert_close(finals["split"][key], value, atol=1e-5, rtol=1e-5)


def test_actor_trainable_layers_updates_only_the_top_layers_and_head(tmp_path: Path) -> None:
    model_dir = tiny_random_model(tmp_path / "model", num_layers=2)
    before = load_file(str(model_dir / "model.safetensors"))
    trainer = make_trainer(model_dir, tmp_path / "run", steps=1, actor_trainable_layers=1)
    after = load_file(str(trainer.train() / "model.safetensors"))
    changed = {key for key, value in after.items() if not torch.equal(value, before[key])}
    # The tiny model's output head is not tied to its embeddings, so it trains with the top layer.
    assert any(key.startswith("model.layers.1.") for key in changed)
    assert "lm_head.weight" in changed
    assert all(key.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for key in changed), changed
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_actor_trainable_parts_mlp_keeps_the_top_layers_attention_frozen(tmp_path: Path) -> None:
    model_dir = tiny_random_model(tmp_path / "model", num_layers=2)
    before = load_file(str(model_dir / "model.safetensors"))
    trainer = make_trainer(model_dir, tmp_path / "run", steps=1, actor_trainable_layers=1, actor_trainable_parts="mlp")
    after = load_file(str(trainer.train() / "model.safetensors"))
    changed = {key for key, value in after.items() if not torch.equal(value, before[key])}
    assert {"model.layers.1.mlp.down_proj.weight", "model.layers.1.post_attention_layernorm.weight"} <= changed
    assert all(key.startswith(("model.layers.1.mlp.", "model.layers.1.post_attention_layernorm.", "model.norm.",
                               "lm_head.")) for key in changed), changed


def test_more_trainable_layers_than_the_model_has_is_refused(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model(tmp_path / "model", num_layers=2))
    with pytest.raises(ValueError, match=r"ppo.actor_trainable_layers is 3 but the model has 2 decoder layers"):
        freeze_all_but_top_layers(model, 3)


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of its own (``size`` in KiB, default 16 MiB), unmounted after the test.

    A real filesystem that fills up: writes past its size fail with ENOSPC, as on a full
    cluster scratch disk. Needs the right to mount (root here); skipped, saying so, without it.
    """
    mounted: list[Path] = []

    def mount(name: str = "disk", size_kb: int = 16 * 1024) -> Path:
        where = tmp_path / name
        where.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(tiny_model_dir, small_disk):
    disk = small_disk()
    out = disk / "run"
    ckpts = out / "checkpoints"
    ballast = disk / "ballast"
    snapshot: dict[str, str] = {}

    def fill_disk_after_the_first_checkpoint(step: int, metrics: dict) -> None:
        if step == 2:  # step-000001 is written; leave room for half of the next checkpoint
            snapshot.update(digests(ckpts / "step-000001"))
            size = sum(p.stat().st_size for p in (ckpts / "step-000001").rglob("*") if p.is_file())
            free = shutil.disk_usage(disk).free
            with open(ballast, "wb") as f:
                f.write(b"\0" * (free - size // 2))

    with pytest.raises(DiskFullError) as err:
        make_trainer(tiny_model_dir, out, on_step=fill_disk_after_the_first_checkpoint).train()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert "no space left" in message and str(ckpts) in message and "step-000002" in message
    assert "step-000001 is intact" in message and "Free at least" in message and "run the same command again" in message
    assert "\n" not in message, "one line"

    # The previous checkpoint is untouched and still the one `latest` names; nothing partial is left.
    assert (ckpts / "latest").read_text() == "step-000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000001"]
    assert digests(ckpts / "step-000001") == snapshot

    # Space freed, the same run again: it resumes from step 1 (steps 2 and 3 only) and finishes.
    ballast.unlink()
    resumed: list[int] = []
    final = make_trainer(tiny_model_dir, out, on_step=lambda s, m: resumed.append(s)).train()
    assert resumed == [2, 3]
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_cli_reports_a_full_disk_in_one_line_and_leaves_no_partial_checkpoint(tiny_model_dir, small_disk, tmp_path,
                                                                              monkeypatch, capsys):
    from concise_rl import cli
    from concise_rl.problems import save_problems

    home = tmp_path / "home"
    monkeypatch.setenv("CONCISE_RL_HOME", str(home))
    disk = small_disk("home/checkpoints", size_kb=64)  # smaller than one checkpoint of the tiny model
    problems = tmp_path / "problems.jsonl"
    save_problems(PROBLEMS, problems)
    sets = ["ppo.steps=2", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4",
            "ppo.micro_batch_size=2", "ppo.max_new_tokens=8", "ppo.checkpoint_every=1", "grader.workers=0"]
    args = ["train", "--phase", "1", "--model", str(tiny_model_dir), "--problems", str(problems)]
    for item in sets:
        args += ["--set", item]
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (last,) = [line for line in err.splitlines() if line.startswith("concise-rl train:")]
    assert last.startswith("concise-rl train: no space left on the disk of ")
    assert str(disk / "phase1" / "checkpoints") in last and "step-000001" in last
    assert "CONCISE_RL_HOME" in last and "run the same command again" in last
    assert not [p for p in (disk / "phase1" / "checkpoints").iterdir()], "nothing half-written is left"


@pytest.mark.parametrize("logprob_temperature, divisor", [(None, 0.6), (1.0, 1.0)])
def test_logprobs_are_scored_at_the_logprob_temperature(tiny_model_dir: Path, tmp_path: Path,
                                                         logprob_temperature, divisor) -> None:
    """Default: the old, reference and new log-probs of the sampling distribution (T = 0.6), the
    importance ratio of what was sampled. ppo.logprob_temperature=1.0: raw logits, as the paper's
    code scored them while sampling at 0.6. Old and new use the same temperature either way, so the
    first update's ratio is exactly 1."""
    trainer = make_trainer(tiny_model_dir, tmp_path, steps=1, temperature=0.6, mini_batch_size=4,
                           micro_batch_size=4, logprob_temperature=logprob_temperature)
    trainer.setup()
    torch.manual_seed(3)
    ro, metrics = trainer.rollout(0)
    width = ro.response_mask.shape[1]
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    with torch.no_grad():
        logits = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                        position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -width - 1 : -1]
    tokens = ro.input_ids[:, -width:]
    expected = torch.log_softmax(logits / divisor, -1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ro.logprobs * ro.response_mask, expected * ro.response_mask, atol=1e-5, rtol=0)
    other = torch.log_softmax(logits / (1.6 - divisor), -1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    assert (ro.logprobs - other).abs().mul(ro.response_mask).max() > 1e-2, "the two temperatures differ"
    # One mini-batch, updated once: the new log-probs are taken before the step, at the same temperature
    # (by default reused from the sampling pass, which agrees with the training forward to ~1e-6).
    stats = trainer.update(ro)
    assert stats["approx_kl"] < 1e-10 and stats["clip_frac"] == 0.0


def test_the_sampling_passs_logprobs_are_not_reused_at_another_temperature(tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model_dir, tmp_path, logprob_temperature=1.0, rollout_logprobs="reuse")
    trainer.setup()
    with pytest.raises(ValueError, match="ppo.logprob_temperature=1.0 asks for others"):
        trainer.rollout(0)
