"""The paper's reward: +1 for a correct boxed answer, -0.5 boxed but wrong, -1 no box.

Nothing in it depends on length: conciseness must come from the optimisation
(PPO's per-response loss averaging with lambda < 1), not from the reward.
"""

from __future__ import annotations

from concise_rl.config import RewardConfig
from concise_rl.grader import Grade, Grader


def reward_of(g: Grade, cfg: RewardConfig) -> float:
    if g.correct:
        return cfg.correct
    return cfg.wrong_boxed if g.boxed else cfg.no_box


def score_responses(
    responses: list[str], answers: list[str], cfg: RewardConfig, grader: Grader
) -> tuple[list[Grade], list[float]]:
    """Grade each response against its reference answer with ``grader`` and turn the grade into a reward."""
    grades = grader.grade_many(responses, answers)
    return grades, [reward_of(g, cfg) for g in grades]
