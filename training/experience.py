"""What a PPO step learns from: the rollout's tensors, the padded forward passes that score
them (or the sampling pass's log-probs in their place), and the advantages and metrics
computed over the whole step's batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from concise_rl.config import PPOConfig
from concise_rl.training import ppo
from concise_rl.training.generation import Generation


@dataclass
class Rollout:
    """One step's experience; every [batch, ...] tensor is on the CPU until used."""

    input_ids: torch.Tensor  # [batch, prompt_len + response_len]
    attention_mask: torch.Tensor  # [batch, prompt_len + response_len]
    response_mask: torch.Tensor  # [batch, response_len]
    logprobs: torch.Tensor  # [batch, response_len]
    values: torch.Tensor  # [batch, response_len]
    advantages: torch.Tensor  # [batch, response_len]
    returns: torch.Tensor  # [batch, response_len]


@dataclass
class Scored:
    """What advantages and metrics are computed from: sampled, scored and run through the
    reference, the critic and (unless reused) the policy. One process's rows, or the whole
    step's batch gathered from every process, in process order."""

    response_mask: torch.Tensor  # [batch, response_len]
    logprobs: torch.Tensor  # [batch, response_len]
    ref_logprobs: torch.Tensor  # [batch, response_len]
    values: torch.Tensor  # [batch, response_len], 0 after EOS
    entropy: torch.Tensor  # [batch, response_len]
    scores: torch.Tensor  # [batch], float
    correct: torch.Tensor  # [batch], bool
    boxed: torch.Tensor  # [batch], bool
    truncated: torch.Tensor  # [batch], bool


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, input_ids, attention_mask, response_len: int, temperature: float, tokens):
    """Log-probs (and logits) of ``tokens``, the last ``response_len`` ids of ``input_ids``."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).logits
    # Logits at position i predict token i+1. Divided in float32: bf16 logits (autocast) keep 8 bits.
    logits = logits[:, -response_len - 1 : -1].float() / temperature  # [batch, response_len, vocab]
    return ppo.logprobs_from_logits(logits, tokens), logits


def critic_forward(critic, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value of the state that emitted it.  # [batch, response_len]"""
    values = critic(input_ids, attention_mask, position_ids(attention_mask))
    return values[:, -response_len - 1 : -1]


def reuse_rollout_logprobs(gen: Generation, cfg: PPOConfig, logprob_temperature: float, mixed: bool) -> bool:
    """Whether the sampling pass's log-probs stand in for a training forward (see PPOConfig).

    ``logprob_temperature``: the one log-probs are scored at; ``mixed``: whether training runs in
    mixed precision (training/precision.py).
    """
    if gen.logprobs is None:
        if cfg.rollout_logprobs == "reuse":
            raise ValueError(
                "ppo.rollout_logprobs='reuse' needs the KV generation engine (model.generation_engine "
                "'auto', 'kv' or 'graph', on a Qwen2/Llama/Mistral model); set ppo.rollout_logprobs to 'auto' or 'recompute'"
            )
        return False
    if logprob_temperature != cfg.temperature:
        if cfg.rollout_logprobs == "reuse":
            raise ValueError(
                f"ppo.rollout_logprobs='reuse' takes the log-probs the sampler drew at ppo.temperature="
                f"{cfg.temperature}, but ppo.logprob_temperature={logprob_temperature} asks for others; "
                "set ppo.rollout_logprobs to 'auto' or 'recompute'"
            )
        return False
    if cfg.rollout_logprobs == "auto":
        # Mixed precision (the sampling copy and autocast, or DeepSpeed's bf16 weights) changes the
        # training forward.
        return not mixed
    return cfg.rollout_logprobs == "reuse"


def experience(batch: Scored, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Advantages, returns and the step's metrics, over ``batch`` as a whole."""
    mask = batch.response_mask
    rewards, kl = ppo.token_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, mask, cfg.kl_coef)
    advantages, returns = ppo.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
    if cfg.advantage_norm != "none":
        advantages = ppo.masked_whiten(advantages, mask, shift_mean=cfg.advantage_norm == "whiten")

    lengths = mask.sum(1)
    correct = batch.correct
    metrics = {
        "reward": batch.scores.mean().item(),
        "accuracy": correct.float().mean().item(),
        "boxed_rate": float(np.mean(batch.boxed.numpy())),
        "response_length": lengths.mean().item(),
        "response_length_correct": lengths[correct].mean().item() if correct.any() else float("nan"),
        "response_length_incorrect": lengths[~correct].mean().item() if (~correct).any() else float("nan"),
        "truncation_rate": batch.truncated.float().mean().item(),
        "kl": (kl.sum(1)).mean().item(),
        "entropy": ppo.masked_mean(batch.entropy, mask).item(),
        "explained_variance": ppo.explained_variance(batch.values, returns, mask),
        "generated_tokens": lengths.sum().item(),
    }
    return advantages, returns, metrics
