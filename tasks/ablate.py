"""`concise-rl ablate`: phase 2 side by side under other settings, all from one start model.

Every variant (names in concise_rl/ablation.py) starts from the model phase 2 starts
from and keeps the config's phase-2 PPO settings except what it is about:

- ``ppo-lam{L}-{AGG}``: GAE lambda and the loss aggregation, on the curated phase-2 set;
- ``grpo-{LOSS}``: TRL's GRPOTrainer with that ``loss_type`` on the same set, with the
  same reward, prompts, batch, sampling, learning rate and KL weight (training/grpo.py);
- ``band-{LOW}-{HIGH}``: ``curation.phase2_num_problems`` problems drawn from that band
  of the latest curation's pass rates instead of the phase-2 set (the paper's
  difficulty study: easier sets should shorten more);
- ``logprob-t{T}``: the log-probs of the importance ratio and the KL scored at
  temperature T (``ppo.logprob_temperature``; the paper's code: 1.0, sampling at 0.6).

Each trained model is evaluated on the held-out set at the config's temperatures,
next to the start model. Layout of the output folder:

    start/                 the start model's evaluation (summary.json, responses.jsonl)
    variants/NAME/         problems.jsonl, train/ (checkpoints, metrics.jsonl, final/),
                           responses.jsonl, result.json
    ablation.md, ablation.json, ablation.png

A variant whose result.json carries the same key (start, problems, settings,
evaluation) is not run again; an interrupted PPO variant resumes from its last
checkpoint, an interrupted GRPO variant starts over.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from pathlib import Path

import mlflow
from accelerate import Accelerator

from concise_rl import paths
from concise_rl.ablation import Variant
from concise_rl.config import Band, PipelineConfig, PPOConfig, stable_hash
from concise_rl.errors import CurationError, TrainingGuardError
from concise_rl.evaluation import plots
from concise_rl.evaluation.evaluate import evaluate_model, temp_key
from concise_rl.evaluation.gate import length_reduction_pct
from concise_rl.files import atomic_write_json, read_jsonl
from concise_rl.grader import Grader
from concise_rl.problems import Problem, load_problems, problems_hash, save_problems
from concise_rl.tasks import tracking
from concise_rl.tasks.model_uri import local_model_dir
from concise_rl.tasks.stages import device, load_source
from concise_rl.training.grpo import GRPORun
from concise_rl.training.models import load_policy, load_tokenizer
from concise_rl.training.trainer import PPOTrainer

log = logging.getLogger(__name__)

# Training metrics logged to MLflow per variant and step (both engines report them).
_STEP_METRICS = ("reward", "accuracy", "response_length", "kl")


class _Curation:
    """The latest curation's phase-2 set and per-problem pass rates, and draws from pass-rate bands."""

    def __init__(self, cfg: PipelineConfig, folder: Path):
        self.cfg = cfg
        self.folder = folder
        self.phase2 = load_problems(folder / "phase2.jsonl")
        self.rates = {row["problem_id"]: row["pass_rate"] for row in read_jsonl(folder / "pass_rates.jsonl")}
        self._candidates: list[Problem] | None = None

    def mean_pass_rate(self, problems: list[Problem]) -> float | None:
        rates = [self.rates[p.id] for p in problems if p.id in self.rates]
        return sum(rates) / len(rates) if rates else None

    def candidates(self) -> list[Problem]:
        """The curated candidates, rebuilt from the config's source; they must be the ones the rates were measured on."""
        if self._candidates is None:
            by_id = {p.id: p for p in load_source(self.cfg.curation.candidates)}
            missing = [pid for pid in self.rates if pid not in by_id]
            if missing:
                raise CurationError(
                    f"curation {self.folder} measured problems that curation.candidates of this config does not "
                    f"contain ({len(missing)} of {len(self.rates)}, e.g. {missing[0]!r}); run `concise-rl curate` "
                    "with this config first"
                )
            self._candidates = [by_id[pid] for pid in self.rates]
        return self._candidates

    def draw(self, band: tuple[float, float], n: int) -> list[Problem]:
        """Up to ``n`` candidates whose pass rate lies in ``band``, drawn at random (fixed by the config's seed)."""
        inside = Band(low=band[0], high=band[1])
        pool = [p for p in self.candidates() if inside.contains(self.rates[p.id])]
        return random.Random(self.cfg.seed).sample(pool, min(n, len(pool)))


def default_out_dir(cfg: PipelineConfig, start: dict[str, str], curation: Path, ppo: PPOConfig,
                    eval_problems: int | None) -> Path:
    """One folder per start model, curation and settings, so a quick run never overwrites a full one."""
    key = stable_hash({"start": start["uri"], "curation": curation.name, "config": cfg.config_hash(),
                       "ppo": ppo.model_dump(mode="json"), "eval_problems": eval_problems})
    label = f"v{start['version']}" if start["version"] != "local" else "local"
    return paths.home() / "ablations" / f"{cfg.registry.model_name}-{label}-{key}"


def run_ablation(
    cfg: PipelineConfig,
    *,
    start: dict[str, str],
    curation_dir: str | Path,
    variants: list[Variant],
    out_dir: str | Path | None = None,
    steps: int | None = None,
    eval_problems: int | None = None,
) -> dict:
    """Train and evaluate every variant from ``start``; returns the report (also written to the output folder).

    ``start`` is ``{"version", "uri"}`` as the CLI resolves it; ``steps`` overrides the
    phase-2 RL steps of every variant; ``eval_problems`` keeps the first N held-out problems.
    """
    if not variants:
        raise ValueError("no variant to run; name at least one (see `concise-rl ablate --help`)")
    curation = _Curation(cfg, Path(curation_dir))
    ppo = cfg.ppo_for("phase2")
    if steps is not None:
        ppo = PPOConfig.model_validate({**ppo.model_dump(), "steps": steps})
    if cfg.evaluation.heldout is None:
        raise ValueError("the ablation evaluates on evaluation.heldout, which is null; set it to a problem source")
    heldout = load_source(cfg.evaluation.heldout, split="heldout")[:eval_problems]
    out = Path(out_dir) if out_dir else default_out_dir(cfg, start, curation.folder, ppo, eval_problems)
    tracking.setup(cfg)
    start_dir = local_model_dir(cfg, start["uri"])
    # What every variant's result depends on besides its own training settings and problems.
    common = {"start": start["uri"], "model": cfg.model.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(),
              "reward": cfg.reward.model_dump(), "eval": cfg.evaluation.model_dump(mode="json"),
              "heldout": problems_hash(heldout), "seed": cfg.seed}
    log.info("ablation of %d variant(s) from %s into %s", len(variants), start["uri"], out)

    with tracking.stage_run(cfg, "ablate", start_uri=start["uri"]) as run:
        mlflow.log_params({"ablate.variants": ",".join(v.name for v in variants), "ablate.steps": ppo.steps,
                           "ablate.eval_problems": len(heldout), "ablate.curation": str(curation.folder),
                           "ablate.out_dir": str(out)})
        start_eval = _evaluate_start(cfg, start_dir, heldout, out / "start", stable_hash(common))
        results = []
        for i, variant in enumerate(variants, 1):
            log.info("variant %d/%d: %s", i, len(variants), variant.name)
            result = _run_variant(cfg, variant, ppo, curation, start_dir, heldout, out / "variants" / variant.name,
                                  common)
            results.append(result)
            if result["status"] == "done":
                _log_eval(variant.name, result["eval"], start_eval)
        report = _report(cfg, start, start_dir, curation, ppo, heldout, start_eval, results, out, run.info.run_id)
        for name in ("ablation.md", "ablation.json", "ablation.png"):
            mlflow.log_artifact(str(out / name), artifact_path="ablation")
    return report


# --------------------------------------------------------------------------- one variant
def _run_variant(cfg: PipelineConfig, variant: Variant, ppo: PPOConfig, curation: _Curation, start_dir: str,
                 heldout: list[Problem], vdir: Path, common: dict) -> dict:
    problems, note = curation.phase2, ""
    if variant.kind == "band":
        wanted = cfg.curation.phase2_num_problems
        problems = curation.draw(variant.band, wanted)
        low, high = variant.band
        if not problems:
            note = f"skipped: no curated problem has a pass rate in [{low}, {high}]"
            log.warning("%s %s", variant.name, note)
            return {"variant": variant.name, "kind": variant.kind, "status": "skipped", "note": note, "problems": 0}
        if len(problems) < wanted:
            note = f"only {len(problems)} of {wanted} problems in band [{low}, {high}]"
            log.warning("%s: %s", variant.name, note)
    settings = ppo
    if variant.kind == "ppo":
        settings = PPOConfig.model_validate({**ppo.model_dump(), "lam": variant.lam,
                                             "loss_agg_mode": variant.loss_agg_mode})
    elif variant.kind == "logprob":
        settings = PPOConfig.model_validate({**ppo.model_dump(), "logprob_temperature": variant.logprob_temperature})
    key = stable_hash({"common": common, "variant": variant.name, "ppo": settings.model_dump(mode="json"),
                       "problems": problems_hash(problems)})
    result_file = vdir / "result.json"
    if result_file.is_file():
        previous = json.loads(result_file.read_text())
        if previous.get("key") == key:
            log.info("%s already done in %s", variant.name, vdir)
            return previous
    save_problems(problems, vdir / "problems.jsonl")

    t0 = time.perf_counter()
    try:
        final = _train(cfg, variant, settings, problems, start_dir, vdir / "train")
    except TrainingGuardError as exc:
        # One variant that diverges is a result of the ablation, not a reason to lose the others:
        # it gets a row that says which guard stopped it, and a re-run with the same settings keeps it.
        stop = exc.stop
        note = f"stopped by the {stop.get('guard', 'training')} guard at step {stop.get('step', '?')}"
        log.warning("%s %s: %s", variant.name, note, exc)
        result = {"variant": variant.name, "kind": variant.kind, "status": "stopped", "key": key, "note": note,
                  "steps": settings.steps, "problems": len(problems), "stop": stop,
                  "train_seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(result_file, result)
        return result
    t1 = time.perf_counter()
    evals = _evaluate(cfg, final, heldout, vdir)
    result = {
        "variant": variant.name, "kind": variant.kind, "status": "done", "key": key, "note": note,
        "steps": settings.steps, "problems": len(problems), "train_pass_rate": curation.mean_pass_rate(problems),
        # GRPO has no GAE or PPO aggregation; its GRPOConfig is mapped from the same phase-2 settings.
        "settings": {"algorithm": "grpo" if variant.kind == "grpo" else "ppo", "loss_type": variant.loss_type,
                     "lam": None if variant.kind == "grpo" else settings.lam,
                     "loss_agg_mode": None if variant.kind == "grpo" else settings.loss_agg_mode,
                     "logprob_temperature": None if variant.kind == "grpo" else settings.logprob_temperature,
                     "band": variant.band, "ppo": settings.model_dump(mode="json")},
        "model_dir": str(final), "train_seconds": round(t1 - t0, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1), "eval": evals,
    }
    atomic_write_json(result_file, result)
    return result


def _train(cfg: PipelineConfig, variant: Variant, settings: PPOConfig, problems: list[Problem], start_dir: str,
           train_dir: Path) -> Path:
    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics({f"{variant.name}.{k}": metrics[k] for k in _STEP_METRICS if k in metrics}, step=step)

    dev = device(cfg)
    with Grader.from_config(cfg.grader) as grader:
        if variant.kind == "grpo":
            return GRPORun(
                policy_path=start_dir, problems=problems, out_dir=train_dir, ppo_cfg=settings,
                loss_type=variant.loss_type, model_cfg=cfg.model, prompt_cfg=cfg.prompt, reward_cfg=cfg.reward,
                grader=grader, device=dev, on_step=on_step,
            ).train()
        return PPOTrainer(
            policy_path=start_dir, problems=problems, out_dir=train_dir, ppo_cfg=settings, model_cfg=cfg.model,
            prompt_cfg=cfg.prompt, reward_cfg=cfg.reward, grader=grader, on_step=on_step,
            accelerator=Accelerator(cpu=dev.type == "cpu"),
        ).train()


# --------------------------------------------------------------------------- evaluation
def _evaluate(cfg: PipelineConfig, model_dir: str | Path, heldout: list[Problem], out: Path) -> dict[str, dict]:
    """{temperature: metrics} on the held-out set; every graded response goes to out/responses.jsonl."""
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=cfg.model.trust_remote_code, prompt=cfg.prompt)
    model = load_policy(str(model_dir), cfg.model, device=device(cfg))
    with Grader.from_config(cfg.grader) as grader:
        summary, records = evaluate_model(model, tokenizer, {"heldout": heldout}, cfg.evaluation, cfg.prompt, grader,
                                          seed=cfg.seed, engine=cfg.model.generation_engine)
    del model
    gc.collect()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "responses.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return summary["heldout"]


def _evaluate_start(cfg: PipelineConfig, start_dir: str, heldout: list[Problem], out: Path, key: str) -> dict:
    summary_file = out / "summary.json"
    if summary_file.is_file():
        cached = json.loads(summary_file.read_text())
        if cached.get("key") == key:
            return cached["eval"]
    evals = _evaluate(cfg, start_dir, heldout, out)
    atomic_write_json(summary_file, {"key": key, "eval": evals})
    return evals


def _log_eval(name: str, evals: dict[str, dict], start_eval: dict[str, dict]) -> None:
    metrics = {}
    for t, m in evals.items():
        metrics[f"{name}.heldout.T{t}.accuracy_pct"] = 100 * m["accuracy"]
        metrics[f"{name}.heldout.T{t}.mean_length"] = m["mean_length"]
        metrics[f"{name}.heldout.T{t}.length_reduction_pct"] = length_reduction_pct(
            m["mean_length"], start_eval[t]["mean_length"])
    tracking.log_metrics(metrics)


# --------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(start_label: str, start_eval: dict[str, dict], results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per temperature, mean length, its cut vs the start, accuracy with CI and its change."""
    temps = list(start_eval)
    header = ["variant", "RL steps", "problems", "train pass rate"]
    for t in temps:
        header += [f"T={t} length", f"T={t} length cut %", f"T={t} accuracy % [95% CI]", f"T={t} accuracy change"]
    header.append("note")

    def cells(evals: dict[str, dict], reference: dict[str, dict] | None) -> list[str]:
        out = []
        for t in temps:
            m = evals[t]
            lo, hi = m["accuracy_ci"]
            cut = "" if reference is None else f"{length_reduction_pct(m['mean_length'], reference[t]['mean_length']):.1f}"
            change = "" if reference is None else f"{100 * (m['accuracy'] - reference[t]['accuracy']):+.1f}"
            out += [f"{m['mean_length']:.1f}", cut, f"{_pct(m['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", change]
        return out

    rows = [[start_label, "", "", "", *cells(start_eval, None), "start model"]]
    for r in results:
        if r["status"] != "done":
            rows.append([r["variant"], "", str(r["problems"]), "", *[""] * (4 * len(temps)), r["note"]])
            continue
        rate = "" if r["train_pass_rate"] is None else f"{r['train_pass_rate']:.2f}"
        rows.append([r["variant"], str(r["steps"]), str(r["problems"]), rate, *cells(r["eval"], start_eval), r["note"]])
    return header, rows


def markdown(header: list[str], rows: list[list[str]], intro: str) -> str:
    lines = ["# Phase-2 ablation", "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _report(cfg: PipelineConfig, start: dict[str, str], start_dir: str, curation: _Curation, ppo: PPOConfig,
            heldout: list[Problem], start_eval: dict, results: list[dict], out: Path, run_id: str) -> dict:
    start_label = f"start (v{start['version']})" if start["version"] != "local" else "start (local)"
    header, rows = table(start_label, start_eval, results)
    temps = ", ".join(temp_key(t) for t in cfg.evaluation.temperatures)
    intro = (
        f"Start model: `{start['uri']}`. Every variant: {ppo.steps} RL steps of {ppo.prompts_per_step} prompts x "
        f"{ppo.samples_per_prompt} samples from the start model, on the {len(curation.phase2)} curated phase-2 "
        f"problems (band variants: problems drawn from that pass-rate band of `{curation.folder}`). Held-out set: "
        f"{len(heldout)} problems at T = {temps}; length is the mean response length in tokens, its cut and the "
        "accuracy change (points) are against the start model; accuracy is pass@1 with a 95% bootstrap CI. "
        "Train pass rate: the mean curated pass rate of a variant's training problems."
    )
    text = markdown(header, rows, intro)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    done = {r["variant"]: r["eval"] for r in results if r["status"] == "done"}
    plots.plot_ablation(start_eval, done, out / "ablation.png")
    report = {
        "start": {**start, "dir": start_dir, "eval": start_eval},
        "curation": str(curation.folder),
        "heldout_problems": len(heldout),
        "temperatures": [temp_key(t) for t in cfg.evaluation.temperatures],
        "phase2_ppo": ppo.model_dump(mode="json"),
        "variants": results,
        "header": header,
        "rows": rows,
        "mlflow_run_id": run_id,
    }
    atomic_write_json(out / "ablation.json", report)
    return {**report, "markdown": text, "out_dir": str(out)}
