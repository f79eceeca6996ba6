"""The embedded default: a small Qwen2 model and tokenizer the project builds itself.

No weights can be downloaded on the machines this must run on, so the demo trains
its own base: a byte-level BPE tokenizer fitted on the task's text, a
Qwen2-architecture model from random init, and supervised fine-tuning (transformers'
Trainer, in the precision ``model.embedded.sft_dtype`` states) on verbose
chain-of-thought traces. The result is saved in Hugging Face
format, so every later stage loads it with the same code as a real model.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import EmbeddedModelConfig, PromptConfig
from concise_rl.synthetic import generate_problems, reasoning_trace
from concise_rl.training.models import format_prompt, prompt_messages

log = logging.getLogger(__name__)

EOS = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS]
# Qwen2's chat template, reduced to user and assistant turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


SFT_MIN_LEVEL = 2
SFT_MAX_LEVEL = 8


# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, whitespace.
# transformers >= 5 rebuilds a saved Qwen2 tokenizer from its vocabulary and merges
# with exactly this split (and NFC), so the tokenizer must be fitted with it too:
# otherwise the reloaded tokenizer cuts text differently from the one the model
# was trained with.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer(
    corpus: list[str],
    vocab_size: int,
    *,
    special_tokens: list[str] = SPECIAL_TOKENS,
    eos: str = EOS,
    pad: str = PAD,
    bos: str | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Qwen2's, with digits split one per token so arithmetic is learnable.

    The special tokens and chat template default to the embedded model's (Qwen2's ChatML);
    tests pass a real model family's to build a tiny stand-in for it.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        **({"bos_token": bos} if bos is not None else {}),
        chat_template=chat_template,
        padding_side="left",
        model_max_length=4096,
    )


def check_reload(tokenizer: PreTrainedTokenizerFast, saved: Path, texts: list[str]) -> None:
    """The saved tokenizer, loaded the way the pipeline loads it, must cut text like the trained one."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(saved)
    for text in texts:
        if loaded(text).input_ids != tokenizer(text).input_ids:
            raise RuntimeError(
                f"the saved embedded tokenizer ({type(loaded).__name__}) tokenizes {text[:80]!r} differently "
                "from the one the model was trained with"
            )


def _sft_examples(cfg: EmbeddedModelConfig, prompt: PromptConfig, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # Levels 2-8: every chain length the pipeline asks about is seen in training, so
    # long chains need no length generalisation. Level 1 is left out: it teaches
    # nothing that level 2 does not, and its examples go to the long chains, whose
    # late-step lookups are what a small model learns last.
    problems = generate_problems(
        cfg.sft_examples, seed=seed + 1000, min_level=SFT_MIN_LEVEL, max_level=SFT_MAX_LEVEL, split="train",
        distinct=False,
    )
    return [
        {"question": p.prompt, "messages": prompt_messages(p.prompt, prompt), "completion": reasoning_trace(p.prompt, rng)}
        for p in problems
    ]


def _render(row: dict) -> str:
    """One SFT example as the text the tokenizer is fitted on (roles included, special tokens not)."""
    turns = "".join(f"{m['role']}\n{m['content']}\n" for m in row["messages"])
    return f"{turns}assistant\n{row['completion']}"


def prompt_masked_examples(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast, prompt: PromptConfig
) -> list[dict]:
    """(question, trace) pairs as SFT examples: the prompt as generation renders it, then the trace and EOS.

    The prompt and the completion are tokenized apart, as generation sees them (the prompt,
    then sampled tokens); only the completion carries a loss.
    """
    out = []
    for question, trace in pairs:
        prompt_ids = tokenizer(format_prompt(question, tokenizer, prompt), add_special_tokens=False).input_ids
        completion = tokenizer(trace, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append({"input_ids": prompt_ids + completion, "attention_mask": [1] * (len(prompt_ids) + len(completion)),
                    "labels": [-100] * len(prompt_ids) + completion})
    return out


def build_embedded_model(out_dir: Path, cfg: EmbeddedModelConfig, prompt: PromptConfig) -> Path:
    """Build, train and save the embedded base model; a no-op when it already exists.

    Written to a temporary folder and renamed at the end, so a crash never leaves a
    half-built model that a later run would load.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    seed = cfg.sft_seed
    torch.manual_seed(seed)
    rows = _sft_examples(cfg, prompt, seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    corpus = [_render(r) for r in rows]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(model_cfg)
    # Right padding for teacher-forced training; generation later pads left.
    tokenizer.padding_side = "right"
    # transformers' Trainer on prompt-masked examples, every setting stated (TRL's SFTConfig
    # defaulted to bf16 autocast, which the config never asked for).
    # AdamW with beta2 = 0.95 and weight decay 0.1, as GPT-style pretraining uses, not
    # transformers' 0.999 / 0: with 0.999 the float32 SFT stalled before the model learned to
    # look each step's operation up in the prompt (held-out 69% greedy against 96% with 0.95;
    # docs/log/2026-12-06-sft-recipe.md).
    args = TrainingArguments(
        output_dir=str(tmp / "sft"),
        num_train_epochs=cfg.sft_epochs,
        per_device_train_batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=cfg.sft_adam_beta2,
        adam_epsilon=1e-8,
        # Batches of similar length waste little compute on padding.
        train_sampling_strategy="group_by_length",
        weight_decay=cfg.sft_weight_decay,
        # float32, or bf16 autocast over float32 weights, as model.embedded.sft_dtype says. bf16
        # is about 9x slower on a CPU without native bf16 (docs/log/2026-12-06-fp32-sft.md).
        bf16=cfg.sft_dtype == "bfloat16",
        fp16=False,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    examples = prompt_masked_examples([(r["question"], r["completion"]) for r in rows], tokenizer, prompt)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=collator).train()
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    check_reload(tokenizer, tmp, corpus[:50])
    shutil.rmtree(tmp / "sft", ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
