"""The paper's reward (training/reward.py) and the grader behind it (concise_rl/grader.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concise_rl.config import RewardConfig
from concise_rl.training.reward import reward_of, score_responses

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GRADER_DEV = SHARED_DATA / "grader" / "math_cot_50_dev.jsonl"


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("We add them up, so the answer is \\boxed{42}.", "42", 1.0),
        ("\\boxed{41}", "42", -0.5),
        ("the answer is 42", "42", -1.0),
        ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
        ("\\boxed{\\frac{11}{10}}", "1\\frac{1}{10}", 1.0),
        ("\\boxed{0.1}", "1\\frac{1}{10}", -0.5),  # a mixed number is not a product
        ("first \\boxed{7} then finally \\boxed{42}", "42", 1.0),  # the last box counts
        ("first \\boxed{42} then finally \\boxed{7}", "42", -0.5),
    ],
)
def test_reward_defaults(response, answer, expected, grader):
    grades, rewards = score_responses([response], [answer], RewardConfig(), grader)
    assert rewards == [expected]
    assert grades[0].correct == (expected == 1.0)
    assert grades[0].boxed == (expected != -1.0)


def test_truncated_response_uses_earlier_complete_box(grader):
    response = "So \\boxed{3} ... wait, let me redo this: \\boxed{\\frac{1"
    g = grader.grade(response, "3")
    assert g.extracted == "3" and g.correct
    assert score_responses([response], ["\\frac{1}{2}"], RewardConfig(), grader)[1] == [-0.5]


def test_batch_order_and_custom_config(grader):
    cfg = RewardConfig(correct=2.0, wrong_boxed=0.25, no_box=-3.0)
    responses = ["\\boxed{42}", "\\boxed{41}", "42", "\\boxed{\\frac{1}{2}}"]
    answers = ["42", "42", "42", "0.5"]
    grades, rewards = score_responses(responses, answers, cfg, grader)
    assert rewards == [2.0, 0.25, -3.0, 2.0]
    assert [g.extracted for g in grades] == ["42", "41", None, "\\frac{1}{2}"]
    assert [reward_of(g, cfg) for g in grades] == rewards
    assert [reward_of(g, RewardConfig()) for g in grades] == [1.0, -0.5, -1.0, 1.0]


def test_mismatched_lengths_raise(grader):
    with pytest.raises(ValueError):
        score_responses(["\\boxed{1}", "\\boxed{2}"], ["1"], RewardConfig(), grader)
    with pytest.raises(ValueError):
        score_responses([], ["1"], RewardConfig(), grader)


# Rows of the shared dev set whose reference labels were checked by eye
# (idx: {response index: label}); each response's last box is the one graded.
#  6 gt 3/8:       #0 boxes 5/16 (wrong), #2 boxes 3/8 (right), #3 boxes 3/4 (wrong)
# 17 gt 6290000:   #0 boxes 6290000 (right), #2 boxes 6287000 (wrong rounding)
# 37 gt 1\frac{1}{10}: #0 boxes "1 \frac{8}{91}" (wrong), #2 "1 \frac{1}{10}" (right),
#                      #4 "1 \frac{1}{9}" (wrong)
CHECKED = {6: {0: False, 2: True, 3: False}, 17: {0: True, 2: False}, 37: {0: False, 2: True, 4: False}}


@pytest.mark.skipif(not GRADER_DEV.is_file(), reason=f"shared grader data not found at {GRADER_DEV}")
def test_grade_agrees_with_checked_reference_labels(grader):
    rows = {}
    with GRADER_DEV.open() as f:
        for line in f:
            row = json.loads(line)
            if row["idx"] in CHECKED:
                rows[row["idx"]] = row
    assert set(rows) == set(CHECKED)
    for idx, picks in CHECKED.items():
        row = rows[idx]
        for j, label in picks.items():
            assert row["score"][j] == label, (idx, j)  # the file still says what we checked
            g = grader.grade(row["code"][j], row["gt"])
            assert g.boxed and g.correct == label, (idx, j, g)
        responses = [row["code"][j] for j in picks]
        _, rewards = score_responses(responses, [row["gt"]] * len(picks), RewardConfig(), grader)
        assert rewards == [1.0 if label else -0.5 for label in picks.values()]
