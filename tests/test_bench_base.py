"""bench/base.py: the embedded base alone, built under --set changes and evaluated as the pipeline does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_pipeline_e2e import ROOT, TINY

SMALL_EVAL = ["evaluation.benchmarks.hard.num_problems=4", "evaluation.heldout.num_problems=6"]


def bench_base(out: Path, *changes: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "bench.base", "--out", str(out), "--set", *TINY, *SMALL_EVAL, *changes]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_base_bench_builds_once_per_setting_and_evaluates_every_set(tmp_path: Path) -> None:
    done = bench_base(tmp_path, "model.embedded.sft_seed=4")
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert "model.embedded.sft_seed=4" in line["set"]
    assert set(line["accuracy_length"]) == {"heldout", "hard"}
    for temps in line["accuracy_length"].values():
        assert set(temps) == {"0.0", "0.6"}
        assert all(0 <= acc <= 100 and length > 0 for acc, length in temps.values())
    model = Path(line["model"])
    assert (model / "config.json").is_file() and model.parent == tmp_path
    weights = (model / "model.safetensors").stat().st_mtime_ns

    # The same settings evaluate the base already built; another seed builds a second one.
    again = json.loads(bench_base(tmp_path, "model.embedded.sft_seed=4").stdout.strip().splitlines()[-1])
    assert again["model"] == line["model"] and (model / "model.safetensors").stat().st_mtime_ns == weights
    assert again["accuracy_length"] == line["accuracy_length"], "the evaluation is seeded"
    other = json.loads(bench_base(tmp_path, "model.embedded.sft_seed=5").stdout.strip().splitlines()[-1])
    assert other["model"] != line["model"]
    assert line["matches_shipped"] is None and not line["shipped"], "no base of this config is shipped"


def test_base_bench_ships_the_base_it_built_and_compares_with_it(tmp_path: Path) -> None:
    shipped = tmp_path / "prebuilt"
    done = bench_base(tmp_path / "out", "model.embedded.sft_seed=4", "--prebuilt", str(shipped), "--ship")
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["shipped"] and line["matches_shipped"] is True
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert list(manifest) == [line["name"]] and line["name"].startswith("embedded-demo-")
    built = manifest[line["name"]]["built"]
    assert built["command"].startswith("python -m bench.base --ship --set") and built["cpu"]
    assert built["aten_cpu_capability"] == line["kernels"] and line["kernels"] in {"AVX512", "AVX2", "DEFAULT"}
    again = json.loads(bench_base(tmp_path / "out", "model.embedded.sft_seed=4", "--prebuilt", str(shipped))
                       .stdout.strip().splitlines()[-1])
    assert again["matches_shipped"] is True and not again["shipped"]


def test_base_bench_refuses_a_config_without_an_embedded_base(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.base", "--out", str(tmp_path), "--set",
                           "model.name_or_path=/nowhere/model"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "embedded" in done.stderr and "/nowhere/model" in done.stderr
