"""Prompts that do not fit are refused for every set at once, before any work (issue 22, point 1), and the
documented evaluation examples on real benchmarks run as written on the embedded model.

The embedded model has 1,024 positions; the real benchmarks' prompts in its small vocabulary run
to hundreds of tokens (math500 711 among its first 50, mmlu_stem 5-shot 1,858), so the checks
meet real cases here, not made-up ones.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from concise_rl import cli_text, paths
from concise_rl.cli import EXIT_BAD_INPUT, main
from concise_rl.errors import ConfigError
from concise_rl.training import prebuilt
from concise_rl.training.generation import check_prompts, context_length
from concise_rl.training.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SHARED = ROOT.parent / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared benchmarks not found at {SHARED}")
BASE = prebuilt.PREBUILT / next(iter(prebuilt.manifest()))  # the demo's shipped base


def test_check_prompts_names_every_set_that_does_not_fit_in_one_message():
    tok = load_tokenizer(str(BASE))
    short, long = "Start with 3. Steps: A +1, B stop.", "Start with 3. Steps: " + "A +1, " * 200 + "B stop."
    n_long = len(tok(long, add_special_tokens=False).input_ids)
    assert 200 < n_long < 1024 - 64, n_long
    sets = {"ok": (["ok/0"], [short]), "wide": (["wide/0", "wide/1"], [short, long]),
            "huge": (["huge/0"], [long + long])}
    with pytest.raises(ConfigError) as caught:
        check_prompts(tok, sets, 100, max_new_tokens=64, new_tokens_key="evaluation.max_new_tokens",
                      context=context_length(BASE))
    message = str(caught.value)
    assert "\n" not in message
    assert f"wide: 1 of 2 prompts are over prompt.max_prompt_tokens=100, the longest {n_long} tokens (problem 'wide/1')" \
        in message
    assert "huge: 1 of 1 prompts are over" in message
    assert f"huge: its longest prompt ({2 * n_long} tokens) plus evaluation.max_new_tokens=64 needs " \
           f"{2 * n_long + 64} positions, over the model's 1024 (max_position_embeddings)" in message
    assert "ok:" not in message
    # The fix for the sets that fit the model, and the truth about the one that cannot.
    assert f"Raise prompt.max_prompt_tokens to at least {n_long} (--set prompt.max_prompt_tokens={n_long})" in message
    assert "This model cannot take huge whole" in message
    # Fitting prompts pass, with or without a context to check against.
    check_prompts(tok, {"ok": (["ok/0"], [short])}, 100, max_new_tokens=64, context=1024)
    check_prompts(tok, sets, 10_000)


@needs_data
def test_evaluate_refuses_every_benchmark_that_does_not_fit_at_once_before_any_work(mlflow_home, capsys):
    code = main(["evaluate", "--config", DEMO, "--model", str(BASE), "--benchmarks", "math500,aime24,amc23,mmlu_stem",
                 "--data-dir", str(SHARED), "--limit", "50"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # All four, in one message: each over the demo's 128-token prompt limit, and three past the embedded
    # model's 1,024 positions with 384 new tokens (amc23's longest, 564 tokens, leaves room for them).
    for name in ("math500", "aime24", "amc23", "mmlu_stem"):
        assert f"{name}: " in err and "prompts are over prompt.max_prompt_tokens=128" in err, (name, err)
    assert "mmlu_stem: 50 of 50 prompts are over prompt.max_prompt_tokens=128" in err
    assert "amc23: its longest prompt" not in err
    assert "Raise prompt.max_prompt_tokens to at least 564 (--set prompt.max_prompt_tokens=564)" in err
    assert "This model cannot take aime24, math500, mmlu_stem whole" in err
    assert not (paths.home() / "evaluations").exists(), "refused before any evaluation started"


def documented_examples() -> list[str]:
    """The `concise-rl evaluate --benchmarks` examples (not the synopsis) of docs/command-line.md and `evaluate --help`."""
    found = []
    for text in ((ROOT / "docs" / "command-line.md").read_text(encoding="utf-8"), cli_text.EVALUATE_EPILOG):
        joined = re.sub(r"\\\n\s*", "", text)  # continuation lines
        found += [line.strip() for line in joined.splitlines()
                  if line.strip().startswith("concise-rl evaluate") and "--benchmarks" in line and "[" not in line]
    return found


@needs_data
def test_the_documented_benchmark_examples_run_as_written(champion, monkeypatch, capsys):
    examples = documented_examples()
    assert len(examples) == 2 and examples[0] == examples[1], "docs/command-line.md and --help show one example"
    argv = shlex.split(examples[0])[1:]
    assert "--limit" in argv and "../shared/data/benchmarks" in argv
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the checkout
    # As written, but on the first 2 problems of each set instead of 50 (the last --limit wins).
    code = main([*argv, "--limit", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "report:" in out
    summary = next((paths.evaluations()).glob("*/summary.json"))
    assert sorted(summary.parent.parent.glob("*/summary.json")) == [summary]
    figures = json.loads(summary.read_text())
    assert list(figures) == ["math500", "aime24", "amc23", "mmlu_stem"]
    assert all(set(by_t) == {"0.0", "0.6"} for by_t in figures.values())
    assert all(by_t["0.6"]["samples"] == 4 for by_t in figures.values())
