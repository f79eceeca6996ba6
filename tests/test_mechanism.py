"""The paper's mechanism on a tiny policy, with no length term anywhere.

With GAE (gamma = 1, lambda < 1), a terminal reward r and a per-response token-mean
loss, the last tokens of a response (its end-of-sequence token above all) carry the
largest advantage. A consistently negative r pushes the end-of-sequence token down
and responses grow; a consistently positive r pushes it up and they shrink.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.synthetic import generate_problems
from evaluation.grader import Grade
from training.generation import generate
from training.models import format_prompt, load_tokenizer
from training.trainer import PPOTrainer

PROBLEMS = generate_problems(8, seed=11, min_level=2, max_level=3)
MAX_NEW = 48


@pytest.fixture(scope="module")
def stopping_policy(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model taught to stop after ~12 tokens on average (geometric lengths), so length can move."""
    out = tmp_path_factory.mktemp("stopping-policy")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    prompt = tok(format_prompt(PROBLEMS[0].prompt, tok, PromptConfig()), return_tensors="pt").input_ids[0]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = []
        for _ in range(16):
            n = int(torch.distributions.Geometric(probs=torch.tensor(1 / 12)).sample()) + 1
            body = torch.randint(10, 200, (min(n, MAX_NEW - 1),), generator=gen)
            batch.append(torch.cat([prompt, body, torch.tensor([tok.eos_token_id])]))
        width = max(len(b) for b in batch)
        ids = torch.stack([torch.nn.functional.pad(b, (0, width - len(b)), value=tok.pad_token_id) for b in batch])
        labels = ids.clone()
        labels[:, : len(prompt)] = -100
        labels[ids == tok.pad_token_id] = -100
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def mean_length(model_dir: Path) -> float:
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [format_prompt(p.prompt, tok, PromptConfig()) for p in PROBLEMS] * 32
    torch.manual_seed(123)
    g = generate(model, tok, prompts, temperature=1.0, max_new_tokens=MAX_NEW, batch_size=128)
    return g.lengths.float().mean().item()


def constant_reward(value: float):
    def scorer(texts: list[str], answers: list[str]) -> tuple[list[Grade], list[float]]:
        return [Grade(value > 0, "x", "constant") for _ in texts], [value] * len(texts)

    return scorer


def train_with(policy: Path, out: Path, reward: float, lam: float) -> Path:
    cfg = PPOConfig(
        steps=6, prompts_per_step=8, samples_per_prompt=8, mini_batch_size=32, micro_batch_size=32,
        max_new_tokens=MAX_NEW, temperature=1.0, lam=lam, gamma=1.0, kl_coef=0.0, actor_lr=3e-4, critic_lr=1e-3,
        warmup_ratio=0.0, min_lr_ratio=1.0, loss_agg_mode="seq-mean-token-mean", checkpoint_every=100,
    )
    trainer = PPOTrainer(
        policy_path=str(policy), problems=PROBLEMS, out_dir=out, ppo_cfg=cfg, model_cfg=ModelConfig(),
        prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), scorer=constant_reward(reward),
    )
    return trainer.train()


@pytest.mark.parametrize(("reward", "direction"), [(-1.0, "grows"), (1.0, "shrinks")])
def test_terminal_reward_sign_sets_length_direction(stopping_policy: Path, tmp_path: Path, reward, direction) -> None:
    before = mean_length(stopping_policy)
    after = mean_length(train_with(stopping_policy, tmp_path / "run", reward, lam=0.95))
    assert 6 < before < 20, f"the starting policy should stop after ~12 tokens, got {before:.1f}"
    if direction == "grows":
        assert after > before * 1.15, f"negative reward: mean length {before:.1f} -> {after:.1f}"
    else:
        assert after < before * 0.85, f"positive reward: mean length {before:.1f} -> {after:.1f}"
