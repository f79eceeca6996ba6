"""``concise-rl``: the whole pipeline (``run``) or one stage at a time.

Exit codes: 0 success; 2 bad input (config, data, model path) with a message that
says what to change; 3 the phase-2 candidate failed the promotion gate; 4 another
pipeline holds the registry lock of the same model; 5 a training guard stopped a PPO
phase (NaN/inf, runaway length, collapsed rewards); 143 / 130 SIGTERM / SIGINT stopped
a PPO phase after checkpointing its last completed step (the same command resumes);
1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from concise_rl import cli_text, paths
from concise_rl.cli_parser import SuggestingParser

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_BUSY = 4
EXIT_TRAINING_STOPPED = 5


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="pipeline config YAML (default: the built-in defaults, i.e. the paper's PPO "
                   "settings on the embedded model; configs/demo.yaml is the CPU demo, whose time on 2 cores "
                   "is in BENCHMARKS.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config field, repeatable; values are read as YAML "
                        "(e.g. --set ppo.lam=0.95 --set evaluation.temperatures=[0,0.6])")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")


def _evaluation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmarks", metavar="NAME[,NAME...]",
                   help="evaluate on these named benchmarks instead of the config's sets")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with NAME.jsonl for --benchmarks (default: $CONCISE_RL_BENCHMARK_DIR, else the hub)")
    p.add_argument("--few-shot", type=int, default=5, metavar="N",
                   help="solved examples in multiple-choice prompts (mmlu_stem) with --benchmarks (default: 5, "
                        "as the paper ran MMLU-STEM)")
    p.add_argument("--temperatures", metavar="T[,T...]", help="sampling temperatures (default: the config's)")
    p.add_argument("--samples", type=_positive_int, metavar="N",
                   help="responses per problem at temperature > 0 (default: the config's)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N problems of each set")


def _parsed(parse):
    """An argparse type from one of concise_rl.ablation's parsers (ValueError -> a usage error)."""

    def convert(text: str):
        from concise_rl import ablation

        try:
            return getattr(ablation, parse)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse  # argparse names the type in its messages
    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="concise-rl", description=cli_text.DESCRIPTION, epilog=cli_text.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole two-phase pipeline as a Prefect flow",
                       description="Run every stage in order as one Prefect flow and print the summary table. "
                                   "Finished stages are reused; an interrupted PPO phase resumes from its last "
                                   "checkpoint. Exits 3 when the phase-2 candidate fails the gate, 4 when another "
                                   "pipeline is running against the same registered model, 5 when a training guard "
                                   "stops a PPO phase.")
    _common(p)
    p.add_argument("--git-sha", metavar="SHA", help="the commit that triggered this run: recorded as the tag git_sha "
                   "on every MLflow run and registered version of the run, and in the summary")

    p = sub.add_parser("curate", help="measure pass rates and pick the phase-1/phase-2 problem sets",
                       description="Sample k responses per candidate problem from the model, estimate pass rates, "
                                   "and write phase1.jsonl and phase2.jsonl under .concise-rl/curation/.")
    _common(p)
    p.add_argument("--model", metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, a local model dir or a checkpoint folder in the "
                   "artifact store (s3://..., a version's checkpoint_uri) "
                   "(default: the registered base, built and registered first if missing)")

    p = sub.add_parser("train", help="run one PPO phase and register the resulting model",
                       description="PPO (critic, GAE, KL penalty, clipping) for one phase. Phase 1 starts from the "
                                   "base on the curated hard set; phase 2 from the 'phase1' alias on the curated "
                                   "phase-2 set. Resumes from the phase's last checkpoint.")
    _common(p)
    p.add_argument("--phase", type=int, choices=(1, 2), required=True, help="which phase to train")
    p.add_argument("--model", metavar="URI", help="start model: models:/ URI, local dir or s3:// checkpoint folder (default: "
                   "alias 'base' for phase 1, 'phase1' for 2)")
    p.add_argument("--problems", metavar="FILE", help="training problems JSONL (default: the latest curation's set)")

    p = sub.add_parser("evaluate", help="evaluate models on the held-out sets or on named benchmarks",
                       description=cli_text.EVALUATE_DESCRIPTION, epilog=cli_text.EVALUATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]URI",
                   help="a model to evaluate, repeatable: models:/NAME/VERSION, models:/NAME@ALIAS, a local "
                        "model dir or an s3:// checkpoint folder (a version's checkpoint_uri), optionally labelled "
                        "(default: base, phase1 and phase2 by alias)")
    _evaluation_options(p)

    p = sub.add_parser("compare", help="the gate's verdict for a candidate model against a baseline",
                       description=cli_text.COMPARE_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("baseline", metavar="A", help="the model the candidate must not be worse than (URI or dir)")
    p.add_argument("candidate", metavar="B", help="the model under test (URI or dir)")
    _evaluation_options(p)

    p = sub.add_parser("promote", help="gate the phase-2 candidate and move 'champion' if it passes",
                       description="Compare the 'candidate' version with its parent ('phase1') on the evaluation "
                                   "sets; move 'champion' only if every criterion passes. Exits 3 otherwise.")
    _common(p)

    p = sub.add_parser("ablate", help="phase 2 side by side: lambda, loss aggregation, GRPO loss types, pass-rate bands",
                       description=cli_text.ABLATE_DESCRIPTION, epilog=cli_text.ABLATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--variants", type=_parsed("parse_variants"), metavar="NAME[,NAME...]",
                   help="variants to run, in order (default: all 6 PPO, 4 GRPO, logprob-t1.0 and one per --bands band)")
    p.add_argument("--bands", type=_parsed("parse_bands"), metavar="LOW-HIGH[,LOW-HIGH...]",
                   help="pass-rate bands of the band variants when --variants is not given "
                        "(default: 0.125-0.375,0.375-0.625,0.625-0.875)")
    p.add_argument("--start", metavar="URI", help="models:/NAME/VERSION, models:/NAME@ALIAS, a local model dir or an s3:// "
                   "checkpoint folder to start every variant from (default: alias 'phase1', or 'base' when phase1.enabled is false)")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="RL steps of every variant (default: phase 2's ppo.steps)")
    p.add_argument("--eval-problems", type=_positive_int, metavar="N",
                   help="evaluate on the first N held-out problems (default: the whole held-out set)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: "
                   "ablations/MODEL-vVERSION-KEY under the concise-rl home, one per start model and settings)")

    p = sub.add_parser("grade", help="grade a JSONL file of responses (adds correct, extracted, reason)",
                       description=cli_text.GRADE_DESCRIPTION, epilog=cli_text.GRADE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.jsonl", help="one JSON object per line, with a response and a reference answer")
    p.add_argument("-o", "--output", metavar="OUT.jsonl", required=True,
                   help="where the graded rows go (written whole or not at all)")
    p.add_argument("--response-field", default="response", metavar="NAME",
                   help="field with the model's response: a string, or a list of strings (default: response)")
    p.add_argument("--answer-field", default="answer", metavar="NAME",
                   help="field with the reference answer (default: answer)")
    p.add_argument("--label-field", metavar="NAME",
                   help="field with existing correctness labels (bool or list of bools): print the agreement "
                        "and every disagreement")
    p.add_argument("--workers", type=int, metavar="N", help="grading processes (default: the config's grader.workers)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="per-answer time limit (default: the config's grader.timeout_s, 5 s)")
    p.add_argument("--config", metavar="FILE", help="pipeline config YAML, for its grader section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config field, repeatable (e.g. --set grader.timeout_s=10)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")

    p = sub.add_parser("deploy", help="apply the Prefect deployments (retraining, evaluation) and their work pool",
                       description="Create the work pool when it is missing, then apply every deployment of a "
                                   "prefect.yaml project file (default infra/prefect.yaml: 'retrain', the pipeline "
                                   "on a weekly cron schedule, and 'evaluate', evaluation only) to the Prefect "
                                   "server in $PREFECT_API_URL. Workers then run them: "
                                   "`prefect worker start --pool gpu`.")
    p.add_argument("--config-file", metavar="FILE", help="prefect.yaml project file (default: infra/prefect.yaml)")
    p.add_argument("--pool", metavar="NAME", help="work pool of every deployment (default: the file's, 'gpu')")
    p.add_argument("--pool-type", choices=("process", "kubernetes"), default="process",
                   help="type of a work pool that has to be created: process (default; job variables pin "
                        "CUDA_VISIBLE_DEVICES) or kubernetes (base job template infra/k8s-gpu-job-template.json, "
                        "nvidia.com/gpu: 1 per run)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")

    p = sub.add_parser("retrain", help="trigger a run of a deployment, optionally waiting for its final state",
                       description="Start a run of a deployment on the Prefect server in $PREFECT_API_URL with "
                                   "parameters. With --wait, print its states until it is terminal and exit 0 "
                                   "when it completed, 1 when it failed, crashed or was cancelled, or is still "
                                   "running after --timeout. CI runs: concise-rl retrain --deployment retrain "
                                   "--param git_sha=$GITHUB_SHA --wait")
    p.add_argument("--deployment", required=True, metavar="[FLOW/]NAME",
                   help="deployment name; without FLOW/, one of the pipeline flow (concise-rl-pipeline)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="a flow parameter, repeatable; values are YAML except for string-only parameters "
                        "(e.g. --param git_sha=$GITHUB_SHA --param 'overrides=[ppo.steps=10]')")
    p.add_argument("--wait", action="store_true", help="wait until the run is terminal; exit 0 only if Completed")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long (exit 1)")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="with --wait: poll interval (5)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    _add_models_parser(sub)
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


def _alias_uri(cfg, alias: str, hint: str = "run the stage that creates it first (concise-rl run, or "
               "curate/train in order) or pass --model") -> dict[str, str]:
    from concise_rl.tasks import tracking
    from concise_rl.tasks.model_uri import what_exists

    client = tracking.setup(cfg)
    version = tracking.version_by_alias(client, cfg.registry.model_name, alias)
    if version is None:
        raise LookupError(f"{what_exists(client, cfg.registry.model_name, None, alias)}; {hint}")
    return {"version": str(version.version), "uri": tracking.model_uri(version.name, version.version)}


def _resolve(cfg, uri: str, option: str = "--model") -> dict[str, str]:
    from concise_rl.tasks.model_uri import resolve_model

    return resolve_model(cfg, uri, what=f"{option} {uri}")


def _latest_curation(hint: str = "run `concise-rl curate` first or pass --problems") -> Path:
    from concise_rl.files import read_latest

    curation = read_latest(paths.curation())
    if curation is None:
        raise LookupError(f"no curation has run yet; {hint}")
    return curation


def _cmd_run(args, cfg) -> int:
    from concise_rl.local_server import start_temporary_server

    # Taken here too (the flow takes it again, re-entrantly), so a second run stops
    # before it starts Prefect's temporary server (in its own session: local_server.py).
    with _registry_lock(cfg, f"concise-rl run ({args.config or 'built-in defaults'})"):
        server = start_temporary_server()
        # The pipeline's imports (torch, transformers, MLflow, Prefect) take about as long as the server's start.
        from concise_rl import console
        from concise_rl.flows.pipeline import pipeline

        if server:
            server.wait()
        summary = pipeline(config_path=args.config, overrides=args.overrides, git_sha=args.git_sha)
    console.print_summary(summary, cfg.gate)
    return _gate_exit(summary)


def _gate_exit(summary: dict) -> int:
    from concise_rl.tasks.stages import gate_failures

    if summary["promoted"]:
        return 0
    print(f"concise-rl: the phase-2 candidate was not promoted, champion unchanged: {gate_failures(summary)}",
          file=sys.stderr)
    return EXIT_GATE_FAILED


def _registry_lock(cfg, what: str):
    from concise_rl.locking import registry_lock

    return registry_lock(cfg.registry.model_name, what)


def _cmd_curate(args, cfg) -> int:
    with _registry_lock(cfg, "concise-rl curate"):
        return _curate(args, cfg)


def _curate(args, cfg) -> int:
    from concise_rl.tasks import stages

    model = _resolve(cfg, args.model) if args.model else stages.prepare_base(cfg)
    out = stages.curate(cfg, model["uri"])
    print(f"curated sets in {out}: phase1.jsonl, phase2.jsonl, pass_rates.jsonl")
    return 0


def _cmd_train(args, cfg) -> int:
    from concise_rl.tasks import stages

    phase = f"phase{args.phase}"
    default_alias = "base" if args.phase == 1 else ("phase1" if cfg.phase1.enabled else "base")
    acc = stages.accelerator(cfg)
    try:
        with acc.main_process_first():  # under `accelerate launch`, one process at a time reads the registry
            start = _resolve(cfg, args.model) if args.model else _alias_uri(cfg, default_alias)
            problems = args.problems or str(_latest_curation() / f"{phase}.jsonl")
        if not acc.is_main_process:
            stages.train_phase(cfg, phase, start["uri"], problems, acc)
            return 0
        with _registry_lock(cfg, f"concise-rl train --phase {args.phase}"):
            final = stages.train_phase(cfg, phase, start["uri"], problems, acc)
            registered = stages.register(cfg, phase, final, start)
        print(f"{phase} trained: {final}; registered as {registered['uri']}")
        return 0
    finally:
        # Leave the process group before exiting: a process that exits holding it can abort
        # at interpreter shutdown ("terminate called without an active exception").
        acc.end_training()


def _with_evaluation_options(cfg, args):
    """The config with the evaluation overridden by --benchmarks/--temperatures/--samples/--limit."""
    from pydantic import ValidationError

    from concise_rl.benchmarks import BENCHMARKS, parse_benchmarks
    from concise_rl.config import DataSource, PipelineConfig
    from concise_rl.errors import ConfigError

    ev = cfg.evaluation.model_dump()
    if args.benchmarks:
        ev["heldout"] = None
        ev["benchmarks"] = {
            name: DataSource(kind="benchmark", name=name, path=args.data_dir, limit=args.limit,
                             few_shot=args.few_shot if BENCHMARKS[name].kind == "choice" else 0).model_dump()
            for name in parse_benchmarks(args.benchmarks)
        }
    elif args.limit:
        if ev["heldout"] is not None:
            ev["heldout"]["limit" if ev["heldout"]["kind"] != "synthetic" else "num_problems"] = args.limit
        for src in ev["benchmarks"].values():
            src["limit" if src["kind"] != "synthetic" else "num_problems"] = args.limit
    if args.temperatures:
        try:
            ev["temperatures"] = [float(t) for t in args.temperatures.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--temperatures {args.temperatures!r}: expected numbers such as 0,0.6") from None
    if args.samples:
        ev["samples"] = args.samples
    try:
        return PipelineConfig.model_validate({**cfg.model_dump(), "evaluation": ev})
    except ValidationError as exc:
        raise ConfigError(f"evaluation options: {exc.errors()[0]['msg']}") from None


def _labelled_models(cfg, items: list[str]) -> dict[str, dict[str, str]]:
    from concise_rl.errors import ConfigError

    models = {}
    for item in items:
        label, sep, uri = item.partition("=")
        if not sep or label.startswith("models:"):
            label, uri = None, item
        info = _resolve(cfg, uri)
        label = label or (f"v{info['version']}" if info["version"] != "local" else Path(uri).resolve().name)
        if label in (".", "..") or "/" in label or "\\" in label:
            raise ConfigError(f"--model {item!r}: label {label!r} would be a path (labels name MLflow artifact "
                              "folders); write LABEL=URI with a plain name")
        if label in models:
            raise ConfigError(f"--model {item!r}: label {label!r} is used twice; write LABEL=URI to tell them apart")
        models[label] = info
    return models


def _cmd_evaluate(args, cfg) -> int:
    from concise_rl import console
    from concise_rl.tasks import stages

    cfg = _with_evaluation_options(cfg, args)
    if args.model:
        models = _labelled_models(cfg, args.model)
    else:
        models = {"base": _alias_uri(cfg, "base"), "phase1": _alias_uri(cfg, "phase1"),
                  "phase2": _alias_uri(cfg, "candidate")}
    console.print_evaluation(f"evaluation: {cfg.registry.model_name}", stages.evaluate(cfg, models), cfg.gate)
    return 0


def _cmd_compare(args, cfg) -> int:
    from concise_rl import console
    from concise_rl.evaluation.gate import evaluate_gate
    from concise_rl.tasks import stages

    cfg = _with_evaluation_options(cfg, args)
    models = {"A": _resolve(cfg, args.baseline, option="A"), "B": _resolve(cfg, args.candidate, option="B")}
    results = stages.evaluate(cfg, models)
    verdict = evaluate_gate(results["B"]["eval"], results["A"]["eval"], cfg.gate)
    console.print_comparison(results, verdict, baseline=args.baseline, candidate=args.candidate, gate_cfg=cfg.gate)
    return 0 if verdict["passed"] else EXIT_GATE_FAILED


def _cmd_promote(args, cfg) -> int:
    from concise_rl import console
    from concise_rl.tasks import stages

    parent_alias = "phase1" if cfg.phase1.enabled else "base"
    models = {"base": _alias_uri(cfg, "base"), "phase2": _alias_uri(cfg, "candidate")}
    if cfg.phase1.enabled:
        models["phase1"] = _alias_uri(cfg, "phase1")
    with _registry_lock(cfg, "concise-rl promote"):
        summary = stages.promote(cfg, stages.evaluate(cfg, models), parent_label=parent_alias)
    console.print_summary(summary, cfg.gate)
    return _gate_exit(summary)


def _cmd_ablate(args, cfg) -> int:
    from concise_rl import console
    from concise_rl.ablation import DEFAULT_BANDS, default_variants

    first = "run `concise-rl run` first (or `concise-rl curate` and `concise-rl train --phase 1`)"
    curation = _latest_curation(f"the ablation trains on the curated problems; {first}")
    start_alias = "phase1" if cfg.phase1.enabled else "base"
    start = (_resolve(cfg, args.start, option="--start") if args.start
             else _alias_uri(cfg, start_alias, hint=f"the ablation starts from it; {first}, or pass --start"))
    from concise_rl.tasks.ablate import run_ablation

    report = run_ablation(
        cfg, start=start, curation_dir=curation, variants=args.variants or default_variants(args.bands or DEFAULT_BANDS),
        out_dir=args.output, steps=args.steps, eval_problems=args.eval_problems,
    )
    console.print_ablation(report)
    return 0


def _cmd_grade(args, cfg) -> int:
    from concise_rl import console
    from concise_rl.evaluation.grade_file import grade_file
    from concise_rl.grader import Grader

    workers = cfg.grader.workers if args.workers is None else args.workers
    timeout = cfg.grader.timeout_s if args.timeout is None else args.timeout
    with Grader(workers, timeout) as grader:
        report = grade_file(args.input, args.output, response_field=args.response_field,
                            answer_field=args.answer_field, label_field=args.label_field, grader=grader)
    console.print_grading(report, args.output, args.label_field)
    return 0


# --------------------------------------------------------------------------- models
def _add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the registered versions with aliases, lineage, gate verdict and figures",
                       description=cli_text.MODELS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  concise-rl models --config configs/demo.yaml\n"
                              "  concise-rl models --set registry.tracking_uri=http://127.0.0.1:5000 --json")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the versions as a JSON list instead of a table")


def _cmd_models(args, cfg) -> int:
    import json

    from concise_rl.tasks import tracking

    rows = tracking.describe_versions(cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from concise_rl import console
    from concise_rl.config import redact_url

    console.print_versions(f"{cfg.registry.model_name} in {redact_url(tracking.tracking_uri(cfg))}", rows)
    return 0


def _cmd_deploy(args) -> int:
    from concise_rl import console
    from concise_rl.deploy import deploy

    console.print_deployments(deploy(args.config_file and Path(args.config_file), pool=args.pool,
                                     pool_type=args.pool_type))
    return 0


def _cmd_retrain(args) -> int:
    from concise_rl.deploy import trigger

    return trigger(args.deployment, args.params, wait=args.wait, timeout_s=args.timeout, poll_s=args.poll)


PREFECT_COMMANDS = {"deploy": _cmd_deploy, "retrain": _cmd_retrain}

COMMANDS = {"run": _cmd_run, "curate": _cmd_curate, "train": _cmd_train, "evaluate": _cmd_evaluate,
            "compare": _cmd_compare, "promote": _cmd_promote, "ablate": _cmd_ablate, "grade": _cmd_grade}
COMMANDS["models"] = _cmd_models


def _exit_on_sigterm(signum, frame) -> None:
    from concise_rl.training import preempt

    # A PPO phase that is training checkpoints its last completed step first (training/preempt.py;
    # reached here when the phase runs outside the main thread). Otherwise unwind normally (closing
    # MLflow runs, stopping Prefect's temporary server) instead of dying with child processes left behind.
    if not preempt.request(signum):
        raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and args.command != "train":
        print(f"concise-rl {args.command}: started as {processes} processes (accelerate launch or torchrun); only "
              "`concise-rl train` runs data-parallel. Run the other commands as one process.", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _setup_environment()
    from concise_rl.config import load_config
    from concise_rl.errors import (
        ConfigError,
        CurationError,
        DiskFullError,
        ModelLoadError,
        PreemptedError,
        ProblemLoadError,
        TrackingServerError,
        TrainingGuardError,
    )
    from concise_rl.locking import RegistryBusyError
    from concise_rl.store import StoreError

    if args.command in PREFECT_COMMANDS:
        from concise_rl.deploy import DeployError

        failures = [((ConfigError, LookupError), EXIT_BAD_INPUT, "", ""), (DeployError, 1, "", "")]
        return _run_reporting(args.command, failures, lambda: PREFECT_COMMANDS[args.command](args))

    # What each failure prints and exits with, in order (the first type that matches wins). Each
    # message already names what went wrong and what to do; this adds the command and a context.
    failures = [
        ((ConfigError, ProblemLoadError, ModelLoadError, CurationError, LookupError, FileNotFoundError),
         EXIT_BAD_INPUT, "", ""),
        (RegistryBusyError, EXIT_BUSY, "", ""),
        (StoreError, 1, "artifact store: ", ""),  # unreachable, or holds a bad copy
        (TrackingServerError, 1, "tracking server: ", ""),  # registry.tracking_uri does not answer
        (DiskFullError, 1, "", ""),  # names the folder and what to free
        # names the guard, step, value, threshold and kept checkpoint
        (TrainingGuardError, EXIT_TRAINING_STOPPED, "", " Nothing was promoted; 'champion' is unchanged."),
        # 128 + the signal (143 SIGTERM, 130 SIGINT), as a shell reports a process the signal stopped
        (PreemptedError, lambda exc: 128 + exc.signum, "", ""),
        (KeyboardInterrupt, 130, "interrupted; finished stages and the last checkpoint are kept, run again to resume",
         ""),
    ]

    def command() -> int:
        cfg = load_config(args.config, args.overrides)
        return COMMANDS[args.command](args, cfg)

    code = _run_reporting(args.command, failures, command)
    if processes > 1:  # a data-parallel `train`: its files are closed, its runs ended
        from concise_rl.training.distributed import exit_skipping_finalization

        exit_skipping_finalization(code)
    return code


def _run_reporting(name: str, failures: list[tuple[type | tuple[type, ...], object, str, str]], command) -> int:
    """Run ``command``; a failure listed in ``failures`` prints one line to stderr and returns its exit code
    (a number, or a function of the exception).

    Anything else (SystemExit from SIGTERM included) propagates.
    """
    try:
        return command()
    except BaseException as exc:
        for types, code, prefix, suffix in failures:
            if isinstance(exc, types):
                print(f"concise-rl {name}: {prefix}{exc}{suffix}", file=sys.stderr)
                return code(exc) if callable(code) else code
        raise


if __name__ == "__main__":
    sys.exit(main())
