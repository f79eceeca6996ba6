"""training/prebuilt.py: the demo's base, shipped in the repository and copied instead of built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from concise_rl.config import load_config
from concise_rl.errors import ModelLoadError
from concise_rl.tasks import stages, tracking
from concise_rl.training import prebuilt
from concise_rl.training.models import embedded_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_the_demo_config_names_the_shipped_base_and_its_files_are_intact() -> None:
    """Fails after any change to the demo's embedded config or to training/embedded.py or
    concise_rl/synthetic.py (they name the base): rebuild and ship it with `python -m bench.base --ship`."""
    name = embedded_dir(load_config(DEMO).model).name
    shipped = prebuilt.manifest()
    assert list(shipped) == [name], (
        f"configs/demo.yaml now names the base {name}, but training/prebuilt/ ships {list(shipped)}; "
        "run `python -m bench.base --ship` and commit training/prebuilt/")
    assert prebuilt.file_hashes(prebuilt.PREBUILT / name) == shipped[name]["files"]
    built = shipped[name]["built"]
    assert {"command", "commit", "date", "cpu", "aten_cpu_capability", "torch", "transformers"} <= set(built)
    # float32 weights, as the config's sft_dtype says the SFT ran.
    weights = load_file(prebuilt.PREBUILT / name / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}


def test_the_base_stage_copies_the_shipped_base_and_registers_it(mlflow_home: Path) -> None:
    cfg = load_config(DEMO)
    base = stages.prepare_base(cfg)
    target = embedded_dir(cfg.model)
    assert target.is_relative_to(mlflow_home)
    shipped = prebuilt.manifest()[target.name]["files"]
    assert prebuilt.file_hashes(target) == shipped
    assert not target.with_name(target.name + ".tmp").exists()
    version = tracking.setup(cfg).get_model_version(cfg.registry.model_name, base["version"])
    assert version.tags["phase"] == "base"
    assert prebuilt.install(target) is False, "a base already in the home is left as it is"


def test_a_changed_shipped_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "prebuilt"
    shutil.copytree(prebuilt.PREBUILT, root)
    (name,) = prebuilt.manifest(root)
    # What a checkout without Git LFS leaves, for example.
    (root / name / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    target = tmp_path / "home" / "models" / name
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*use_prebuilt=false"):
        prebuilt.install(target, root)
    assert not target.exists()


def test_no_shipped_base_of_that_name_means_nothing_is_copied(tmp_path: Path) -> None:
    assert prebuilt.install(tmp_path / "models" / "embedded-demo-0000000000000000") is False
    assert not (tmp_path / "models").exists()


def test_ship_keeps_one_base_and_records_how_it_was_built(tmp_path: Path) -> None:
    root = tmp_path / "prebuilt"
    for name, text in (("embedded-demo-aaaa", "first"), ("embedded-demo-bbbb", "second")):
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(text)
        prebuilt.ship(model, name, {"command": f"ship {text}"}, root)
    assert list(prebuilt.manifest(root)) == ["embedded-demo-bbbb"]
    assert not (root / "embedded-demo-aaaa").exists()
    assert prebuilt.manifest(root)["embedded-demo-bbbb"]["built"] == {"command": "ship second"}
    assert prebuilt.install(tmp_path / "home" / "embedded-demo-bbbb", root) is True
    assert (tmp_path / "home" / "embedded-demo-bbbb" / "config.json").read_text() == "second"
