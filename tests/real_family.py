"""Tiny stand-ins for the real models, one per family the shipped configs use.

No weights can be downloaded here, so the tests of the real configs run them on a model
of the same family instead: the Qwen2 architecture (DeepSeek-R1-Distill-Qwen and
Qwen2.5-Math are both Qwen2), the family's special tokens and its real chat template
(../shared/data/tokenizers), weights stored in bfloat16 as the published checkpoints are,
and a byte-level BPE fitted on the synthetic task and the real benchmarks' text. It is
trained by supervised fine-tuning (transformers' Trainer) on short synthetic chains,
written in the prompt format of the config under test, for long
enough to answer in the expected form (``... \\boxed{d}``): its answers are then right on
some problems and wrong on others, so curation finds problems in both bands.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import PromptConfig
from concise_rl.synthetic import generate_problems, reasoning_trace
from concise_rl.training.embedded import build_tokenizer, check_reload, prompt_masked_examples
from concise_rl.training.models import format_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZERS = SHARED / "tokenizers"
BENCHMARKS = SHARED / "benchmarks"
# Tests that need the shared data skip, saying where they looked, when it is not next to the checkout.
needs_shared = pytest.mark.skipif(not all(d.is_dir() for d in (TOKENIZERS, BENCHMARKS, SHARED / "paper")),
                                  reason=f"shared tokenizers, benchmarks and paper data not found at {SHARED}")
# Levels of the synthetic chains the stand-ins learn and are curated on: short enough that an
# answer fits the tests' small token budgets.
MIN_LEVEL, MAX_LEVEL = 1, 3


@dataclass(frozen=True)
class Family:
    """The tokens and chat template a real model family's tokenizer has (tokenizers/README.md)."""

    chat_template_file: str
    special_tokens: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None

    @property
    def chat_template(self) -> str:
        return (TOKENIZERS / self.chat_template_file).read_text()


R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
FAMILIES = {
    # DeepSeek-R1-Distill-Qwen-1.5B / 7B: bos, eos = pad; <think> tags are plain added tokens there.
    "deepseek-r1-distill": Family(
        "deepseek-r1-distill.chat_template.jinja",
        (R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"), eos=R1_EOS, pad=R1_EOS, bos=R1_BOS,
    ),
    # Qwen2.5-Math-*-Instruct: ends its turn with <|im_end|>.
    "qwen2.5-math-instruct": Family(
        "qwen2.5-math-instruct.chat_template.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>", pad="<|endoftext|>",
    ),
    # The base Qwen2.5-Math-7B the paper trained: the same tokens, but it stops at <|endoftext|>.
    "qwen2.5-math-base": Family(
        "qwen2.5-math-instruct.chat_template.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|endoftext|>", pad="<|endoftext|>",
    ),
}


def benchmark_text() -> list[str]:
    """The text of the real benchmarks, so the stand-in's tokenizer cuts them about as finely as a real one."""
    texts = []
    for path in sorted(BENCHMARKS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.append(" ".join(str(row[k]) for k in ("problem", "question", "choices") if k in row))
    return texts


def build_family_model(out: Path, family: str, prompt: PromptConfig, *, examples: int = 1000, seed: int = 0) -> Path:
    """Build and train the stand-in of ``family`` for prompts rendered with ``prompt``; returns its folder.

    Trained with transformers' Trainer on prompt-masked examples rather than TRL's SFTTrainer,
    whose fused LM-head kernel (TRL 1.16) took 76 of 98 s of this training on 2 CPU cores.
    """
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    fam = FAMILIES[family]
    rng = random.Random(seed)
    problems = generate_problems(examples, seed=seed + 1000, min_level=MIN_LEVEL, max_level=MAX_LEVEL, split="train",
                                 distinct=False)
    traces = [reasoning_trace(p.prompt, rng) for p in problems]
    corpus = [f"{p.prompt}\n{prompt.instruction}\n{t}" for p, t in zip(problems, traces)] + benchmark_text()
    tokenizer = build_tokenizer(corpus, 4000, special_tokens=list(fam.special_tokens), eos=fam.eos, pad=fam.pad,
                                bos=fam.bos, chat_template=fam.chat_template)
    rows = prompt_masked_examples([(p.prompt, t) for p, t in zip(problems, traces)], tokenizer, prompt)

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    tokenizer.padding_side = "right"
    args = TrainingArguments(
        output_dir=str(out / "sft"), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, save_strategy="no", report_to=[],
        # Stated, not inherited: the stand-in trains in float32, then is stored in bf16.
        bf16=False, fp16=False, use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        logging_strategy="no",
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator).train()
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    check_reload(tokenizer, out, [format_prompt(p.prompt, tokenizer, prompt) + t for p, t in zip(problems[:20], traces)])
    shutil.rmtree(out / "sft", ignore_errors=True)
    return out
