"""The KV-cache decoder against transformers' generate and the training forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bench.mechanism import tiny_policy
from concise_rl.config import PromptConfig
from concise_rl.synthetic import generate_problems
from concise_rl.training import kv_decode
from concise_rl.training.experience import policy_forward
from concise_rl.training.generation import eos_token_ids, generate
from concise_rl.training.models import format_prompt, load_tokenizer
from concise_rl.training.ppo import response_mask


@pytest.fixture(scope="module")
def stopping_policy(tmp_path_factory) -> Path:
    """A 1-layer GQA Qwen2 trained to stop after ~12 tokens, so rows end at different steps."""
    return tiny_policy(tmp_path_factory.mktemp("kv-policy"))


def _prompts(tok, n: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    problems = generate_problems(n, seed=seed, min_level=1, max_level=6, split="heldout")
    enc = tok([format_prompt(p.prompt, tok, PromptConfig()) for p in problems], return_tensors="pt", padding=True,
              add_special_tokens=False)
    assert (enc.attention_mask == 0).any(), "prompts of different lengths, so left padding is exercised"
    return enc.input_ids, enc.attention_mask


def _model_like(kind: str, vocab: int, eos: int, pad: int):
    """A random 2-layer model with 4 query heads over 2 KV heads (grouped-query attention)."""
    shape = {"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 512, "eos_token_id": eos,
             "pad_token_id": pad}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape))
    return model.eval()


def _hf_greedy(model, ids, mask, n: int, eos: list[int], pad: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    tokens = torch.full((len(ids), n), pad)
    tokens[:, : out.shape[1] - ids.shape[1]] = out[:, ids.shape[1]:]
    return tokens * response_mask(tokens, eos).long()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_matches_hf_generate_exactly(tiny_model_dir: Path, kind: str) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = _model_like(kind, len(tok), tok.eos_token_id, tok.pad_token_id)
    ids, mask = _prompts(tok, 12)
    eos = [tok.eos_token_id]
    tokens, _, _ = kv_decode.KVDecoder(model).generate(
        ids, mask, max_new_tokens=24, eos_token_ids=eos, pad_token_id=tok.pad_token_id, temperature=0.0
    )
    assert torch.equal(tokens * response_mask(tokens, eos).long(), _hf_greedy(model, ids, mask, 24, eos, tok.pad_token_id))


def test_greedy_matches_hf_when_rows_stop_early(stopping_policy: Path) -> None:
    tok = load_tokenizer(str(stopping_policy))
    model = AutoModelForCausalLM.from_pretrained(stopping_policy).eval()
    ids, mask = _prompts(tok, 16)
    eos = eos_token_ids(model, tok)
    tokens, _, _ = kv_decode.KVDecoder(model).generate(
        ids, mask, max_new_tokens=40, eos_token_ids=eos, pad_token_id=tok.pad_token_id, temperature=0.0
    )
    assert torch.equal(tokens * response_mask(tokens, eos).long(), _hf_greedy(model, ids, mask, 40, eos, tok.pad_token_id))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_logprobs_match_the_training_forward(stopping_policy: Path, top_p: float) -> None:
    """Rows end at different steps (the cache is compacted on the way); every token's log-prob
    and entropy still match a full forward pass over prompt + response to 1e-4."""
    tok = load_tokenizer(str(stopping_policy))
    model = AutoModelForCausalLM.from_pretrained(stopping_policy).eval()
    ids, mask = _prompts(tok, 48)
    eos = eos_token_ids(model, tok)
    gen = torch.Generator().manual_seed(1)
    tokens, logprobs, entropy = kv_decode.KVDecoder(model).generate(
        ids, mask, max_new_tokens=40, eos_token_ids=eos, pad_token_id=tok.pad_token_id, temperature=0.7,
        top_p=top_p, generator=gen,
    )
    rmask = response_mask(tokens, eos).bool()
    lengths = rmask.sum(1)
    assert len(set(lengths.tolist())) >= 5 and (lengths < 40).float().mean() > 0.5, lengths.tolist()
    assert (logprobs[~rmask] == 0).all() and (entropy[~rmask] == 0).all()
    assert_matches_the_training_forward(model, ids, mask, tokens, logprobs, entropy, rmask, 0.7)


def assert_matches_the_training_forward(model, ids, mask, tokens, logprobs, entropy, rmask, temperature: float):
    """Every sampled token's log-prob and entropy (where ``rmask``) equal, to 1e-4, those of one training
    forward pass over prompt + response at ``temperature``."""
    width = int(rmask.sum(1).max())
    full_ids = torch.cat([ids, tokens[:, :width]], 1)
    full_mask = torch.cat([mask, rmask[:, :width].long()], 1)
    with torch.no_grad():
        expected, logits = policy_forward(model, full_ids, full_mask, width, temperature, tokens[:, :width])
    m = rmask[:, :width]
    torch.testing.assert_close(logprobs[:, :width][m], expected[m], atol=1e-4, rtol=0)
    ent = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy[:, :width][m], ent[m], atol=1e-4, rtol=0)


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.9, 0.02, 0.02, 0.01]]))
    kept = kv_decode._nucleus(logits, 0.8).isfinite()
    assert kept.tolist() == [[True, True, True, False, False], [False, True, False, False, False]]
    assert kv_decode._nucleus(logits, 1.0).isfinite().all()


def test_sampler_draws_from_the_given_distribution() -> None:
    probs = torch.tensor([0.0, 0.1, 0.6, 0.0, 0.3]).repeat(20_000, 1)
    draws = kv_decode._sample(probs, torch.rand(len(probs), 1, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[0] == 0 and freq[3] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)


def test_generate_uses_kv_engine_only_where_supported(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir), prompt=PromptConfig())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [format_prompt("Start with 3.", tok, PromptConfig())]
    assert generate(model, tok, prompts, temperature=0.0, max_new_tokens=4, batch_size=1).logprobs is not None
    assert generate(model, tok, prompts, temperature=0.0, max_new_tokens=4, batch_size=1, engine="hf").logprobs is None
    with pytest.raises(ValueError, match="generation engine must be one of"):
        generate(model, tok, prompts, temperature=0.0, max_new_tokens=4, batch_size=1, engine="vllm")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                      eos_token_id=tok.eos_token_id)).eval()
    assert not kv_decode.supports(gpt2)
    assert generate(gpt2, tok, prompts, temperature=0.0, max_new_tokens=4, batch_size=1).logprobs is None
    with pytest.raises(ValueError, match="Use generation engine 'hf'"):
        kv_decode.KVDecoder(gpt2)
    sliding = Qwen2Config(**{**model.config.to_dict(), "use_sliding_window": True, "sliding_window": 8})
    assert not kv_decode.supports(Qwen2ForCausalLM(sliding))
