"""Phase 2 alone, from a finished run's phase-1 model: does a setting shorten answers and keep accuracy?

A whole seed run (``bench.seeds``) takes as long as ``make demo``; phase 2 with its held-out
evaluation takes a third of that. This reruns phase 2 from the phase-1 model and the curated
phase-2 problems that a ``concise-rl run`` (or ``bench.seeds``) left in ``HOME``, under the
config with ``--set`` changes (the pipeline's ``--set`` keys: ``phase2.ppo.actor_lr=4.5e-4``
changes phase 2 alone), then evaluates the result and the phase-1 model on the config's held-out set at
every evaluation temperature and prints one JSON line: the training length per step, held-out
accuracy and mean length of both models, phase 2's length cut and the accuracy change with
its paired 95% CI (the gate's comparison, as ``bench.seeds`` reports it).

    python -m bench.phase2 HOME [--config configs/demo.yaml] [--out DIR] [--set KEY=VALUE ...]

e.g. ``python -m bench.phase2 bench/results/seeds/sft0-rl1 --set ppo.seed=1 phase2.ppo.steps=20``.
Nothing in ``HOME`` is changed; the new policy is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from concise_rl.config import load_config, stable_hash
from concise_rl.evaluation.evaluate import evaluate_model
from concise_rl.evaluation.gate import accuracy_comparison, length_reduction_pct
from concise_rl.grader import Grader
from concise_rl.problems import load_problems
from concise_rl.tasks.stages import device, evaluation_sets
from concise_rl.training.models import load_policy, load_tokenizer
from concise_rl.training.trainer import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def held_out(cfg, model_dir: Path, grader: Grader) -> dict[str, dict]:
    """The held-out evaluation per temperature, as the pipeline's evaluation measures it."""
    tokenizer = load_tokenizer(str(model_dir), prompt=cfg.prompt)
    model = load_policy(str(model_dir), cfg.model, device(cfg)).eval()
    summary, _ = evaluate_model(model, tokenizer, {"heldout": evaluation_sets(cfg)["heldout"]}, cfg.evaluation,
                                cfg.prompt, grader, seed=cfg.seed)
    return summary["heldout"]


def figures(evaluation: dict[str, dict]) -> dict[str, list[float]]:
    """Accuracy (%) and mean length per temperature."""
    return {t: [round(100 * s["accuracy"], 1), round(s["mean_length"], 1)] for t, s in evaluation.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.phase2", description=__doc__.split("\n\n")[0])
    parser.add_argument("home", type=Path, help="a finished run's home (holds checkpoints/phase1/final and curation/)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="the config the home was run with (configs/demo.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "phase2",
                        help="folder for the new phase-2 runs (bench/results/phase2)")
    parser.add_argument("--set", dest="changes", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config changes, as the pipeline's --set: e.g. ppo.seed=1 phase2.ppo.steps=20")
    args = parser.parse_args(argv)
    phase1 = args.home / "checkpoints" / "phase1" / "final"
    curated = sorted(args.home.glob("curation/*/phase2.jsonl"))
    if not phase1.is_dir() or not curated:
        raise SystemExit(f"bench.phase2: {args.home} has no finished phase 1 ({phase1}) or no curated phase-2 "
                         "problems (curation/*/phase2.jsonl); give the home of a finished concise-rl run")
    cfg = load_config(args.config, args.changes)
    name = "_".join(sorted(c.replace("/", "-") for c in args.changes)) or "config"
    if len(name) > 120:  # a folder name must stay under the file system's 255 bytes
        name = "set-" + stable_hash(sorted(args.changes))
    out = args.out / f"{args.home.name}-{name}"
    grader = Grader.from_config(cfg.grader)
    try:
        trainer = PPOTrainer(policy_path=str(phase1), problems=load_problems(str(curated[0])), out_dir=out,
                             ppo_cfg=cfg.ppo_for("phase2"), model_cfg=cfg.model, prompt_cfg=cfg.prompt,
                             reward_cfg=cfg.reward, grader=grader)
        start = time.perf_counter()
        final = trainer.train()
        minutes = (time.perf_counter() - start) / 60
        lengths = [round(json.loads(line)["response_length"]) for line in (out / "metrics.jsonl").open()]
        before, after = held_out(cfg, phase1, grader), held_out(cfg, final, grader)
    finally:
        grader.close()
    # The gate's own comparison: length cut and the paired bootstrap CI of the accuracy change.
    change = {t: accuracy_comparison(after[t], before[t], cfg.gate, f"heldout@T={t}") for t in after}
    cut = {t: length_reduction_pct(after[t]["mean_length"], before[t]["mean_length"]) for t in after}
    result = {
        "home": str(args.home), "set": args.changes, "train_min": round(minutes, 2), "train_lengths": lengths,
        "phase1": figures(before), "phase2": figures(after),
        "cut_pct": {t: round(c, 1) for t, c in cut.items()},
        "acc_change_pts": {t: round(100 * c["difference"], 1) for t, c in change.items()},
        "acc_change_ci_pts": {t: [round(100 * x, 1) for x in c["ci"]] for t, c in change.items()},
    }
    print(json.dumps(result))
    with (args.out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
