"""The paper's mechanism, measured: does the sign of a constant terminal reward set the
direction of response length under PPO, and how does lambda change it?

A tiny Qwen2 policy is first taught to stop after ~12 tokens (geometric lengths, so
length can move either way). PPO then trains it for a few steps with a constant
reward of -1 or +1 (no KL, per-response token-mean loss), and the mean length of 256
sampled responses is compared before and after, for lambda 0.95 and 1.0.

    python -m bench.mechanism [--steps 6] [--seeds 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import (
    GuardConfig,
    ModelConfig,
    PPOConfig,
    PromptConfig,
    RewardConfig,
)
from concise_rl.grader import Grade
from concise_rl.synthetic import generate_problems, reasoning_trace
from concise_rl.training.embedded import build_tokenizer
from concise_rl.training.generation import generate
from concise_rl.training.models import format_prompt, load_tokenizer
from concise_rl.training.trainer import PPOTrainer

PROBLEMS = generate_problems(8, seed=11, min_level=2, max_level=3)
MAX_NEW = 48


def tiny_random_model(out: Path, seed: int = 0, num_layers: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    """A random-init Qwen2 (1 layer unless asked) with the project's own tokenizer (chat template included),
    its weights stored in ``dtype``."""
    rng = random.Random(seed)
    corpus = [p.prompt + "\n" + PromptConfig().instruction + "\n" + reasoning_trace(p.prompt, rng)
              for p in generate_problems(200, seed=seed, min_level=1, max_level=4, distinct=False)]
    tok = build_tokenizer(corpus, 300)
    torch.manual_seed(seed)
    # 4,096 positions, as a stand-in for real models' long contexts: the real benchmarks' prompts (mmlu_stem
    # 5-shot: up to 3,330 tokens in this small vocabulary) fit, so evaluation's context check lets them through.
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    ))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_policy(out: Path, seed: int = 0) -> Path:
    """The tiny random model trained to stop after ~12 tokens (geometric lengths), so length can move."""
    tiny_random_model(out, seed)
    tok = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
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
        model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def mean_length(model_dir: Path, seed: int = 123) -> float:
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [format_prompt(p.prompt, tok, PromptConfig()) for p in PROBLEMS] * 32
    torch.manual_seed(seed)
    return generate(model, tok, prompts, temperature=1.0, max_new_tokens=MAX_NEW, batch_size=128).lengths.float().mean().item()


def constant_reward(value: float):
    def scorer(texts: list[str], answers: list[str]) -> tuple[list[Grade], list[float]]:
        return [Grade(value > 0, "x", "constant") for _ in texts], [value] * len(texts)

    return scorer


def train_with(policy: Path, out: Path, reward: float, lam: float, steps: int = 6, seed: int = 0,
               loss_agg_mode: str = "seq-mean-token-mean") -> Path:
    cfg = PPOConfig(
        steps=steps, prompts_per_step=8, samples_per_prompt=8, mini_batch_size=32, micro_batch_size=32,
        max_new_tokens=MAX_NEW, temperature=1.0, lam=lam, gamma=1.0, kl_coef=0.0, actor_lr=3e-4, critic_lr=1e-3,
        warmup_ratio=0.0, min_lr_ratio=1.0, loss_agg_mode=loss_agg_mode, checkpoint_every=100, seed=seed,
        # The reward is constant on purpose (never correct at -1): not a collapse to stop for.
        guards=GuardConfig(max_truncation_rate=None, reward_collapse_patience=None),
    )
    trainer = PPOTrainer(
        policy_path=str(policy), problems=PROBLEMS, out_dir=out, ppo_cfg=cfg, model_cfg=ModelConfig(),
        prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), scorer=constant_reward(reward),
    )
    return trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="PPO seeds per setting")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mechanism-"))
    try:
        policy = tiny_policy(work / "policy")
        before = mean_length(policy)
        print(f"starting mean length: {before:.2f} tokens (256 samples, T=1.0)")
        print(f"{'lambda':>6} {'reward':>6} {'agg':>24} {'after (mean over seeds)':>24} {'change':>8}")
        for lam in (0.95, 1.0):
            for reward in (-1.0, 1.0):
                for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
                    after = [mean_length(train_with(policy, work / f"run-{lam}-{reward}-{agg}-{s}", reward, lam,
                                                    args.steps, s, agg)) for s in range(args.seeds)]
                    avg = sum(after) / len(after)
                    print(f"{lam:>6} {reward:>6} {agg:>24} {avg:>24.2f} {100 * (avg / before - 1):>7.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
