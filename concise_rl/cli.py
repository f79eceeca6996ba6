"""``concise-rl``: the whole pipeline (``run``) or one stage at a time.

Exit codes: 0 success; 2 bad input (config, data, model path) with a message that
says what to change; 3 the phase-2 candidate failed the promotion gate; 1 anything
else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from concise_rl import paths

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3

DESCRIPTION = """\
Two-phase PPO post-training that makes a reasoning model concise without losing
accuracy (Fatemi et al., "Concise Reasoning via Reinforcement Learning").

  run        the whole Prefect flow: base -> curate -> phase 1 -> register ->
             phase 2 -> register -> evaluate -> gate/promote
  curate     measure pass rates and pick the phase-1 and phase-2 problem sets
  train      one PPO phase (--phase 1 or 2), then register the result
  evaluate   evaluate registered models on the held-out sets
  promote    gate the phase-2 candidate against its parent and move 'champion'

State lives under ./.concise-rl (or $CONCISE_RL_HOME): mlflow.db, mlartifacts/,
checkpoints/phase1|phase2, curation/, evaluations/, reports/latest/summary.json.
"""

EPILOG = """\
examples:
  concise-rl run --config configs/demo.yaml
  concise-rl run --config configs/demo.yaml --set ppo.lam=1.0 --set phase2.ppo.steps=20
  concise-rl train --phase 2 --config configs/demo.yaml --model models:/concise-rl-demo@phase1
  concise-rl evaluate --config configs/demo.yaml

exit codes: 0 ok, 1 error, 2 bad input (the message names it), 3 gate failed
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="pipeline config YAML (default: the built-in defaults, i.e. the paper's PPO "
                   "settings on the embedded model; configs/demo.yaml is the 15-minute CPU demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config field, repeatable; values are read as YAML "
                        "(e.g. --set ppo.lam=0.95 --set evaluation.temperatures=[0,0.6])")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concise-rl", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole two-phase pipeline as a Prefect flow",
                       description="Run every stage in order as one Prefect flow and print the summary table. "
                                   "Finished stages are reused; an interrupted PPO phase resumes from its last "
                                   "checkpoint. Exits 3 when the phase-2 candidate fails the gate.")
    _common(p)

    p = sub.add_parser("curate", help="measure pass rates and pick the phase-1/phase-2 problem sets",
                       description="Sample k responses per candidate problem from the model, estimate pass rates, "
                                   "and write phase1.jsonl and phase2.jsonl under .concise-rl/curation/.")
    _common(p)
    p.add_argument("--model", metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model dir "
                   "(default: the registered base, built and registered first if missing)")

    p = sub.add_parser("train", help="run one PPO phase and register the resulting model",
                       description="PPO (critic, GAE, KL penalty, clipping) for one phase. Phase 1 starts from the "
                                   "base on the curated hard set; phase 2 from the 'phase1' alias on the curated "
                                   "phase-2 set. Resumes from the phase's last checkpoint.")
    _common(p)
    p.add_argument("--phase", type=int, choices=(1, 2), required=True, help="which phase to train")
    p.add_argument("--model", metavar="URI", help="start model (default: alias 'base' for phase 1, 'phase1' for 2)")
    p.add_argument("--problems", metavar="FILE", help="training problems JSONL (default: the latest curation's set)")

    p = sub.add_parser("evaluate", help="evaluate the registered base/phase1/candidate models",
                       description="Accuracy (with 95%% bootstrap CIs) and mean response length on the held-out "
                                   "sets at every configured temperature. Results are cached per model version.")
    _common(p)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=URI",
                   help="a model to evaluate, repeatable (default: base, phase1 and phase2 by alias)")

    p = sub.add_parser("promote", help="gate the phase-2 candidate and move 'champion' if it passes",
                       description="Compare the 'candidate' version with its parent ('phase1') on the evaluation "
                                   "sets; move 'champion' only if every criterion passes. Exits 3 otherwise.")
    _common(p)
    return parser


def _setup_environment() -> None:
    """Keep Prefect's state under our home folder; must run before prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect_home()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server starts in ~10 s on an idle 2-core machine but can take far
    # longer while another job trains; its 20 s default then aborts the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _print_models_table(title: str, summary: dict):
    from rich.console import Console
    from rich.table import Table

    from tasks.publish import SUMMARY_HEADER, summary_rows

    console = Console()
    table = Table(title=title)
    for col in SUMMARY_HEADER:
        table.add_column(col)
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
    return console


def print_summary(summary: dict) -> None:
    console = _print_models_table(f"concise-rl: {summary['registered_model']}", summary)
    verdict = "[green]PASSED[/green]" if summary["gate"]["passed"] else "[red]FAILED[/red]"
    console.print(f"gate {verdict}; champion version: {summary['champion_version']}")
    console.print(f"summary written to {paths.reports() / 'latest' / 'summary.json'}")


def _alias_uri(cfg, alias: str) -> dict[str, str]:
    from tasks import tracking

    client = tracking.setup(cfg)
    version = tracking.version_by_alias(client, cfg.registry.model_name, alias)
    if version is None:
        raise LookupError(
            f"no version of {cfg.registry.model_name} has the alias '{alias}'; run the stage that creates it "
            "first (concise-rl run, or curate/train in order) or pass --model"
        )
    return {"version": str(version.version), "uri": tracking.model_uri(version.name, version.version)}


def _explicit_model(cfg, uri: str) -> dict[str, str]:
    from tasks import tracking

    if uri.startswith("models:/"):
        client = tracking.setup(cfg)
        name, _, ref = uri[len("models:/"):].partition("@" if "@" in uri else "/")
        version = client.get_model_version_by_alias(name, ref) if "@" in uri else client.get_model_version(name, ref)
        return {"version": str(version.version), "uri": tracking.model_uri(name, version.version)}
    if not Path(uri).is_dir():
        raise FileNotFoundError(f"--model {uri}: not a models:/ URI and not a model directory")
    return {"version": "local", "uri": uri}


def _latest_curation() -> Path:
    pointer = paths.curation() / "latest"
    if not pointer.is_file():
        raise LookupError("no curation has run yet; run `concise-rl curate` first or pass --problems")
    return paths.curation() / pointer.read_text().strip()


def _cmd_run(args, cfg) -> int:
    from flows.pipeline import pipeline

    summary = pipeline(config_path=args.config, overrides=args.overrides)
    print_summary(summary)
    return _gate_exit(summary)


def _gate_exit(summary: dict) -> int:
    from tasks.stages import gate_failures

    if summary["promoted"]:
        return 0
    print(f"concise-rl: the phase-2 candidate was not promoted, champion unchanged: {gate_failures(summary)}",
          file=sys.stderr)
    return EXIT_GATE_FAILED


def _cmd_curate(args, cfg) -> int:
    from tasks import stages

    model = _explicit_model(cfg, args.model) if args.model else stages.prepare_base(cfg)
    out = stages.curate(cfg, model["uri"])
    print(f"curated sets in {out}: phase1.jsonl, phase2.jsonl, pass_rates.jsonl")
    return 0


def _cmd_train(args, cfg) -> int:
    from tasks import stages

    phase = f"phase{args.phase}"
    default_alias = "base" if args.phase == 1 else ("phase1" if cfg.phase1.enabled else "base")
    start = _explicit_model(cfg, args.model) if args.model else _alias_uri(cfg, default_alias)
    problems = args.problems or str(_latest_curation() / f"{phase}.jsonl")
    final = stages.train_phase(cfg, phase, start["uri"], problems)
    registered = stages.register(cfg, phase, final, start)
    print(f"{phase} trained: {final}; registered as {registered['uri']}")
    return 0


def _cmd_evaluate(args, cfg) -> int:
    from tasks import stages

    if args.model:
        models = {}
        for item in args.model:
            label, sep, uri = item.partition("=")
            if not sep:
                raise ValueError(f"--model {item!r}: expected LABEL=URI, e.g. phase2=models:/{cfg.registry.model_name}@candidate")
            models[label] = _explicit_model(cfg, uri)
    else:
        models = {"base": _alias_uri(cfg, "base"), "phase1": _alias_uri(cfg, "phase1"),
                  "phase2": _alias_uri(cfg, "candidate")}
    results = stages.evaluate(cfg, models)
    _print_models_table(f"evaluation: {cfg.registry.model_name}",
                        {"models": results, "length_reduction_pct": {}})
    print(f"responses and summaries under {paths.evaluations()}")
    return 0


def _cmd_promote(args, cfg) -> int:
    from tasks import stages

    parent_alias = "phase1" if cfg.phase1.enabled else "base"
    models = {"base": _alias_uri(cfg, "base"), "phase2": _alias_uri(cfg, "candidate")}
    if cfg.phase1.enabled:
        models["phase1"] = _alias_uri(cfg, "phase1")
    summary = stages.promote(cfg, stages.evaluate(cfg, models), parent_label=parent_alias)
    print_summary(summary)
    return _gate_exit(summary)


COMMANDS = {"run": _cmd_run, "curate": _cmd_curate, "train": _cmd_train, "evaluate": _cmd_evaluate,
            "promote": _cmd_promote}


def _exit_on_sigterm(signum, frame) -> None:
    # Unwind normally (closing MLflow runs, stopping Prefect's temporary server)
    # instead of dying with child processes left behind.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _setup_environment()
    from concise_rl.config import load_config
    from concise_rl.errors import ConfigError, CurationError, ModelLoadError, ProblemLoadError

    bad_input = (ConfigError, ProblemLoadError, ModelLoadError, CurationError, LookupError, FileNotFoundError)
    try:
        cfg = load_config(args.config, args.overrides)
        return COMMANDS[args.command](args, cfg)
    except bad_input as exc:
        print(f"concise-rl {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("concise-rl: interrupted; finished stages and the last checkpoint are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
