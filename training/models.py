"""Loading policies, critics and tokenizers the same way for every model.

Every model, the embedded default included, is a Hugging Face directory or hub id
loaded with ``from_pretrained``; remote code runs only when the config allows it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging as hf_logging

from concise_rl import paths
from concise_rl.config import ModelConfig, PromptConfig, stable_hash
from concise_rl.errors import ConfigError, ModelLoadError
from concise_rl.training.precision import DTYPES

EMBEDDED_PREFIX = "embedded:"


def _embedded_code_hash() -> str:
    """The task and the build recipe are part of the model's identity, not only its config."""
    from concise_rl import synthetic
    from concise_rl.training import embedded

    return stable_hash([Path(m.__file__).read_text() for m in (synthetic, embedded)])


def embedded_dir(cfg: ModelConfig) -> Path:
    """Where the embedded model of this shape and recipe lives (built there when absent)."""
    name = cfg.name_or_path[len(EMBEDDED_PREFIX) :] or "demo"
    key = stable_hash({"config": cfg.embedded.model_dump(exclude={"use_prebuilt"}), "code": _embedded_code_hash()})
    return paths.models() / f"embedded-{name}-{key}"


def is_embedded(cfg: ModelConfig) -> bool:
    return cfg.name_or_path.startswith(EMBEDDED_PREFIX)


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def check_model_path(name_or_path: str) -> None:
    """Refuse a local-looking model path that is not a directory (before it is taken for a hub id)."""
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise ModelLoadError(
            f"model path {name_or_path} does not exist or is not a directory; "
            "set model.name_or_path to a Hugging Face model folder or a hub id"
        )


@contextlib.contextmanager
def _no_remote_code(name_or_path: str) -> Iterator[None]:
    """transformers refuses a model whose config points at its own code (auto_map) unless trusted: say what to set."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelLoadError(
            f"model {name_or_path} ships its own Python code (auto_map in its config), and model.trust_remote_code "
            "is false, so that code was not run; set model.trust_remote_code=true only if you trust the code, "
            "or use a model transformers supports without it"
        ) from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, prompt: PromptConfig | None = None):
    check_model_path(name_or_path)
    with _no_remote_code(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if prompt is not None and prompt.use_chat_template and not tokenizer.chat_template:
        raise ModelLoadError(
            f"tokenizer of {name_or_path} has no chat template; add one to tokenizer_config.json "
            "or set prompt.use_chat_template=false to feed plain prompts"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Prompts are left-padded so every response starts at the same column.
    tokenizer.padding_side = "left"
    return tokenizer


def freeze_all_but_top_layers(model: nn.Module, n: int, parts: str = "all") -> int:
    """Leave only the top ``n`` decoder layers, the final norm and an untied output head trainable.

    ``parts="mlp"`` trains only those layers' feed-forward blocks and the norms in front of them,
    and keeps their attention frozen.

    Returns how many weights stay trainable. The layers are the decoder's ``layers`` list, which
    Qwen2, Llama and Mistral models all have; tied output heads are the input embeddings and
    stay frozen with them. A model without such layers, or with fewer than ``n``, is a
    ConfigError, which the CLI reports in one line as bad input.
    """
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__} has no list of decoder layers; ppo.actor_trainable_layers needs a "
            "Qwen2/Llama/Mistral-style model, or leave it unset to train every weight"
        )
    if n > len(layers):
        raise ConfigError(
            f"ppo.actor_trainable_layers is {n} but the model has {len(layers)} decoder layers; "
            f"use at most {len(layers)}, or leave it unset to train every weight"
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - n :]:
        if parts == "all":
            layer.requires_grad_(True)
            continue
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ConfigError(
                f"{type(layer).__name__} has no `mlp` block; ppo.actor_trainable_parts: mlp needs a "
                "Qwen2/Llama/Mistral-style decoder layer, or set it to 'all'"
            )
        mlp.requires_grad_(True)
        norm = getattr(layer, "post_attention_layernorm", None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    norm = getattr(decoder, "norm", None)
    if isinstance(norm, nn.Module):
        norm.requires_grad_(True)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(True)
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Checkpointed blocks recompute from their inputs; with the embeddings frozen those inputs
        # carry no grad, and the frozen-input path would drop the top layers' gradients.
        model.enable_input_require_grads()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_policy(
    name_or_path: str, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """The causal LM in ``dtype`` (default ``model.dtype``; training passes float32 for its master weights)."""
    check_model_path(name_or_path)
    with _no_remote_code(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if is_deepspeed_zero3_enabled():
        return model  # loaded in shards onto each process's device (ZeRO-3 zero.Init); DeepSpeed places it
    return model.to(device)


class Critic(nn.Module):
    """The policy's transformer body with a scalar value head, one value per token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(
        cls, name_or_path: str, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Critic:
        """Initialise the critic from the policy's weights, as the paper's code does, in ``dtype`` (default
        ``model.dtype``)."""
        check_model_path(name_or_path)
        dtype = dtype or DTYPES[cfg.dtype]
        # Loading the body alone leaves the LM head unused; that is the point, not a warning.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with _no_remote_code(name_or_path):
                backbone = AutoModel.from_pretrained(
                    name_or_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
                )
        finally:
            hf_logging.set_verbosity(previous)
        if cfg.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        critic = cls(backbone, backbone.config.hidden_size)
        if is_deepspeed_zero3_enabled():
            # The body is sharded already (see load_policy), in DeepSpeed's precision: the head joins it.
            critic.value_head.to(dtype=next(backbone.parameters()).dtype)
            return critic
        return critic.to(device=device, dtype=dtype)

    def forward(self, input_ids, attention_mask, position_ids):  # -> [batch, seq]
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.value_head(out.last_hidden_state).squeeze(-1).float()

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: Path) -> None:
        self.load_state_dict(load_file(str(path)))


def user_text(question: str, prompt: PromptConfig) -> str:
    """The user turn for ``question`` (the whole prompt without a chat template): ``prompt.template``
    filled in, or by default the question, a newline and the instruction."""
    if prompt.template is None:
        if prompt.use_chat_template and prompt.style == "qwen-math":
            return question
        return f"{question}\n{prompt.instruction}" if prompt.instruction else question
    # One pass: braces in the question (LaTeX is full of them) are never read as fields.
    values = {"question": question, "instruction": prompt.instruction}
    return re.sub(r"\{(question|instruction)\}", lambda m: values[m.group(1)], prompt.template)


def format_prompt(question: str, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig) -> str:
    """The text the model is conditioned on for one problem, in the prompt style of its family.

    r1 (DeepSeek-R1-Distill): one user turn (``user_text``: by default the question then the
    instruction). qwen-math (Qwen2.5-Math's CoT template): the instruction as the system turn,
    the question as the user turn. Without a chat template: ``user_text`` as it is, which is
    how the paper fed the base Qwen2.5-Math-7B prompts written out in ChatML.
    """
    if not prompt.use_chat_template:
        return user_text(question, prompt)
    return tokenizer.apply_chat_template(prompt_messages(question, prompt), tokenize=False, add_generation_prompt=True)


def prompt_messages(question: str, prompt: PromptConfig) -> list[dict[str, str]]:
    """The chat turns of one problem's prompt (see ``format_prompt``)."""
    content = user_text(question, prompt)
    if prompt.style == "qwen-math" and prompt.instruction:
        return [{"role": "system", "content": prompt.instruction}, {"role": "user", "content": content}]
    return [{"role": "user", "content": content}]
