"""The whole recipe over seeds: is the demo's effect a property of the recipe or of one draw?

Runs ``concise-rl run`` once per seed, each in its own home (own registry, own checkpoints):

- one run per SFT seed (``model.embedded.sft_seed``): a new base each, then curation, both
  PPO phases, evaluation and the gate, all at RL seed ``--rl-seeds[0]``;
- one run per further RL seed (``ppo.seed``) from the base of the first SFT seed, whose
  built model folder is copied into the new home, so only RL differs.

Every base is built, never copied from training/prebuilt/ (``model.embedded.use_prebuilt=false``),
and seeds.md says whether the first SFT seed's base is the shipped one to the bit.

Writes ``seeds.json``, ``seeds.md`` and ``seeds.png`` to ``--out``: per run, the held-out accuracy and mean
length of the base, phase 1 and phase 2 at each temperature, phase 2's length cut against
phase 1 and the paired accuracy change with its 95% CI (the gate's own comparison), and
whether the run meets the targets; then mean, min and max over runs; then the first run's
every set and temperature, as one reference run's full table. Each run's log is kept
in its home, and the tables are rewritten after every run; run the same command again after
an interruption and the finished runs are not repeated. A run takes as long as `make demo`.
seeds.png plots each run's cut and accuracy change (with its CI) against the target lines.

On 2 cores, two benches at a time with one thread each (``OMP_NUM_THREADS=1``) get through
more runs per hour than one with two threads; ``--combine`` then makes one table of them
(the first folder's first run gives the full table) without running anything.

    python -m bench.seeds [--config configs/demo.yaml] [--sft-seeds 0 1 2] [--rl-seeds 0 1 2]
                          [--out bench/results/seeds] [--set KEY=VALUE ...]
    python -m bench.seeds --combine DIR [DIR ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from concise_rl.config import GateConfig, load_config
from concise_rl.evaluation.gate import accuracy_comparison, length_reduction_pct

ROOT = Path(__file__).resolve().parents[1]
# The targets every seed must meet (issue 19): held-out length cut at both temperatures, mean
# accuracy change and the lower bound of its paired 95% CI, in points.
MIN_CUT_PCT, MIN_CHANGE_PTS, MIN_CI_LOW_PTS = 40.0, -1.0, -3.0
TARGET_LINES = {"min_cut_pct": MIN_CUT_PCT, "min_change_pts": MIN_CHANGE_PTS, "min_ci_low_pts": MIN_CI_LOW_PTS}
TARGETS = (f"length cut >= {MIN_CUT_PCT:.0f}% at every temperature, accuracy change >= {MIN_CHANGE_PTS:+.0f} point, "
           f"CI lower bound >= {MIN_CI_LOW_PTS:+.0f} points")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kernels() -> str:
    """The instruction set of ATen's own CPU kernels in this process (``AVX512``, ``AVX2``...).

    It decides the float32 SFT's bits: softmax and attention round differently under AVX2 and
    AVX-512 kernels, so the same base built on two CPUs differs unless ``ATEN_CPU_CAPABILITY``
    (read when torch starts) names the same set on both (docs/embedded-default.md)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run_pipeline(config: Path, home: Path, changes: list[str]) -> tuple[int, float]:
    """One ``concise-rl run`` in ``home``; its exit code (0 promoted, 3 refused by the gate) and wall time.

    A run that finished before (``run.json`` in its home, same changes) is not run again, so an
    interrupted bench picks up where it stopped.
    """
    record = home / "run.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["changes"] == changes:
            return done["exit"], done["seconds"]
    home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(config)]
    for change in changes:
        args += ["--set", change]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    start = time.monotonic()
    with open(home / "run.log", "w") as log:
        code = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if code in (0, 3):
        record.write_text(json.dumps({"changes": changes, "exit": code, "seconds": seconds}))
    return code, seconds


def row_of(label: str, summary: dict, set_name: str, code: int, seconds: float) -> dict:
    """The figures of one run on ``set_name``, from its summary.json."""
    row: dict = {"run": label, "exit": code, "minutes": round(seconds / 60, 1), "promoted": summary["promoted"]}
    temps = sorted(summary["models"]["phase2"]["eval"][set_name], key=float)
    for model in ("base", "phase1", "phase2"):
        for t in temps:
            m = summary["models"][model]["eval"][set_name][t]
            row[f"{model}_acc@{t}"] = 100 * m["accuracy"]
            row[f"{model}_len@{t}"] = m["mean_length"]
    gate = {c["name"]: c for c in summary["gate"]["criteria"]}
    meets = True
    for t in temps:
        row[f"cut@{t}"] = summary["length_reduction_pct"][set_name][t]
        change = gate.get(f"{set_name}@T={t} accuracy change, 95% CI lower bound")
        if change is None:
            raise SystemExit(f"bench.seeds: the gate of run {label} has no accuracy criterion for {set_name}@T={t}; "
                             f"add {set_name!r} to gate.sets")
        row[f"change@{t}"] = 100 * change["difference"]
        row[f"ci_low@{t}"], row[f"ci_high@{t}"] = (100 * x for x in change["ci"])
        meets &= (row[f"cut@{t}"] >= MIN_CUT_PCT and row[f"change@{t}"] >= MIN_CHANGE_PTS
                  and row[f"ci_low@{t}"] >= MIN_CI_LOW_PTS)
    row["meets_targets"] = meets
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    temps = sorted({k.split("@")[1] for k in rows[0] if k.startswith("cut@")}, key=float)
    head = ["run", "exit", "min"]
    for model in ("base", "phase1", "phase2"):
        head += [f"{model} acc / len T={t}" for t in temps]
    head += [f"cut T={t}" for t in temps] + [f"acc change [95% CI] T={t}" for t in temps] + ["targets"]

    def cells(r: dict, targets: str) -> list[str]:
        out = [r["run"], str(r["exit"]), f"{r['minutes']:.1f}"]
        for model in ("base", "phase1", "phase2"):
            out += [f"{r[f'{model}_acc@{t}']:.1f}% / {r[f'{model}_len@{t}']:.0f}" for t in temps]
        out += [f"{r[f'cut@{t}']:.1f}%" for t in temps]
        out += [f"{r[f'change@{t}']:+.1f} [{r[f'ci_low@{t}']:+.1f}, {r[f'ci_high@{t}']:+.1f}]" for t in temps]
        return [*out, targets]

    # mean, min and max of every figure, formatted as a run's row is
    figures = [k for k in rows[0] if "@" in k] + ["minutes"]
    stats = [{"run": name, "exit": "", **{k: fn([r[k] for r in rows]) for k in figures}}
             for name, fn in (("mean", statistics.fmean), ("min", min), ("max", max))]
    met = f"{sum(r['meets_targets'] for r in rows)}/{len(rows)} met"

    lines = [f"# Seeds: {meta['config']} on the {meta['set']} set", "",
             f"{meta['date']}, {meta['cpu']} ({meta['cores']} cores, {meta.get('kernels', '?')} kernels), "
             f"Python {meta['python']}, "
             f"torch {meta['torch']}, transformers {meta['transformers']}; `{meta['command']}`.", "",
             *(["Runs combined from " + "; ".join(meta["sources"]) + ".", ""] if meta.get("sources") else []),
             *([meta["shipped_base"], ""] if meta.get("shipped_base") else []),
             "Accuracy and mean length (tokens) of each model; the cut and the paired accuracy change are "
             f"phase 2 against phase 1, as the gate compares them. Targets: {TARGETS}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r, "met" if r["meets_targets"] else "**missed**")) + " |" for r in rows]
    lines += ["| " + " | ".join(cells(r, met if r["run"] == "mean" else "")) + " |" for r in stats]
    return "\n".join(lines) + "\n"


PARENT = {"phase1": "base", "phase2": "phase1"}


def full_table(label: str, summary: dict, gate: GateConfig) -> str:
    """One run's every evaluation: per set, temperature and model, the accuracy with its 95% CI,
    mean length and truncation rate, and against the model it started from the length cut and
    the paired accuracy change with its CI (the gate's own ``accuracy_comparison``, so the gate's
    sets show the gate's own figures)."""
    lines = [f"## Every evaluation of run {label}", "",
             "Accuracy with its 95% bootstrap CI; cut and paired change are against the model each "
             "started from (phase 1 against the base, phase 2 against phase 1).", "",
             "| set | T | model | accuracy [95% CI] | mean length | truncated | cut | accuracy change [95% CI] | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    models = summary["models"]
    for set_name in models["phase2"]["eval"]:
        for t in sorted(models["phase2"]["eval"][set_name], key=float):
            for model in ("base", "phase1", "phase2"):
                m = models[model]["eval"][set_name][t]
                low, high = (100 * x for x in m["accuracy_ci"])
                cut = change = ""
                if model in PARENT:
                    parent = models[PARENT[model]]["eval"][set_name][t]
                    cut = f"{length_reduction_pct(m['mean_length'], parent['mean_length']):.1f}%"
                    diff = accuracy_comparison(m, parent, gate, f"run {label}, {set_name}@T={t}, {model}")
                    d_low, d_high = (100 * x for x in diff["ci"])
                    change = f"{100 * diff['difference']:+.1f} [{d_low:+.1f}, {d_high:+.1f}]"
                accuracy = f"{100 * m['accuracy']:.1f}% [{low:.1f}, {high:.1f}]"
                lines.append(f"| {set_name} | {t} | {model} | {accuracy} | {m['mean_length']:.0f} | "
                             f"{100 * m['truncation_rate']:.1f}% | {cut} | {change} | {m['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="the pipeline config every run starts from (configs/demo.yaml)")
    parser.add_argument("--sft-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="model.embedded.sft_seed of each base (default 0 1 2)")
    parser.add_argument("--rl-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="ppo.seed: the first goes with every base, the others run on the first base (0 1 2)")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="a config change applied to every run, as for concise-rl run")
    parser.add_argument("--eval-set", default="heldout", help="the evaluation set the table reports (heldout)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "seeds",
                        help="folder for the runs' homes, seeds.json, seeds.md and seeds.png (bench/results/seeds)")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                        help="run nothing: one table of the runs in these earlier --out folders, written to --out")
    args = parser.parse_args(argv)
    if args.combine:
        print(combine(args, argv))
        return
    if not args.config.is_file():
        parser.error(f"--config {args.config} does not exist")

    runs = [(f"sft {s}, rl {args.rl_seeds[0]}", s, args.rl_seeds[0]) for s in args.sft_seeds]
    runs += [(f"sft {args.sft_seeds[0]}, rl {r}", args.sft_seeds[0], r) for r in args.rl_seeds[1:]]
    rows, full = [], ""
    first_home = args.out / f"sft{args.sft_seeds[0]}-rl{args.rl_seeds[0]}"
    for label, sft, rl in runs:
        home = args.out / f"sft{sft}-rl{rl}"
        if home != first_home and sft == args.sft_seeds[0]:  # the first base, built once
            built = sorted((first_home / "models").glob("embedded-*"))
            for folder in built:
                if not (home / "models" / folder.name).exists():
                    shutil.copytree(folder, home / "models" / folder.name)
        print(f"[{datetime.now(UTC):%H:%M:%S}] {label}: running in {home}", flush=True)
        # Every base is built here, never copied from training/prebuilt/: the table is about the SFT recipe.
        code, seconds = run_pipeline(args.config, home, [*args.changes, "model.embedded.use_prebuilt=false",
                                                          f"model.embedded.sft_seed={sft}", f"ppo.seed={rl}"])
        if code not in (0, 3):
            raise SystemExit(f"bench.seeds: run {label} failed with exit code {code}; see {home / 'run.log'}")
        summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
        rows.append({**row_of(label, summary, args.eval_set, code, seconds), "home": home.name})
        if not full:  # the first run's every set and temperature, as one reference
            full = full_table(label, summary, load_config(args.config, args.changes).gate)
        print(f"[{datetime.now(UTC):%H:%M:%S}] {label}: done in {seconds / 60:.1f} min, "
              f"targets {'met' if rows[-1]['meets_targets'] else 'missed'}", flush=True)
        # after every run: a stopped bench keeps what it measured
        table = write_tables(args, rows, argv, full, shipped_check(first_home))
    print(table)


def combine(args: argparse.Namespace, argv: list[str] | None) -> str:
    """One table of the runs of earlier benches (``--combine``), as if one bench had run them all."""
    rows, sources, full, shipped, kernels = [], [], "", "", set()
    for folder in args.combine:
        record = folder / "seeds.json"
        if not record.is_file():
            raise SystemExit(f"bench.seeds: --combine {folder} has no seeds.json; give the --out folder of a bench "
                             "that finished at least one run")
        data = json.loads(record.read_text())
        if data["meta"]["set"] != args.eval_set:
            raise SystemExit(f"bench.seeds: {record} reports the {data['meta']['set']} set, not {args.eval_set}; "
                             f"pass --eval-set {data['meta']['set']}")
        if rows and ROOT / data["meta"]["config"] != args.config:
            raise SystemExit(f"bench.seeds: {record} ran {data['meta']['config']}, the folders before it "
                             f"{args.config}; combine only benches of one config")
        kernels.add(data["meta"].get("kernels", "?"))
        sources.append(f"`{data['meta']['command']}` ({data['meta']['date']}, {data['meta']['cpu']}, "
                       f"{data['meta'].get('kernels', '?')} kernels)")
        args.config = ROOT / data["meta"]["config"]
        for row in data["runs"]:
            # Rows written before the bench recorded each run's home: the home is named after the seeds.
            home = folder / row.get("home", row["run"].replace("sft ", "sft").replace(", rl ", "-rl"))
            rows.append({**row, "home": home.name})
            if not full:
                summary = json.loads((home / "reports" / "latest" / "summary.json").read_text())
                full = full_table(row["run"], summary, load_config(args.config).gate)
                shipped = shipped_check(home)
    if not rows:
        raise SystemExit("bench.seeds: the --combine folders hold no finished run")
    # The table's kernels are its benches' (one ATEN_CPU_CAPABILITY=avx2 bench beside a default one: both).
    return write_tables(args, rows, argv, full, shipped, sources=sources, kernels=" and ".join(sorted(kernels)))


def shipped_check(home: Path) -> str:
    """Whether the base built in ``home`` is, file for file, the one shipped in training/prebuilt/."""
    from concise_rl.training import prebuilt

    shipped = prebuilt.manifest()
    for folder in sorted((home / "models").glob("embedded-*")):
        if folder.name in shipped:
            same = prebuilt.file_hashes(folder) == shipped[folder.name]["files"]
            theirs = shipped[folder.name]["built"].get("aten_cpu_capability")
            why = (f"; it was built with {theirs} kernels, this bench's ran {cpu_kernels()} "
                   f"(ATEN_CPU_CAPABILITY={theirs.lower()} rebuilds it to the bit)"
                   if not same and theirs and theirs != cpu_kernels() else "")
            return (f"The base built in {home.name} {'is' if same else 'is NOT'} the base shipped in "
                    f"training/prebuilt/{folder.name} (sha256 of every file){why}.")
    return "No base built here has a shipped counterpart in training/prebuilt/ (another config or build code)."


def write_tables(args: argparse.Namespace, rows: list[dict], argv: list[str] | None, full: str = "",
                 shipped: str = "", sources: list[str] | None = None, kernels: str | None = None) -> str:
    import torch
    import transformers

    from concise_rl.evaluation.plots import plot_seeds

    meta = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
            "set": args.eval_set, "date": f"{datetime.now(UTC):%Y-%m-%d}", "cpu": cpu_model(),
            "cores": os.cpu_count(), "kernels": kernels or cpu_kernels(), "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": "python -m bench.seeds " + " ".join(argv or sys.argv[1:]),
            "shipped_base": shipped, "sources": sources or []}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps({"meta": meta, "targets": TARGETS, "runs": rows}, indent=2))
    table = markdown(rows, meta) + ("\n" + full if full else "")
    (args.out / "seeds.md").write_text(table)
    plot_seeds(rows, TARGET_LINES, args.out / "seeds.png", args.eval_set)
    return table


if __name__ == "__main__":
    main()
