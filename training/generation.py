"""Sampling responses from a causal LM in batches: rollouts, curation and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from concise_rl.errors import ConfigError
from concise_rl.training import graph_decode, kv_decode, preempt
from concise_rl.training.ppo import response_mask

ENGINES = ("auto", "kv", "graph", "hf")


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


def context_length(model_or_dir) -> int | None:
    """The positions a model takes (``max_position_embeddings``), from a loaded model or a folder's
    config.json; None when its config does not say."""
    config = getattr(model_or_dir, "config", None)
    if config is not None:
        value = getattr(config, "max_position_embeddings", None)
    else:
        file = Path(model_or_dir) / "config.json"
        value = json.loads(file.read_text(encoding="utf-8")).get("max_position_embeddings") if file.is_file() else None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_prompts(
    tokenizer, sets: dict[str, tuple[list[str], list[str]]], max_prompt_tokens: int, *,
    max_new_tokens: int | None = None, new_tokens_key: str = "max_new_tokens", context: int | None = None,
) -> None:
    """Refuse, before any sampling and for every set at once, prompts that do not fit.

    ``sets`` maps a set's name to (problem names, formatted prompts). A prompt must fit
    ``prompt.max_prompt_tokens``, and the longest prompt plus ``max_new_tokens`` must fit
    the model's ``context`` (its positions): past them a rotary model still runs but
    answers from positions it never saw, so its figures would mean nothing. One message
    names every set that fails and what to change, so a fix is not found one set at a time.
    """
    over_limit, over_context = [], []
    for set_name, (names, prompts) in sets.items():
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids] if prompts else []
        if not lengths:
            continue
        longest, name = max(zip(lengths, names))
        too_long = sum(n > max_prompt_tokens for n in lengths)
        if too_long:
            over_limit.append((set_name, too_long, len(lengths), longest, name))
        if context is not None and max_new_tokens is not None and longest + max_new_tokens > context:
            over_context.append((set_name, longest))
    if not over_limit and not over_context:
        return
    parts = [f"{s}: {k} of {n} prompts are over prompt.max_prompt_tokens={max_prompt_tokens}, the longest "
             f"{longest} tokens (problem {name!r})" for s, k, n, longest, name in over_limit]
    parts += [f"{s}: its longest prompt ({longest} tokens) plus {new_tokens_key}={max_new_tokens} needs "
              f"{longest + max_new_tokens} positions, over the model's {context} (max_position_embeddings)"
              for s, longest in over_context]
    advice = []
    unfit = {s for s, _ in over_context}
    fit = [longest for s, _, _, longest, _ in over_limit if s not in unfit]
    if fit:
        advice.append(f"Raise prompt.max_prompt_tokens to at least {max(fit)} (--set prompt.max_prompt_tokens="
                      f"{max(fit)}), or shorten or drop those problems.")
    if unfit:
        room = context - max(longest for _, longest in over_context)
        advice.append(f"This model cannot take {', '.join(sorted(unfit))} whole: drop "
                      f"{'it' if len(unfit) == 1 else 'them'}, limit the problems, or lower {new_tokens_key}"
                      + (f" to at most {room}." if room > 0 else "."))
    raise ConfigError(f"prompts that do not fit: {'; '.join(parts)}. {' '.join(advice)}")


class _Preempted(StoppingCriteria):
    """Ends HF ``generate`` at the next token when a preemption may drop the rollout (training/preempt.py)."""

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), preempt.STATE.signum is not None and preempt.STATE.abandon_ok,
                          dtype=torch.bool, device=input_ids.device)


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
    ``engine``: "kv" is training/kv_decode.py (Llama-family models), "graph" the same
    sampling with the decode step recorded (training/graph_decode.py: CUDA graphs on a
    GPU, torch.compile on a CPU), "hf" is ``model.generate``, "auto" takes "kv" where the
    model supports it.
    """
    if engine not in ENGINES:
        raise ValueError(f"generation engine must be one of {ENGINES}, got {engine!r}")
    use_kv = engine in ("kv", "graph") or (engine == "auto" and kv_decode.supports(model))
    decoder = (graph_decode.GraphDecoder(model) if engine == "graph"
               else kv_decode.KVDecoder(model) if use_kv else None)
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
        preempt.check()
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
            stopping_criteria=[_Preempted()],
            **(sampling if temperature > 0 else greedy),
        )
        preempt.check()  # generate stopped early for a preemption: drop what it returned
        new = out[:, ids.shape[1] :].cpu()
        responses[rows, : new.shape[1]] = new
    model.train(was_training)
    mask = response_mask(responses, eos_ids)
    truncated = ~torch.isin(responses, torch.tensor(eos_ids)).any(1)
    # Pad fills the space after EOS; a pad id equal to EOS must not end the mask early.
    texts = tokenizer.batch_decode(responses * mask.long() + pad_id * (1 - mask.long()), skip_special_tokens=True)
    return Generation(prompt_ids, prompt_mask, responses, mask, truncated, texts, logprobs, entropy)
