"""The shipped real configs against the paper's launch scripts (tests/paper_parity.yaml).

Every setting of R1_on_math.sh and qwen_on_math.sh that the project models is held
against every config the script maps to, and every deliberate difference is listed with
its reason; the prompts the configs render are compared, text for text, with the paper's
own data files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from real_family import FAMILIES, SHARED, needs_shared  # tests/, on the path

from concise_rl.config import PipelineConfig, load_config
from concise_rl.training.embedded import build_tokenizer
from concise_rl.training.models import format_prompt

ROOT = Path(__file__).resolve().parents[1]
PARITY = yaml.safe_load((Path(__file__).with_name("paper_parity.yaml")).read_text())
SCRIPTS = PARITY["scripts"]
CASES = [(script, config) for script, spec in SCRIPTS.items() for config in spec["configs"]]


def field(cfg: PipelineConfig, key: str) -> Any:
    """A config value by its dotted key; ppo.* as phase 2 trains with it (the paper's runs were phase 2)."""
    section, _, rest = key.partition(".")
    node: Any = cfg.ppo_for("phase2") if section == "ppo" else getattr(cfg, section)
    for part in rest.split(".") if rest else []:
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def test_the_parity_table_covers_both_scripts_and_names_real_keys():
    cfg = load_config(ROOT / "configs" / "r1-distill-qwen-1.5b.yaml")
    for row in PARITY["settings"]:
        assert set(row["values"]) == set(SCRIPTS), row["flag"]
        field(cfg, row["key"])  # a key that no longer exists fails here, not silently
    for row in PARITY["differences"]:
        assert row["reason"].strip(), row["flag"]
        if row["key"] is not None:
            field(cfg, row["key"])


@pytest.mark.parametrize("script, config", CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_each_real_config_has_the_settings_of_its_script(script: str, config: str):
    cfg = load_config(ROOT / "configs" / config)
    drift = {}
    for row in PARITY["settings"]:
        expected = row.get("per_config", {}).get(config, row["values"][script])
        if field(cfg, row["key"]) != expected:
            drift[f"{row['key']} ({row['flag']})"] = (field(cfg, row["key"]), expected)
    for row in PARITY["differences"]:
        if row["key"] is not None and "ours" in row and field(cfg, row["key"]) != row["ours"]:
            drift[f"{row['key']} (listed difference)"] = (field(cfg, row["key"]), row["ours"])
    assert not drift, f"{config} differs from {script} (config value, script value): {drift}"


@pytest.mark.parametrize("script, config", CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_each_real_config_updates_as_often_as_its_script(script: str, config: str):
    """8 (R1) or 4 (Qwen) optimiser updates per rollout, 3% of all of them warm-up."""
    ppo = load_config(ROOT / "configs" / config).ppo_for("phase2")
    per_rollout = ppo.prompts_per_step * ppo.samples_per_prompt // ppo.mini_batch_size
    updates = ppo.steps * ppo.ppo_epochs * per_rollout
    expected = {"R1_on_math.sh": (8, 1200, 36), "qwen_on_math.sh": (4, 600, 18)}[script]
    assert (per_rollout, updates, -(-updates * 3 // 100)) == expected


def family_tokenizer(family: str):
    fam = FAMILIES[family]
    return build_tokenizer(["a b c"], 300, special_tokens=list(fam.special_tokens), eos=fam.eos, pad=fam.pad,
                           bos=fam.bos, chat_template=fam.chat_template)


@needs_shared
@pytest.mark.parametrize("script, config", CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_the_rendered_prompts_are_the_papers_text_for_text(script: str, config: str):
    """Every problem of the script's data file, rendered by the config, is the text the paper's
    trainer saw: R1, the file's `input` as the user turn of the real R1 chat template; Qwen,
    the file's `input` itself (no chat template)."""
    cfg = load_config(ROOT / "configs" / config)
    rows = json.loads((SHARED / "paper" / SCRIPTS[script]["data"]).read_text())
    if script == "R1_on_math.sh":
        tokenizer = family_tokenizer("deepseek-r1-distill")
        expected = [tokenizer.apply_chat_template([{"role": "user", "content": r["input"]}], tokenize=False,
                                                  add_generation_prompt=True) for r in rows]
        assert expected[0].startswith("<｜begin▁of▁sentence｜><｜User｜>") and expected[0].endswith("<｜Assistant｜><think>\n")
    else:
        tokenizer = family_tokenizer("qwen2.5-math-base")
        expected = [r["input"] for r in rows]
        assert expected[0].endswith("<|im_start|>assistant")
    assert [format_prompt(r["question"], tokenizer, cfg.prompt) for r in rows] == expected
