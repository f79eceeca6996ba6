"""The recorded decode step (training/graph_decode.py) against the eager KV engine and the training forward.

On a CPU the step runs eagerly (the arithmetic a CUDA graph records, with the same bucket
moves) and compiled by torch.compile (inductor); the CUDA-graph backend itself needs a GPU
and is exercised by ``python -m bench.gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.mechanism import tiny_policy
from concise_rl.config import PromptConfig
from concise_rl.errors import ConfigError
from concise_rl.synthetic import generate_problems
from concise_rl.training import graph_decode, kv_decode, prebuilt
from concise_rl.training.generation import eos_token_ids, generate
from concise_rl.training.models import format_prompt, load_tokenizer
from concise_rl.training.ppo import response_mask
from tests.test_kv_decode import assert_matches_the_training_forward

MAX_NEW = 40
BASE_NEW = 128  # the demo base's greedy answers end between ~40 and 128 tokens


def _load(folder: Path, n: int, seed: int):
    """A model, its tokenizer, and ``n`` held-out prompts of different lengths (left-padded ids and mask)."""
    tok = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    problems = generate_problems(n, seed=seed, min_level=1, max_level=6, split="heldout")
    prompts = [format_prompt(p.prompt, tok, PromptConfig()) for p in problems]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model, tok, prompts, enc.input_ids, enc.attention_mask


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A 1-layer GQA Qwen2 trained to stop after ~12 tokens: sampled rows end at different steps
    (greedy, it ends at once)."""
    return _load(tiny_policy(tmp_path_factory.mktemp("graph-policy")), 24, seed=5)


@pytest.fixture(scope="module")
def base():
    """The demo's shipped base: greedy answers that end at different lengths (one bucket move after another)."""
    return _load(prebuilt.PREBUILT / next(iter(prebuilt.manifest())), 16, seed=3)


def _sample(decoder, policy, temperature: float, seed: int = 1, top_p: float = 1.0, max_new: int = MAX_NEW):
    model, tok, _, ids, mask = policy
    return decoder.generate(ids, mask, max_new_tokens=max_new, eos_token_ids=eos_token_ids(model, tok),
                            pad_token_id=tok.pad_token_id, temperature=temperature, top_p=top_p,
                            generator=torch.Generator().manual_seed(seed))


def test_row_buckets_halve_through_their_halfway_points() -> None:
    assert graph_decode.row_buckets(256) == [256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert graph_decode.row_buckets(100) == [100, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert graph_decode.row_buckets(1) == [1]


def test_greedy_gives_the_kv_engines_tokens_through_every_bucket_move(base) -> None:
    tokens, logprobs, entropy = _sample(kv_decode.KVDecoder(base[0]), base, 0.0, max_new=BASE_NEW)
    decoder = graph_decode.GraphDecoder(base[0], backend="eager", key_block=32)
    g_tokens, g_logprobs, g_entropy = _sample(decoder, base, 0.0, max_new=BASE_NEW)
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logprobs, logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(g_entropy, entropy, atol=1e-4, rtol=0)
    rows = [r for r, _ in decoder.visited]
    keys = [k for _, k in decoder.visited]
    assert len(set(rows)) >= 3 and rows == sorted(rows, reverse=True), decoder.visited  # rows moved down
    assert len(set(keys)) >= 2 and keys[0] < keys[-1], decoder.visited  # attention read more columns as it went


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_logprobs_match_the_training_forward(policy, top_p: float) -> None:
    """At T = 0.7 the rows a bucket move leaves behind and the idle rows it pads with must not leak into
    the outputs: every token's log-prob and entropy match a full forward over prompt + response."""
    model, tok, _, ids, mask = policy
    decoder = graph_decode.GraphDecoder(model, backend="eager", key_block=16)
    tokens, logprobs, entropy = _sample(decoder, policy, 0.7, top_p=top_p)
    eos = eos_token_ids(model, tok)
    rmask = response_mask(tokens, eos).bool()
    lengths = rmask.sum(1)
    assert len({r for r, _ in decoder.visited}) >= 3 and (lengths < MAX_NEW).float().mean() > 0.5, lengths.tolist()
    assert (tokens[~rmask] == tok.pad_token_id).all()
    assert (logprobs[~rmask] == 0).all() and (entropy[~rmask] == 0).all()
    assert_matches_the_training_forward(model, ids, mask, tokens, logprobs, entropy, rmask, 0.7)


def test_the_same_seed_samples_the_same_tokens(policy) -> None:
    decoder = graph_decode.GraphDecoder(policy[0], backend="eager", key_block=16)
    first = _sample(decoder, policy, 0.7, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, _sample(decoder, policy, 0.7, seed=3), strict=True))
    assert not torch.equal(first[0], _sample(decoder, policy, 0.7, seed=4)[0])


def test_compiled_step_gives_the_eager_engines_tokens_through_generate(base) -> None:
    """The path a CPU takes for ``model.generation_engine: graph``: torch.compile (inductor) per bucket."""
    model, tok, prompts, _, _ = base
    kwargs = {"temperature": 0.0, "max_new_tokens": BASE_NEW, "batch_size": 6}
    try:
        graph = generate(model, tok, prompts[:6], engine="graph", **kwargs)
    except ConfigError as exc:
        if "C++ compiler" in str(exc):
            pytest.skip(f"torch.compile cannot compile on this machine: {exc}")
        raise
    kv = generate(model, tok, prompts[:6], engine="kv", **kwargs)
    assert torch.equal(graph.response_ids, kv.response_ids)
    assert graph.texts == kv.texts and torch.equal(graph.truncated, kv.truncated)
    torch.testing.assert_close(graph.logprobs, kv.logprobs, atol=1e-4, rtol=0)
    assert len(set(graph.lengths.tolist())) >= 2, "rows ended at different steps, so a smaller bucket ran too"


def test_cuda_graphs_need_a_gpu(policy) -> None:
    with pytest.raises(ConfigError, match="records CUDA graphs, but the model is on cpu"):
        graph_decode.GraphDecoder(policy[0], backend="cuda-graph")
    with pytest.raises(ValueError, match="backend must be one of"):
        graph_decode.GraphDecoder(policy[0], backend="triton")
