"""`concise-rl ablate`: variant names, the table, refusals, and a real small ablation.

The real run starts from a tiny Qwen2 taught to answer either with a random boxed
digit or with no box at all, so rewards vary within each group of samples and GRPO
(whose advantage is zero when a group's rewards are all equal) has something to learn from.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bench.mechanism import tiny_random_model
from concise_rl.ablation import DEFAULT_BANDS, Variant, default_variants, parse_bands, parse_variants
from concise_rl.config import PromptConfig
from concise_rl.synthetic import generate_problems
from concise_rl.training.models import format_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_HOME", None)
    return subprocess.run([sys.executable, "-m", "concise_rl.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# --------------------------------------------------------------------------- names
def test_default_variants_cover_lambda_aggregation_grpo_and_bands():
    names = [v.name for v in default_variants()]
    assert names == [
        "ppo-lam0.95-seq-mean-token-mean", "ppo-lam0.95-token-mean", "ppo-lam0.95-seq-mean-token-sum-norm",
        "ppo-lam1.0-seq-mean-token-mean", "ppo-lam1.0-token-mean", "ppo-lam1.0-seq-mean-token-sum-norm",
        "grpo-grpo", "grpo-dr_grpo", "grpo-dapo", "grpo-bnpo", "logprob-t1.0",
        "band-0.125-0.375", "band-0.375-0.625", "band-0.625-0.875",
    ]
    assert [v.band for v in default_variants() if v.kind == "band"] == list(DEFAULT_BANDS)


def test_variant_names_parse_to_canonical_variants():
    variants = parse_variants(" ppo-lam1-token-mean, grpo-dapo,band-0.2-.5,,ppo-lam1.0-token-mean,logprob-t1")
    assert variants == [
        Variant("ppo", lam=1.0, loss_agg_mode="token-mean"),
        Variant("grpo", loss_type="dapo"),
        Variant("band", band=(0.2, 0.5)),
        Variant("logprob", logprob_temperature=1.0),
    ], "names are canonical and duplicates dropped"
    assert [v.name for v in variants] == ["ppo-lam1.0-token-mean", "grpo-dapo", "band-0.2-0.5", "logprob-t1.0"]
    assert parse_bands("0.125-0.375, 0.6-1") == [(0.125, 0.375), (0.6, 1.0)]


@pytest.mark.parametrize("text, expected", [
    ("ppo-lam0.95-mean", "unknown variant 'ppo-lam0.95-mean'"),
    ("grpo-cispo", "unknown variant 'grpo-cispo'"),
    ("ppo-lam1.5-token-mean", "lambda must be in [0, 1]"),
    ("band-0.6-0.2", "0 <= LOW <= HIGH <= 1"),
    ("logprob-t0", "the log-prob temperature must be above 0"),
    (" , ", "no variant named"),
])
def test_bad_variant_names_are_refused_with_what_is_valid(text, expected):
    with pytest.raises(ValueError) as info:
        parse_variants(text)
    assert expected in str(info.value)
    if "unknown" in expected:
        for valid in ("ppo-lam0.95-seq-mean-token-mean", "ppo-lam1.0-token-mean", "grpo-dr_grpo", "grpo-bnpo",
                      "logprob-t1.0", "band-LOW-HIGH"):
            assert valid in str(info.value)


@pytest.mark.parametrize("text", ["0.5-0.2", "low-high", "0.1", ""])
def test_bad_bands_are_refused(text):
    with pytest.raises(ValueError, match="band"):
        parse_bands(text)


# --------------------------------------------------------------------------- the table
def test_table_compares_each_variant_with_the_start_model():
    from concise_rl.tasks.ablate import table

    def m(acc, lo, hi, length):
        return {"accuracy": acc, "accuracy_ci": [lo, hi], "mean_length": length}

    start = {"0.0": m(0.5, 0.4, 0.6, 100.0), "0.6": m(0.45, 0.35, 0.55, 80.0)}
    results = [
        {"variant": "ppo-lam1.0-token-mean", "status": "done", "steps": 30, "problems": 8, "train_pass_rate": 0.5,
         "note": "", "eval": {"0.0": m(0.6, 0.5, 0.7, 75.0), "0.6": m(0.4, 0.3, 0.5, 88.0)}},
        {"variant": "band-0.625-0.875", "status": "skipped", "problems": 0,
         "note": "skipped: no curated problem has a pass rate in [0.625, 0.875]"},
    ]
    header, rows = table("start (v2)", start, results)
    assert header == [
        "variant", "RL steps", "problems", "train pass rate",
        "T=0.0 length", "T=0.0 length cut %", "T=0.0 accuracy % [95% CI]", "T=0.0 accuracy change",
        "T=0.6 length", "T=0.6 length cut %", "T=0.6 accuracy % [95% CI]", "T=0.6 accuracy change", "note",
    ]
    assert rows[0] == ["start (v2)", "", "", "", "100.0", "", "50.0 [40.0, 60.0]", "", "80.0", "",
                       "45.0 [35.0, 55.0]", "", "start model"]
    assert rows[1] == ["ppo-lam1.0-token-mean", "30", "8", "0.50", "75.0", "25.0", "60.0 [50.0, 70.0]", "+10.0",
                       "88.0", "-10.0", "40.0 [30.0, 50.0]", "-5.0", ""]
    assert rows[2][0] == "band-0.625-0.875" and rows[2][-1].startswith("skipped")
    assert len(rows[2]) == len(header)


# --------------------------------------------------------------------------- refusals
def test_cli_refuses_unknown_variant_missing_curation_and_missing_phase1_model(tmp_path):
    """Three bad starts side by side (two cores): each exits 2 with a message that says what to do."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_HOME", None)
    with_curation = tmp_path / "curated"
    (with_curation / "curation" / "abc").mkdir(parents=True)
    (with_curation / "curation" / "latest").write_text("abc")

    def start(home: Path, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "concise_rl.cli", "ablate", *args], cwd=ROOT,
                                env={**env, "CONCISE_RL_HOME": str(home)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = {
        "variant": start(tmp_path / "a", "--variants", "ppo-lam0.95-token-mean,grpo-nope"),
        "curation": start(tmp_path / "b"),
        "phase1": start(with_curation),
    }
    results = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}

    (_, err), code = results["variant"]
    assert code == 2
    assert "argument --variants: unknown variant 'grpo-nope'" in err
    assert "grpo-dr_grpo" in err and "ppo-lam1.0-seq-mean-token-sum-norm" in err

    (_, err), code = results["curation"]
    assert code == 2, err
    assert err.startswith("concise-rl ablate: no curation has run yet")
    assert "concise-rl run" in err and "concise-rl train --phase 1" in err
    assert "Traceback" not in err

    (_, err), code = results["phase1"]
    assert code == 2, err
    assert "no alias 'phase1'" in err and "concise-rl run" in err and "--start" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- a real run
def boxing_model(out: Path, seed: int = 0) -> Path:
    """The tiny random Qwen2, taught to reply either 'The answer is \\boxed{D}.' (D random) or a longer
    'I am not sure what the final digit is.', so responses differ in reward and in length."""
    tiny_random_model(out, seed)
    tok = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    rng = random.Random(seed)
    pairs = []
    for p in generate_problems(64, seed=seed, min_level=2, max_level=3, distinct=False):
        boxed = f"The answer is \\boxed{{{rng.randrange(10)}}}."
        reply = boxed if rng.random() < 0.5 else "I am not sure what the final digit is."
        pairs.append((format_prompt(p.prompt, tok, PromptConfig()), reply + tok.eos_token))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(60):
        batch = rng.sample(pairs, 16)
        enc = tok([a + b for a, b in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for i, (prompt, _) in enumerate(batch):  # learn the reply only; prompts are left-padded
            labels[i, : int((enc.attention_mask[i] == 0).sum()) + len(tok(prompt, add_special_tokens=False).input_ids)] = -100
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def tiny_config(model: Path) -> list[str]:
    return [
        f"model.name_or_path={model}", "device=cpu",
        "curation.candidates.num_problems=12", "curation.candidates.min_level=2", "curation.candidates.max_level=3",
        "curation.samples_per_problem=4", "curation.max_new_tokens=24",
        "curation.phase1_band.low=0.0", "curation.phase1_band.high=1.0",
        "curation.phase2_band.low=0.0", "curation.phase2_band.high=1.0",
        "curation.phase2_num_problems=16",  # more than the 12 candidates: a band falls short
        "ppo.steps=1", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=4", "ppo.mini_batch_size=4",
        "ppo.micro_batch_size=2", "ppo.max_new_tokens=24", "ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3",
        "ppo.checkpoint_every=1", "phase2.ppo.steps=3",
        "evaluation.heldout.min_level=2", "evaluation.heldout.max_level=3", "evaluation.max_new_tokens=24",
        "evaluation.bootstrap_samples=100", "registry.experiment=ablate-test",
    ]


@pytest.mark.slow
def test_small_ablation_end_to_end(tmp_path: Path) -> None:
    """Every stage runs through the CLI, in its own process: MLflow's tracking and registry URIs are
    process-wide (and exported to the environment), so in-process stages would leak into later tests."""
    from mlflow import MlflowClient

    home = tmp_path / "home"
    settings = [a for o in tiny_config(boxing_model(tmp_path / "start-model")) for a in ("--set", o)]
    # What `concise-rl run` leaves behind before phase 2: a curation and a registered phase-1 model.
    for command in (["curate"], ["train", "--phase", "1"]):
        done = run_cli(home, *command, *settings)
        assert done.returncode == 0, done.stderr[-4000:]
    curation = home / "curation" / (home / "curation" / "latest").read_text().strip()

    out = tmp_path / "ablation"
    names = ["ppo-lam0.95-seq-mean-token-mean", "ppo-lam1.0-token-mean", "grpo-dr_grpo", "logprob-t1.0",
             "band-0.0-1.0", "band-1.0-1.0"]
    ablate = ["ablate", *settings, "--variants", ",".join(names), "--steps", "2", "--eval-problems", "6", "-o", str(out)]
    proc = run_cli(home, *ablate)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "ablation.json").read_text())
    assert report["start"]["uri"] == "models:/concise-rl-demo/2", "the default start is the phase-1 model (v2)"
    assert report["curation"] == str(curation)
    assert report["temperatures"] == ["0.0", "0.6"] and report["heldout_problems"] == 6
    assert report["header"][:4] == ["variant", "RL steps", "problems", "train pass rate"]
    assert len(report["header"]) == 4 + 4 * 2 + 1
    assert [row[0] for row in report["rows"]] == ["start (v2)", *names]
    text = (out / "ablation.md").read_text()
    assert text in proc.stdout
    assert "| " + " | ".join(report["header"]) + " |" in text
    assert (out / "ablation.png").stat().st_size > 10_000

    rates = [json.loads(line)["pass_rate"] for line in (curation / "pass_rates.jsonl").read_text().splitlines()]
    phase2_size = len((curation / "phase2.jsonl").read_text().splitlines())
    start_eval = report["start"]["eval"]
    by_name = {r["variant"]: r for r in report["variants"]}
    for name, row in zip(names, report["rows"][1:]):
        result = by_name[name]
        if name == "band-1.0-1.0" and not any(r == 1.0 for r in rates):
            assert result["status"] == "skipped" and row[2] == "0"
            assert row[-1] == "skipped: no curated problem has a pass rate in [1.0, 1.0]"
            continue
        assert result["status"] == "done" and row[1] == "2"
        expected_problems = 12 if name.startswith("band-0.0") else phase2_size
        assert row[2] == str(expected_problems) == str(result["problems"])
        if name == "band-0.0-1.0":
            assert row[-1] == "only 12 of 16 problems in band [0.0, 1.0]"
        for i, t in enumerate(("0.0", "0.6")):
            m, s = result["eval"][t], start_eval[t]
            length, cut, acc, change = row[4 + 4 * i: 8 + 4 * i]
            assert float(length) == pytest.approx(m["mean_length"], abs=0.05)
            assert float(cut) == pytest.approx(100 * (1 - m["mean_length"] / s["mean_length"]), abs=0.05)
            assert acc.startswith(f"{100 * m['accuracy']:.1f} [")
            assert float(change) == pytest.approx(100 * (m["accuracy"] - s["accuracy"]), abs=0.05)
            assert m["n"] == 6
        rows = [json.loads(x) for x in (out / "variants" / name / "train" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(0 < r["response_length"] <= 24 for r in rows)
    assert by_name["ppo-lam1.0-token-mean"]["settings"]["ppo"]["lam"] == 1.0
    assert by_name["ppo-lam1.0-token-mean"]["settings"]["ppo"]["loss_agg_mode"] == "token-mean"
    assert by_name["grpo-dr_grpo"]["settings"]["loss_type"] == "dr_grpo"
    assert by_name["logprob-t1.0"]["settings"]["logprob_temperature"] == 1.0
    assert by_name["ppo-lam1.0-token-mean"]["settings"]["logprob_temperature"] is None

    # GRPO trained: its weights moved away from the start model's.
    before = load_file(str(Path(report["start"]["dir"]) / "model.safetensors"))
    after = load_file(str(out / "variants" / "grpo-dr_grpo" / "train" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "GRPO changed no weight"

    # One MLflow run in the config's experiment, with each variant's figures and the table.
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablate-test")
    [run] = client.search_runs([experiment.experiment_id], "tags.stage = 'ablate'")
    assert run.data.params["ablate.variants"] == ",".join(names)
    assert run.data.metrics["grpo-dr_grpo.heldout.T0.0.accuracy_pct"] == pytest.approx(
        100 * by_name["grpo-dr_grpo"]["eval"]["0.0"]["accuracy"])
    assert {f.path for f in client.list_artifacts(run.info.run_id, "ablation")} == {
        "ablation/ablation.md", "ablation/ablation.json", "ablation/ablation.png"}

    # A re-run trains and evaluates nothing again: every finished variant is reused as it is.
    done = [n for n in names if by_name[n]["status"] == "done"]
    stamps = {n: (out / "variants" / n / "result.json").stat().st_mtime_ns for n in done}
    again = run_cli(home, *ablate)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "ablation.json").read_text())["rows"] == report["rows"]
    assert {n: (out / "variants" / n / "result.json").stat().st_mtime_ns for n in done} == stamps
    for n in done:
        assert f"{n} already done in {out / 'variants' / n}" in again.stderr

    # A variant a training guard stops gets a row that says so, and the others still run: a budget of
    # 2 tokens truncates every PPO response (GRPO has no guards and trains on).
    stopped_out = tmp_path / "ablation-stopped"
    guarded = ["ablate", *settings, "--variants", "ppo-lam1.0-token-mean,grpo-dr_grpo", "--steps", "2",
               "--eval-problems", "6", "-o", str(stopped_out), "--set", "phase2.ppo.max_new_tokens=2",
               "--set", "phase2.ppo.guards.max_truncation_rate=0.01", "--set", "phase2.ppo.guards.truncation_patience=1"]
    proc = run_cli(home, *guarded)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((stopped_out / "ablation.json").read_text())
    ppo_result, grpo_result = report["variants"]
    assert ppo_result["status"] == "stopped" and grpo_result["status"] == "done"
    assert ppo_result["stop"]["guard"] == "runaway length" and ppo_result["stop"]["step"] == 1
    ppo_row = report["rows"][1]
    assert ppo_row[0] == "ppo-lam1.0-token-mean" and ppo_row[-1] == "stopped by the runaway length guard at step 1"
    assert ppo_row[2] == str(phase2_size) and ppo_row[4:-1] == [""] * 8
    assert not (stopped_out / "variants" / "ppo-lam1.0-token-mean" / "train" / "final").exists()
    assert "ppo-lam1.0-token-mean stopped by the runaway length guard at step 1" in proc.stderr
