"""The paper's mechanism on a tiny policy, with no length term anywhere.

With GAE (gamma = 1, lambda < 1), a terminal reward r and a per-response token-mean
loss, the last tokens of a response (its end-of-sequence token above all) carry the
largest advantage. A consistently negative r pushes the end-of-sequence token down
and responses grow; a consistently positive r pushes it up and they shrink.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.mechanism import mean_length, tiny_policy, train_with


@pytest.fixture(scope="module")
def stopping_policy(tmp_path_factory) -> Path:
    return tiny_policy(tmp_path_factory.mktemp("stopping-policy"))


@pytest.mark.parametrize(("reward", "direction"), [(-1.0, "grows"), (1.0, "shrinks")])
def test_terminal_reward_sign_sets_length_direction(stopping_policy: Path, tmp_path: Path, reward, direction) -> None:
    before = mean_length(stopping_policy)
    after = mean_length(train_with(stopping_policy, tmp_path / "run", reward, lam=0.95))
    assert 6 < before < 20, f"the starting policy should stop after ~12 tokens, got {before:.1f}"
    if direction == "grows":
        assert after > before * 1.15, f"negative reward: mean length {before:.1f} -> {after:.1f}"
    else:
        assert after < before * 0.85, f"positive reward: mean length {before:.1f} -> {after:.1f}"
