"""Model and tokenizer loading: the same from_pretrained path for local dirs and hub ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from concise_rl.config import ModelConfig, PromptConfig
from concise_rl.training.generation import generate
from concise_rl.training.models import Critic, ModelLoadError, format_prompt, load_policy, load_tokenizer


def test_local_model_loads_and_generates(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir), prompt=PromptConfig())
    model = load_policy(str(tiny_model_dir), ModelConfig())
    assert tok.padding_side == "left" and tok.pad_token is not None
    prompts = [format_prompt("Start with 3. Add 4.", tok, PromptConfig()), format_prompt("Start with 1.", tok, PromptConfig())]
    torch.manual_seed(0)
    gen = generate(model, tok, prompts, temperature=0.0, max_new_tokens=8, batch_size=1)
    assert gen.response_ids.shape == (2, 8)
    assert gen.lengths.tolist() == gen.response_mask.sum(1).long().tolist()
    assert all(0 < n <= 8 for n in gen.lengths.tolist())
    # Greedy decoding is deterministic whatever the batch size.
    again = generate(model, tok, prompts, temperature=0.0, max_new_tokens=8, batch_size=2)
    assert torch.equal(gen.response_ids * gen.response_mask.long(), again.response_ids * again.response_mask.long())


def test_critic_starts_from_policy_weights(tiny_model_dir: Path) -> None:
    policy = load_policy(str(tiny_model_dir), ModelConfig())
    critic = Critic.from_policy(str(tiny_model_dir), ModelConfig())
    torch.testing.assert_close(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    ids = torch.tensor([[5, 6, 7]])
    values = critic(ids, torch.ones_like(ids), torch.arange(3)[None])
    assert values.shape == (1, 3) and values.dtype == torch.float32


def test_missing_local_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*model.name_or_path"):
        load_policy(str(missing), ModelConfig())
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(missing))


def without_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` whose tokenizer has no chat template (in any of the places it can be kept)."""
    shutil.copytree(model_dir, out)
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    cfg_file = out / "tokenizer_config.json"
    data = json.loads(cfg_file.read_text())
    data.pop("chat_template", None)
    cfg_file.write_text(json.dumps(data))
    return out


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = without_chat_template(tiny_model_dir, tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="no chat template.*use_chat_template"):
        load_tokenizer(str(plain), prompt=PromptConfig())
    tok = load_tokenizer(str(plain), prompt=PromptConfig(use_chat_template=False))
    assert format_prompt("Q", tok, PromptConfig(use_chat_template=False)) == "Q\n" + PromptConfig().instruction


def test_prompt_longer_than_limit_is_refused(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_policy(str(tiny_model_dir), ModelConfig())
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(model, tok, ["Start with 3. " * 50], temperature=0.0, max_new_tokens=2, batch_size=1,
                 max_prompt_tokens=16)
