"""Problem curation (training/curation.py): band selection, and pass rates from a real (tiny) model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import Band, CurationConfig, PromptConfig, RewardConfig
from concise_rl.problems import Problem
from concise_rl.synthetic import generate_problems, reasoning_trace
from concise_rl.training.curation import CurationError, PassRate, measure_pass_rates, select_sets
from concise_rl.training.embedded import build_tokenizer

K = 8


def make(corrects: list[int]) -> tuple[list[Problem], list[PassRate]]:
    """Problem p{i} solved corrects[i] times out of K."""
    problems = [Problem(f"p{i}", f"question {i}", str(i % 10), "test", {"level": i}) for i in range(len(corrects))]
    rates = [PassRate(f"p{i}", i, c, K, 100.0 + i) for i, c in enumerate(corrects)]
    return problems, rates


def ids(problems: list[Problem]) -> list[str]:
    return [p.id for p in problems]


# p0..p8 pass 0/8 .. 8/8. Phase-1 band [0, 0.5] holds p0..p4; phase-2 band [0.125, 0.875] holds p1..p7.
PROBLEMS, RATES = make(list(range(K + 1)))


def cfg(**kw) -> CurationConfig:
    base = dict(samples_per_problem=K, phase1_band=Band(low=0.0, high=0.5), phase2_band=Band(low=0.125, high=0.875))
    return CurationConfig(**{**base, **kw})


def test_pass_rate_property():
    assert PassRate("x", None, 3, 8, 1.0).pass_rate == 0.375
    assert PassRate("x", None, 0, 8, 1.0).pass_rate == 0.0


def test_phase1_is_the_whole_hard_band_in_order():
    p1, _ = select_sets(PROBLEMS, RATES, cfg(), seed=0)
    assert ids(p1) == ["p0", "p1", "p2", "p3", "p4"]


def test_phase2_takes_every_available_problem_when_fewer_than_n():
    p1, p2 = select_sets(PROBLEMS, RATES, cfg(phase2_num_problems=8), seed=0)
    # p1..p4 are in both bands but belong to phase 1; p5..p7 remain.
    assert sorted(ids(p2)) == ["p5", "p6", "p7"]
    assert not set(ids(p1)) & set(ids(p2))


def test_phase2_takes_n_from_the_band_deterministically():
    _, a = select_sets(PROBLEMS, RATES, cfg(phase2_num_problems=2), seed=11)
    _, b = select_sets(PROBLEMS, RATES, cfg(phase2_num_problems=2), seed=11)
    assert ids(a) == ids(b)
    assert len(a) == 2
    assert len(set(ids(a))) == 2
    assert set(ids(a)) <= {"p5", "p6", "p7"}


def test_phase2_draw_depends_on_the_seed():
    draws = {tuple(sorted(ids(select_sets(PROBLEMS, RATES, cfg(phase2_num_problems=1), seed=s)[1]))) for s in range(20)}
    assert len(draws) > 1
    assert draws <= {("p5",), ("p6",), ("p7",)}


def test_phase1_cap_is_deterministic_given_the_seed():
    c = cfg(phase1_max_problems=2, phase2_num_problems=8)
    p1a, p2a = select_sets(PROBLEMS, RATES, c, seed=3)
    p1b, p2b = select_sets(PROBLEMS, RATES, c, seed=3)
    assert ids(p1a) == ids(p1b) and ids(p2a) == ids(p2b)
    assert len(p1a) == 2
    assert set(ids(p1a)) <= {"p0", "p1", "p2", "p3", "p4"}
    # Every phase-2-band problem not taken by the capped phase 1 is available to phase 2.
    expected_pool = {f"p{i}" for i in range(1, 8)} - set(ids(p1a))
    assert set(ids(p2a)) == expected_pool
    assert not set(ids(p1a)) & set(ids(p2a))
    draws = {tuple(ids(select_sets(PROBLEMS, RATES, c, seed=s)[0])) for s in range(20)}
    assert len(draws) > 1


def test_phase1_cap_above_band_size_keeps_everything():
    p1, _ = select_sets(PROBLEMS, RATES, cfg(phase1_max_problems=50), seed=0)
    assert ids(p1) == ["p0", "p1", "p2", "p3", "p4"]


def test_phase2_overlaps_phase1_only_when_nothing_else_is_left():
    # The phase-2 band [0.125, 0.5] lies inside the phase-1 band: no disjoint choice exists.
    c = cfg(phase2_band=Band(low=0.125, high=0.5), phase2_num_problems=2)
    p1, p2 = select_sets(PROBLEMS, RATES, c, seed=0)
    assert ids(p1) == ["p0", "p1", "p2", "p3", "p4"]
    assert len(p2) == 2
    assert set(ids(p2)) <= {"p1", "p2", "p3", "p4"}


def test_band_edges_are_inclusive():
    problems, rates = make([1, 7])  # exactly 0.125 and 0.875
    c = cfg(phase1_band=Band(low=0.0, high=0.125), phase2_num_problems=4)
    p1, p2 = select_sets(problems, rates, c, seed=0)
    assert ids(p1) == ["p0"]
    assert ids(p2) == ["p1"]


def test_empty_phase2_band_raises_with_what_to_do():
    problems, rates = make([0, 0, 0, 8])
    with pytest.raises(CurationError) as exc:
        select_sets(problems, rates, cfg(), seed=0)
    msg = str(exc.value)
    assert "curation.phase2_band [0.125, 0.875]" in msg
    assert "4 problems" in msg and "8 samples" in msg
    assert "widen the band" in msg
    assert "curation.samples_per_problem" in msg


def test_empty_phase1_band_raises_with_what_to_do():
    problems, rates = make([8, 8, 7])
    with pytest.raises(CurationError) as exc:
        select_sets(problems, rates, cfg(), seed=0)
    msg = str(exc.value)
    assert "curation.phase1_band [0.0, 0.5]" in msg
    assert "3 problems" in msg
    assert "widen the band or add harder candidates" in msg


def test_curation_error_is_a_value_error():
    assert issubclass(CurationError, ValueError)


# ----------------------------------------------------------------------------- end to end on a tiny model
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    rng = random.Random(0)
    instruction = PromptConfig().instruction
    corpus = [
        f"user\n{p.prompt}\n{instruction}\nassistant\n{reasoning_trace(p.prompt, rng)}"
        for p in generate_problems(200, seed=5, min_level=1, max_level=4)
    ]
    tok = build_tokenizer(corpus, 300)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    return model, tok


def test_measure_pass_rates_on_a_tiny_model(tiny_model, grader):
    model, tok = tiny_model
    problems = generate_problems(3, seed=9, min_level=1, max_level=3, split="heldout")
    c = CurationConfig(samples_per_problem=4, temperature=1.0, max_new_tokens=6, batch_size=5)
    torch.manual_seed(1)
    rates = measure_pass_rates(model, tok, problems, c, PromptConfig(max_prompt_tokens=512), RewardConfig(), grader)
    assert len(rates) == len(problems)
    assert [r.problem_id for r in rates] == [p.id for p in problems]
    assert [r.level for r in rates] == [p.metadata["level"] for p in problems]
    for r in rates:
        assert r.samples == 4
        assert 0 <= r.correct <= 4
        assert 0.0 <= r.pass_rate <= 1.0
        # Each response is at least one token (EOS included) and at most max_new_tokens.
        assert 1.0 <= r.mean_length <= 6
    # An untrained model cannot write \boxed{d}: nothing is solved.
    assert sum(r.correct for r in rates) == 0


def test_measure_pass_rates_greedy_is_deterministic(tiny_model, grader):
    model, tok = tiny_model
    problems = generate_problems(2, seed=9, min_level=2, max_level=2, split="heldout")
    c = CurationConfig(samples_per_problem=3, temperature=0.0, max_new_tokens=5, batch_size=4)
    a = measure_pass_rates(model, tok, problems, c, PromptConfig(max_prompt_tokens=512), RewardConfig(), grader)
    b = measure_pass_rates(model, tok, problems, c, PromptConfig(max_prompt_tokens=512), RewardConfig(), grader)
    assert a == b
    # Greedy decoding gives the same response to every copy of a prompt, so the mean is one length.
    for r in a:
        assert r.mean_length == int(r.mean_length)
        assert 1 <= r.mean_length <= 5
