"""Sampling responses from a causal LM in batches: rollouts, curation and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from concise_rl.errors import ConfigError
from concise_rl.training import kv_decode
from concise_rl.training.ppo import response_mask

ENGINES = ("auto", "kv", "hf")


@dataclass
class Generation:
    """Prompts and sampled responses as padded tensors plus decoded text."""

    prompt_ids: torch.Tensor  # [batch, prompt_len], left padded
    prompt_mask: torch.Tensor  # [batch, prompt_len]
    response_ids: torch.Tensor  # [batch, response_len], right padded
    response_mask: torch.Tensor  # [batch, response_len], 1 up to and including EOS
    truncated: torch.Tensor  # [batch], True where no EOS came within max_new_tokens
    texts: list[str]
    # From the KV engine only (None from HF generate): per-token log-prob and entropy of the
    # temperature-scaled sampling distribution, 0 after EOS.  # [batch, response_len]
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:  # [batch], tokens generated (EOS included)
        return self.response_mask.sum(1).long()


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def check_prompt_lengths(tokenizer, prompts: list[str], names: list[str], max_prompt_tokens: int) -> None:
    """Refuse prompts longer than ``prompt.max_prompt_tokens`` before any sampling, naming the longest one's problem."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    over = [(n, name) for n, name in zip(lengths, names) if n > max_prompt_tokens]
    if over:
        longest, name = max(over)
        raise ConfigError(
            f"problem {name!r}: its prompt is {longest} tokens, over prompt.max_prompt_tokens={max_prompt_tokens} "
            f"({len(over)} of {len(prompts)} prompts are too long); raise prompt.max_prompt_tokens to at least "
            f"{longest} or shorten or drop those problems"
        )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int | None = None,
    desc: str | None = None,
    engine: str = "auto",
) -> Generation:
    """Sample one response per prompt (greedy at temperature 0).

    All prompts are left-padded to one width and all responses right-padded to
    ``max_new_tokens``, so rows from different batches line up in one tensor.
    ``engine``: "kv" is training/kv_decode.py (Llama-family models), "hf" is
    ``model.generate``, "auto" takes "kv" where the model supports it.
    """
    if engine not in ENGINES:
        raise ValueError(f"generation engine must be one of {ENGINES}, got {engine!r}")
    use_kv = engine == "kv" or (engine == "auto" and kv_decode.supports(model))
    decoder = kv_decode.KVDecoder(model) if use_kv else None
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = enc.input_ids, enc.attention_mask
    if max_prompt_tokens is not None and prompt_ids.shape[1] > max_prompt_tokens:
        longest = int(prompt_mask.sum(1).argmax())
        raise ConfigError(
            f"prompt {longest} is {int(prompt_mask[longest].sum())} tokens, over prompt.max_prompt_tokens="
            f"{max_prompt_tokens}; raise prompt.max_prompt_tokens or shorten the problem"
        )
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(prompts), max_new_tokens) if use_kv else None
    entropy = torch.zeros(len(prompts), max_new_tokens) if use_kv else None
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False, unit="batch"):
        ids = prompt_ids[start : start + batch_size].to(device)
        mask = prompt_mask[start : start + batch_size].to(device)
        rows = slice(start, start + len(ids))
        if decoder is not None:
            tokens, lp, ent = decoder.generate(
                ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids, pad_token_id=pad_id,
                temperature=temperature, top_p=top_p,
            )
            responses[rows], logprobs[rows], entropy[rows] = tokens.cpu(), lp.cpu(), ent.cpu()
            continue
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **(sampling if temperature > 0 else greedy),
        )
        new = out[:, ids.shape[1] :].cpu()
        responses[rows, : new.shape[1]] = new
    model.train(was_training)
    mask = response_mask(responses, eos_ids)
    truncated = ~torch.isin(responses, torch.tensor(eos_ids)).any(1)
    # Pad fills the space after EOS; a pad id equal to EOS must not end the mask early.
    texts = tokenizer.batch_decode(responses * mask.long() + pad_id * (1 - mask.long()), skip_special_tokens=True)
    return Generation(prompt_ids, prompt_mask, responses, mask, truncated, texts, logprobs, entropy)
