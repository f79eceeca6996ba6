"""Problem curation: measure each candidate's pass rate under the current policy, pick sets.

Phase 1 trains on hard problems (a low pass-rate band) to raise accuracy. Phase 2
trains on a handful of *occasionally solvable* problems: the paper's mechanism
needs mostly positive terminal rewards for PPO to shorten responses, but not all of
them, or the problem carries no signal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from concise_rl.config import Band, CurationConfig, PromptConfig, RewardConfig
from concise_rl.errors import CurationError
from concise_rl.grader import Grader
from concise_rl.problems import Problem
from concise_rl.training.generation import check_prompts, context_length, generate
from concise_rl.training.models import format_prompt
from concise_rl.training.reward import score_responses


@dataclass(frozen=True)
class PassRate:
    problem_id: str
    level: int | None
    correct: int
    samples: int
    mean_length: float

    @property
    def pass_rate(self) -> float:
        return self.correct / self.samples


def measure_pass_rates(
    model, tokenizer, problems: list[Problem], cfg: CurationConfig, prompt: PromptConfig, reward: RewardConfig,
    grader: Grader, *, engine: str = "auto",
) -> list[PassRate]:
    """Sample ``cfg.samples_per_problem`` responses per problem and count the correct ones."""
    k = cfg.samples_per_problem
    texts = [format_prompt(p.prompt, tokenizer, prompt) for p in problems]
    check_prompts(tokenizer, {"curation candidates": ([p.id for p in problems], texts)}, prompt.max_prompt_tokens,
                  max_new_tokens=cfg.max_new_tokens, new_tokens_key="curation.max_new_tokens",
                  context=context_length(model))
    prompts = [text for text in texts for _ in range(k)]
    gen = generate(
        model,
        tokenizer,
        prompts,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        max_prompt_tokens=prompt.max_prompt_tokens,
        desc="curation: sampling",
        engine=engine,
    )
    grades, _ = score_responses(gen.texts, [p.answer for p in problems for _ in range(k)], reward, grader)
    lengths = gen.lengths.tolist()
    rates = []
    for i, p in enumerate(problems):
        block = slice(i * k, (i + 1) * k)
        rates.append(
            PassRate(
                problem_id=p.id,
                level=p.metadata.get("level"),
                correct=sum(g.correct for g in grades[block]),
                samples=k,
                mean_length=sum(lengths[block]) / k,
            )
        )
    return rates


def _in_band(problems: list[Problem], rates: list[PassRate], band: Band) -> list[Problem]:
    if [p.id for p in problems] != [r.problem_id for r in rates]:
        raise CurationError("pass rates do not line up with the candidate problems (ids differ); re-run curation")
    return [p for p, r in zip(problems, rates) if band.contains(r.pass_rate)]


def select_sets(
    problems: list[Problem], rates: list[PassRate], cfg: CurationConfig, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """The phase-1 set (every candidate in the hard band, optionally capped) and the phase-2 set.

    Phase 2 takes ``phase2_num_problems`` drawn at random (fixed by ``seed``) from the
    occasionally-solvable band, kept apart from the phase-1 set when the bands overlap.
    """
    rng = random.Random(seed)
    phase1 = _in_band(problems, rates, cfg.phase1_band)
    if not phase1:
        raise CurationError(
            f"no candidate has a pass rate in curation.phase1_band [{cfg.phase1_band.low}, {cfg.phase1_band.high}] "
            f"(measured on {len(problems)} problems); widen the band or add harder candidates"
        )
    if cfg.phase1_max_problems and len(phase1) > cfg.phase1_max_problems:
        phase1 = rng.sample(phase1, cfg.phase1_max_problems)
    phase1_ids = {p.id for p in phase1}
    pool = [p for p in _in_band(problems, rates, cfg.phase2_band) if p.id not in phase1_ids]
    if not pool:
        pool = _in_band(problems, rates, cfg.phase2_band)
    if not pool:
        raise CurationError(
            f"no candidate has a pass rate in curation.phase2_band [{cfg.phase2_band.low}, {cfg.phase2_band.high}] "
            f"(measured on {len(problems)} problems with {cfg.samples_per_problem} samples each); "
            "widen the band, raise curation.samples_per_problem, or add candidates"
        )
    phase2 = rng.sample(pool, min(cfg.phase2_num_problems, len(pool)))
    return phase1, phase2
