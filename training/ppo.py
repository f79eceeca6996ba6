"""PPO's equations, one function each, on padded [batch, response_len] tensors.

Naming follows the math: ``logprobs`` are log pi(a_t | s_t) of the response tokens,
``values`` V(s_t), ``advantages`` A_t from GAE, ``returns`` A_t + V(s_t). Every
tensor is [batch, response_len] with a ``mask`` that is 1 on generated tokens (up to
and including the end-of-sequence token) and 0 on the right padding after it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossAggMode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True) -> torch.Tensor:
    """Unit variance over the valid tokens of the whole batch; zero mean too when ``shift_mean``."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    centred = x - mean if shift_mean else x
    return (centred * torch.rsqrt(var + eps)) * mask


def response_mask(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first end-of-sequence token, 0 after it.  # [batch, response_len]"""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]; logits [batch, len, vocab], tokens [batch, len]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * k1 on every token, plus the score on the last one.

    k1 = log pi(a_t|s_t) - log pi_ref(a_t|s_t). Returns (rewards, kl), both [batch, response_len].
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # [batch]
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the response tokens.

    A_t = delta_t + gamma * lam * A_{t+1},  delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),
    with V = 0 after the last generated token. Returns (advantages, returns).
    """
    rewards, values = rewards * mask, values * mask
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(batch, device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggMode,
    *,
    num_seqs: int,
    num_tokens: float,
    max_len: int,
) -> torch.Tensor:
    """Reduce a [batch, len] loss to a scalar the way ``mode`` says.

    ``num_seqs`` and ``num_tokens`` count the whole mini-batch, so summing this over
    its micro-batches gives exactly the loss of the mini-batch in one piece:
    - seq-mean-token-mean: mean over responses of each response's token mean (the paper's);
    - token-mean: mean over all tokens of the mini-batch;
    - seq-mean-token-sum-norm: token sum divided by a constant, num_seqs * max_len (Dr. GRPO).
    """
    summed = loss_mat * mask
    if mode == "token-mean":
        return summed.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = summed.sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        return summed.sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def policy_loss_matrix(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, per token: max(-A * r, -A * clip(r, 1-eps, 1+eps)).

    Returns (loss [batch, len], clipped [batch, len] as 0/1).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss_matrix(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (V_clip - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)
