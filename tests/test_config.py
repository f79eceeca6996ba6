"""The typed pipeline config (concise_rl/config.py): shipped files, errors that name the key, overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from concise_rl.config import Band, ConfigError, PipelineConfig, PPOConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
QWEN_MATH = CONFIGS / "qwen2.5-math-1.5b-instruct.yaml"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shipped files
def test_configs_folder_has_the_expected_files():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"demo.yaml", "r1-distill-qwen-1.5b.yaml", "r1-distill-qwen-7b.yaml", "qwen2.5-math-7b.yaml",
            "qwen2.5-math-1.5b-instruct.yaml"} <= names


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    # The name in the file matches the file (demo.yaml -> "demo").
    assert cfg.name == path.stem
    # Both phases' merged PPO settings validate too.
    assert isinstance(cfg.ppo_for("phase1"), PPOConfig)
    assert isinstance(cfg.ppo_for("phase2"), PPOConfig)


def test_the_project_qwen_variant_is_the_1p5b_instruct_model_at_the_papers_qwen_batch():
    """Not one of the paper's runs (tests/test_paper_parity.py holds those): the Instruct model with
    its chat template, at the paper's Qwen sizes: 4 prompts x 8, 4 updates per rollout, 3,000 tokens."""
    cfg = load_config(QWEN_MATH)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert (cfg.prompt.style, cfg.prompt.use_chat_template) == ("qwen-math", True)
    assert cfg.curation.phase2_num_problems == 4
    assert cfg.ppo.max_new_tokens == cfg.curation.max_new_tokens == cfg.evaluation.max_new_tokens == 3000
    assert (cfg.ppo.prompts_per_step, cfg.ppo.samples_per_prompt, cfg.ppo.mini_batch_size) == (4, 8, 8)


def test_no_path_gives_the_defaults():
    cfg = load_config()
    assert cfg == PipelineConfig()
    assert cfg.ppo.lam == 0.95
    assert cfg.evaluation.temperatures == [0.0, 0.6]


# ----------------------------------------------------------------------------- errors name the key
def test_unknown_top_level_key_is_named(tmp_path):
    path = write(tmp_path, "name: x\nppo_settings: {lam: 0.9}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ppo_settings'"):
        load_config(path)


def test_unknown_nested_key_names_the_full_dotted_key(tmp_path):
    path = write(tmp_path, "ppo:\n  lamda: 0.9\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "unknown key 'ppo.lamda'" in msg
    assert str(path) in msg


def test_unknown_deeply_nested_key_is_named(tmp_path):
    path = write(tmp_path, "curation:\n  phase2_band: {low: 0.1, high: 0.5, hgh: 0.2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'curation\.phase2_band\.hgh'"):
        load_config(path)


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write(tmp_path, "ppo:\n  steps: many\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "'ppo.steps'" in msg
    assert "'many'" in msg


def test_out_of_range_value_names_the_key(tmp_path):
    path = write(tmp_path, "ppo:\n  lam: 1.5\n")
    with pytest.raises(ConfigError, match=r"'ppo\.lam'.*1\.5"):
        load_config(path)


def test_actor_trainable_parts_needs_actor_trainable_layers():
    with pytest.raises(ValidationError, match="set actor_trainable_layers"):
        PPOConfig(actor_trainable_parts="mlp")
    assert PPOConfig(actor_trainable_parts="mlp", actor_trainable_layers=1).actor_trainable_parts == "mlp"


def test_phase2_ppo_unknown_field_is_named(tmp_path):
    path = write(tmp_path, "phase2:\n  ppo: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=r"phase2\.ppo\.bogus"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [("ppo:\n  whiten_advantages: false\n", "ppo"), ("phase2:\n  ppo: {whiten_advantages: true}\n", "phase2.ppo")],
)
def test_a_replaced_key_says_what_replaced_it(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}\.whiten_advantages' was replaced; use advantage_norm"):
        load_config(write(tmp_path, text))


def test_phase1_ppo_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "phase1:\n  ppo: {steps: lots}\n")
    with pytest.raises(ConfigError, match=r"phase1\.ppo\.steps"):
        load_config(path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)
    assert "does not exist" in str(exc.value)


def test_yaml_that_is_a_list(tmp_path):
    path = write(tmp_path, "- ppo\n- lam\n")
    with pytest.raises(ConfigError, match=r"mapping at the top level, not list"):
        load_config(path)


def test_invalid_yaml_syntax(tmp_path):
    path = write(tmp_path, "ppo: {lam: 0.9\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "")
    assert load_config(path) == PipelineConfig()


# ----------------------------------------------------------------------------- overrides
def test_overrides_get_yaml_types():
    cfg = load_config(DEMO, ["ppo.lam=1.0", "evaluation.temperatures=[0, 0.6]"])
    assert cfg.ppo.lam == 1.0
    assert isinstance(cfg.ppo.lam, float)
    assert cfg.evaluation.temperatures == [0.0, 0.6]
    assert all(isinstance(t, float) for t in cfg.evaluation.temperatures)


def test_overrides_of_int_bool_str_and_nested_phase():
    cfg = load_config(
        DEMO,
        ["ppo.steps=7", "phase1.enabled=false", "registry.model_name=my-model", "phase2.ppo.steps=3"],
    )
    assert cfg.ppo.steps == 7 and isinstance(cfg.ppo.steps, int)
    assert cfg.phase1.enabled is False
    assert cfg.registry.model_name == "my-model"
    assert cfg.phase2.ppo["steps"] == 3, "a nested override replaces one key of the phase section"
    assert cfg.ppo_for("phase2").steps == 3


def test_override_value_may_contain_equals():
    cfg = load_config(DEMO, ["prompt.instruction=a=b"])
    assert cfg.prompt.instruction == "a=b"


def test_later_override_wins():
    cfg = load_config(DEMO, ["ppo.lam=0.5", "ppo.lam=0.75"])
    assert cfg.ppo.lam == 0.75


def test_override_of_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'ppo\.lamda'"):
        load_config(DEMO, ["ppo.lamda=1"])


def test_override_of_a_scalar_as_a_section():
    with pytest.raises(ConfigError) as exc:
        load_config(DEMO, ["ppo.lam.x=1"])
    assert "'ppo.lam' is a value, not a section" in str(exc.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(DEMO, ["ppo.lam"])


def test_override_with_empty_key():
    with pytest.raises(ConfigError, match=r"the key is empty"):
        load_config(DEMO, ["=1"])


def test_override_with_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'ppo\.steps'.*'many'"):
        load_config(DEMO, ["ppo.steps=many"])


def test_overrides_do_not_touch_the_file():
    before = DEMO.read_text()
    load_config(DEMO, ["ppo.lam=0.5"])
    assert DEMO.read_text() == before
    assert load_config(DEMO).ppo.lam == 1.0  # the demo file says 1.0; the override did not stick


# ----------------------------------------------------------------------------- phase overrides
def test_ppo_for_merges_the_phase_override():
    cfg = load_config(DEMO, ["phase2.ppo={steps: 5, kl_coef: 0.0}"])
    p1, p2 = cfg.ppo_for("phase1"), cfg.ppo_for("phase2")
    assert (p2.steps, p2.kl_coef) == (5, 0.0)
    # Everything else comes from the shared section.
    assert p2.lam == cfg.ppo.lam == 1.0
    assert p2.actor_lr == cfg.ppo.actor_lr == 2.0e-5
    # Phase 1 keeps the demo file's own override (actor_lr) and nothing else changes;
    # the shared section is untouched.
    assert p1.actor_lr == 5.0e-5
    assert p1 == cfg.ppo.model_copy(update={"actor_lr": 5.0e-5})
    assert cfg.ppo.steps != 5 and cfg.ppo.kl_coef == 0.01


def test_invalid_merged_phase_setting_is_reported():
    # 48 does not divide the demo's 8 x 8 = 64 rollouts.
    with pytest.raises(ConfigError, match=r"phase2\.ppo.*mini_batch_size 48 must divide the 64 rollouts"):
        load_config(DEMO, ["phase2.ppo.mini_batch_size=48"])


# ----------------------------------------------------------------------------- validators
def test_mini_batch_must_divide_rollouts():
    with pytest.raises(ValidationError, match=r"mini_batch_size 48 must divide the 64 rollouts"):
        PPOConfig(prompts_per_step=8, samples_per_prompt=8, mini_batch_size=48, micro_batch_size=16)
    with pytest.raises(ConfigError, match=r"mini_batch_size 48"):
        load_config(DEMO, ["ppo.mini_batch_size=48", "ppo.micro_batch_size=16"])


def test_micro_batch_must_divide_mini_batch():
    with pytest.raises(ValidationError, match=r"micro_batch_size 24 must divide mini_batch_size 32"):
        PPOConfig(prompts_per_step=8, samples_per_prompt=8, mini_batch_size=32, micro_batch_size=24)
    with pytest.raises(ConfigError, match=r"micro_batch_size 24 must divide mini_batch_size 32"):
        load_config(DEMO, ["ppo.micro_batch_size=24"])


def test_valid_batch_shapes():
    p = PPOConfig(prompts_per_step=4, samples_per_prompt=8, mini_batch_size=32, micro_batch_size=8)
    assert p.prompts_per_step * p.samples_per_prompt == 32


def test_band_low_above_high():
    with pytest.raises(ValidationError, match=r"band low 0.6 is above high 0.4"):
        Band(low=0.6, high=0.4)
    with pytest.raises(ConfigError, match=r"curation\.phase2_band.*band low 0.9 is above high 0.875"):
        load_config(DEMO, ["curation.phase2_band.low=0.9"])


def test_band_contains_is_closed():
    band = Band(low=0.125, high=0.875)
    assert band.contains(0.125) and band.contains(0.875) and band.contains(0.5)
    assert not band.contains(0.0) and not band.contains(1.0)
    assert Band(low=0.5, high=0.5).contains(0.5)


def test_empty_temperatures_rejected():
    with pytest.raises(ConfigError, match=r"at least one temperature"):
        load_config(DEMO, ["evaluation.temperatures=[]"])


def test_file_source_needs_a_path():
    with pytest.raises(ConfigError, match=r"kind 'file' needs 'path'"):
        load_config(DEMO, ["evaluation.heldout.kind=file"])


# ----------------------------------------------------------------------------- hash
def test_config_hash_is_stable_across_loads():
    h1 = load_config(DEMO).config_hash()
    h2 = load_config(DEMO).config_hash()
    assert h1 == h2
    assert len(h1) == 16 and all(c in "0123456789abcdef" for c in h1)


def test_config_hash_changes_with_a_field():
    base = load_config(DEMO).config_hash()
    assert load_config(DEMO, ["ppo.lam=0.95"]).config_hash() != base
    assert load_config(DEMO, ["phase2.ppo.steps=21"]).config_hash() != base
    # Setting a field to the value it already has changes nothing.
    assert load_config(DEMO, ["ppo.lam=1.0"]).config_hash() == base


def test_config_hash_differs_between_shipped_configs():
    hashes = {p.name: load_config(p).config_hash() for p in CONFIGS.glob("*.yaml")}
    assert len(set(hashes.values())) == len(hashes)


@pytest.mark.parametrize("override", ["reward.correct=inf", "reward.no_box=nan", "ppo.kl_coef=-inf"])
def test_non_finite_numbers_are_refused(override: str) -> None:
    with pytest.raises(ConfigError, match="finite number"):
        load_config(None, [override])
