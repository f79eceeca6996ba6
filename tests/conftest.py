"""Shared fixtures: a tiny Qwen2 model and tokenizer saved in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.mechanism import tiny_random_model
from concise_rl.config import PromptConfig
from training.models import format_prompt, load_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 1-layer Qwen2 with the project's own tokenizer (chat template included)."""
    out = tiny_random_model(tmp_path_factory.mktemp("tiny-model"))
    assert format_prompt("x", load_tokenizer(str(out)), PromptConfig()).endswith("<|im_start|>assistant\n")
    return out
