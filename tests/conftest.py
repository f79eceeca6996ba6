"""Shared fixtures: a tiny Qwen2 model and tokenizer saved in Hugging Face format."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import PromptConfig
from concise_rl.synthetic import generate_problems, reasoning_trace
from training.embedded import build_tokenizer
from training.models import format_prompt

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 1-layer Qwen2 with the project's own tokenizer (chat template included)."""
    out = tmp_path_factory.mktemp("tiny-model")
    rng = random.Random(0)
    problems = generate_problems(200, seed=0, min_level=1, max_level=4, split="train", distinct=False)
    corpus = [p.prompt + "\n" + PromptConfig().instruction + "\n" + reasoning_trace(p.prompt, rng) for p in problems]
    tokenizer = build_tokenizer(corpus, 300)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert format_prompt("x", tokenizer, PromptConfig()).endswith("<|im_start|>assistant\n")
    return out
