"""Evaluate one model on named problem sets at several temperatures."""

from __future__ import annotations

import numpy as np

from concise_rl.config import EvalConfig, PromptConfig
from concise_rl.evaluation.metrics import summarise
from concise_rl.grader import Grader
from concise_rl.problems import Problem
from concise_rl.training.generation import check_prompts, context_length, generate
from concise_rl.training.models import format_prompt


def temp_key(temperature: float) -> str:
    """Temperatures as report keys: "0.0", "0.6"."""
    return str(float(temperature))


def check_sets(tokenizer, sets: dict[str, list[Problem]], cfg: EvalConfig, prompt: PromptConfig,
               context: int | None) -> dict[str, list[str]]:
    """Every set's formatted prompts, checked together before any is sampled (training/generation.py's
    check_prompts): too long for the config, or with ``cfg.max_new_tokens`` for the model's ``context``."""
    for name, problems in sets.items():
        if not problems:
            raise ValueError(f"evaluation set {name!r} is empty; check its source or limit")
    prompts = {name: [format_prompt(p.prompt, tokenizer, prompt) for p in problems] for name, problems in sets.items()}
    check_prompts(tokenizer, {name: ([f"{name}/{p.id}" for p in problems], prompts[name])
                              for name, problems in sets.items()},
                  prompt.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                  new_tokens_key="evaluation.max_new_tokens", context=context)
    return prompts


def evaluate_model(
    model, tokenizer, sets: dict[str, list[Problem]], cfg: EvalConfig, prompt: PromptConfig, grader: Grader, *,
    seed: int = 0, engine: str = "auto",
) -> tuple[dict[str, dict[str, dict]], list[dict]]:
    """Accuracy and length per set and temperature, and every graded response.

    Greedy decoding (temperature 0) is deterministic, so it takes one sample per
    problem; sampled temperatures take ``cfg.samples``.
    """
    import torch

    summary: dict[str, dict[str, dict]] = {}
    records: list[dict] = []
    prompts = check_sets(tokenizer, sets, cfg, prompt, context_length(model))
    for name, problems in sets.items():
        texts = prompts[name]
        summary[name] = {}
        for t in cfg.temperatures:
            k = 1 if t == 0 else cfg.samples
            torch.manual_seed(seed)
            gen = generate(
                model,
                tokenizer,
                [x for x in texts for _ in range(k)],
                temperature=t,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                max_prompt_tokens=prompt.max_prompt_tokens,
                desc=f"eval {name} T={t}",
                engine=engine,
            )
            answers = [p.answer for p in problems for _ in range(k)]
            grades = grader.grade_many(gen.texts, answers)
            lengths = gen.lengths.numpy()
            correct = np.array([g.correct for g in grades])
            summary[name][temp_key(t)] = summarise(
                correct.reshape(len(problems), k),
                lengths.reshape(len(problems), k),
                gen.truncated.numpy().reshape(len(problems), k),
                n_boot=cfg.bootstrap_samples,
                seed=seed,
                problem_ids=[p.id for p in problems],
            )
            for i, (g, text) in enumerate(zip(grades, gen.texts)):
                p = problems[i // k]
                records.append(
                    {
                        "set": name,
                        "temperature": float(t),
                        "problem_id": p.id,
                        "sample": i % k,
                        "answer": p.answer,
                        "response": text,
                        "length": int(lengths[i]),
                        "truncated": bool(gen.truncated[i]),
                        "correct": g.correct,
                        "extracted": g.extracted,
                        "reason": g.reason,
                    }
                )
    return summary, records
