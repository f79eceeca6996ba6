"""Kill soak: kill the pipeline in every stage, re-run after each kill, and check the registry converges.

Runs ``concise-rl run`` on the demo config shrunk to a tiny model (as tests/test_pipeline_e2e.py
runs it) once uninterrupted. Then, in fresh homes with the same base, it kills runs of the same
command (SIGKILL to the whole process group, as a lost node, or for a ``--sigterm`` share of them
SIGTERM, as a preemption or a cancelled Prefect run, then SIGKILL if the run is still there
30 s later): each kill waits until the run has
just finished a stage it had not finished before (curation, a phase-1 step, phase 1's final
policy, a phase-2 step, phase 2's final policy, one model's evaluation, the report) and kills a
random moment later, so it lands in the next stage's work: PPO between or in checkpoints,
registration between the upload and the registry write, the evaluation, the alias moves. A
kill at a random moment of the start (Prefect, the base) is among them. A home whose run gets
to the end is compared with the uninterrupted one, and the next kills go to a new home:

- one version per phase, with the same lineage tags (phase, parent, run key, problems hash,
  PPO steps, config hash) and the same recorded figures (``eval.*`` tags), the same aliases;
- no MLflow run left RUNNING, no half-written folder (``*.tmp``) in the home (checkpoints, store).

Before the random kills, the crash points of concise_rl/faults.py kill one home at exact
instants, one run each, in pipeline order: a checkpoint written but not renamed into place, a
checkpoint renamed but its ``latest`` pointer not moved, a policy uploaded to the artifact store
but not registered, a version registered but its alias not moved, the gate passed but
``champion`` not moved (``--points``; each run must die there, else the point was never
reached). Then the same command runs to the end and that home is compared as above.

The seed of the kill schedule is printed first, so a failure can be replayed with ``--seed``.

    python -m bench.killsoak [--kills 10] [--points all] [--seed N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from concise_rl import faults

ROOT = Path(__file__).resolve().parents[1]
MODEL = "concise-rl-demo"
# The demo config on a tiny model: a whole run takes about half a minute on 2 cores.
SHRUNK = [
    "model.embedded.hidden_size=32", "model.embedded.num_layers=1", "model.embedded.num_heads=2",
    "model.embedded.num_kv_heads=1", "model.embedded.intermediate_size=64", "model.embedded.sft_examples=64",
    "model.embedded.sft_epochs=1", "model.embedded.sft_batch_size=16",
    "curation.candidates.num_problems=12", "curation.samples_per_problem=4", "curation.max_new_tokens=32",
    "curation.phase1_band.high=1.0", "curation.phase2_band.low=0.0", "curation.phase2_band.high=1.0",
    "curation.phase2_num_problems=2",
    "ppo.steps=2", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4",
    "ppo.micro_batch_size=2", "ppo.max_new_tokens=32", "ppo.checkpoint_every=1", "phase2.ppo.steps=2",
    "evaluation.heldout.num_problems=8", "evaluation.max_new_tokens=32", "evaluation.bootstrap_samples=100",
]
# A gate every candidate passes, so each run ends with a champion to compare.
SOAK = [*SHRUNK, "ppo.steps=4", "gate.min_length_reduction_pct=-100", "gate.max_accuracy_drop=1.0"]
LINEAGE = ("phase", "parent_version", "run_key", "problems_hash", "ppo_steps", "config_hash")


def command(home: Path, overrides: list[str], crash_at: str | None = None) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "-m", "concise_rl.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml")]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "CONCISE_RL_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "2"}
    env.pop(faults.ENV, None)
    if crash_at:
        env[faults.ENV] = crash_at
    return args, env


def _rows(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


# What a run has finished, in pipeline order: each is true once that piece of work is on disk.
MILESTONES = {
    "curation": lambda h: (h / "curation" / "latest").is_file(),
    "a phase-1 step": lambda h: _rows(h / "checkpoints" / "phase1" / "metrics.jsonl") >= 1,
    "phase 1's final policy": lambda h: (h / "checkpoints" / "phase1" / "final").is_dir(),
    "a phase-2 step": lambda h: _rows(h / "checkpoints" / "phase2" / "metrics.jsonl") >= 1,
    "phase 2's final policy": lambda h: (h / "checkpoints" / "phase2" / "final").is_dir(),
    "one model's evaluation": lambda h: any((h / "evaluations").glob("*/summary.json")),
    "the evaluation report": lambda h: any((h / "evaluations" / "reports").glob("*/report.md")),
}


GRACE_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds, and a Prefect process worker's wait


def run(home: Path, overrides: list[str], kill: tuple[str | None, float, int] | None = None,
        crash_at: str | None = None) -> tuple[int, float, str, str | None]:
    """One pipeline run. ``kill``: (milestone, delay, signal): send the signal to its process group ``delay``
    seconds after the milestone is reached (after the start when it is None); a SIGTERM is followed by a
    SIGKILL after GRACE_S, as a cluster does. ``crash_at``: the crash point where it kills itself. Returns
    the exit code (-9 when killed), the duration, the last stderr line and what was sent (None: nothing)."""
    args, env = command(home, overrides, crash_at)
    log = home.parent / "last.log"
    home.mkdir(parents=True, exist_ok=True)
    t0, sent = time.monotonic(), None
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True)
        if kill is not None:
            milestone, delay, sig = kill
            reached = MILESTONES[milestone] if milestone else (lambda h: True)
            while proc.poll() is None and not reached(home):
                time.sleep(0.02)
            deadline = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                sent = signal.Signals(sig).name
                if sig != signal.SIGKILL:
                    try:
                        proc.wait(timeout=GRACE_S)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        sent += f", then SIGKILL after {GRACE_S:g} s"
        proc.wait(timeout=900)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return proc.returncode, time.monotonic() - t0, lines[-1][-160:] if lines else "", sent


def registry(home: Path) -> dict:
    """What must converge: every version's lineage and figures, the aliases, and the runs left open."""
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    versions = {}
    for v in client.search_model_versions(f"name = '{MODEL}'"):
        versions[v.version] = {"lineage": {k: v.tags.get(k) for k in LINEAGE},
                               "eval": {k: v.tags[k] for k in sorted(v.tags) if k.startswith("eval.")}}
    aliases = dict(client.get_registered_model(MODEL).aliases)
    experiment = client.get_experiment_by_name(MODEL)
    running = [r.info.run_id for r in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")]
    half_written = sorted(str(p.relative_to(home)) for p in home.rglob("*.tmp"))
    return {"versions": versions, "aliases": aliases, "running": running, "half_written": half_written}


def compare(home: Path, reference: dict, label: str) -> list[str]:
    """What differs between a home whose run got to the end and the uninterrupted run."""
    problems, got = [], registry(home)
    for what in ("versions", "aliases"):
        if got[what] != reference[what]:
            problems.append(f"{label}: {what} differ:\n  uninterrupted {json.dumps(reference[what], sort_keys=True)}"
                            f"\n  killed        {json.dumps(got[what], sort_keys=True)}")
    if got["running"]:
        problems.append(f"{label}: MLflow runs left RUNNING: {got['running']}")
    if got["half_written"]:
        problems.append(f"{label}: half-written folders: {got['half_written']}")
    return problems


def crash_points(home: Path, points: list[str]) -> list[str]:
    """One run per crash point in ``home``, each of which must die there, then a run to the end."""
    problems = []
    for name in points:
        code, took, last, _ = run(home, SOAK, crash_at=name)
        if code != -signal.SIGKILL:
            problems.append(f"crash point {name}: the run was not killed there (exit {code}): {last}")
        print(f"crash point {name} ({faults.POINTS[name]}): exit {code} after {took:.0f} s", flush=True)
    code, took, last, _ = run(home, SOAK)
    print(f"crash points: the run after them got to the end (exit {code}, {took:.0f} s)", flush=True)
    if code != 0:
        problems.append(f"crash points: the run after them failed ({code}): {last}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.killsoak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="random kills in all, SIGKILL or SIGTERM (default 10)")
    parser.add_argument("--points", default="all",
                        help=f"crash points to kill at first, comma-separated, 'all' or 'none' (default all: "
                             f"{', '.join(faults.POINTS)})")
    parser.add_argument("--sigterm", type=float, default=0.5, metavar="SHARE",
                        help=f"share of the random kills sent as SIGTERM (then SIGKILL after {GRACE_S:g} s, as a "
                             "cluster or a Prefect worker does) instead of SIGKILL (default 0.5; seeds from before "
                             "this option replay with 0)")
    parser.add_argument("--seed", type=int, help="seed of the kill schedule (default: drawn, and printed)")
    parser.add_argument("--out", type=Path, help="folder for the homes (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    points = {"all": list(faults.POINTS), "none": []}.get(args.points, [p for p in args.points.split(",") if p])
    unknown = [p for p in points if p not in faults.POINTS]
    if unknown:
        parser.error(f"--points: no crash point {', '.join(unknown)}; there are {', '.join(faults.POINTS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"kill schedule seed: {seed} (replay: python -m bench.killsoak --kills {args.kills} --points {args.points} "
          f"--sigterm {args.sigterm:g} --seed {seed})", flush=True)
    rng = random.Random(seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="killsoak-"))
    straight = out / "straight" / "home"

    code, duration, last, _ = run(straight, SOAK)
    if code != 0:
        print(f"the uninterrupted run failed ({code}): {last}", file=sys.stderr)
        return 1
    print(f"uninterrupted run: {duration:.0f} s", flush=True)
    (base,) = (straight / "models").glob("embedded-*")  # the same base, so the comparison is about the rest
    reference = registry(straight)

    problems, homes, kills, episode = [], [], 0, 0
    if points:
        home = out / "crash-points" / "home"
        shutil.copytree(base, home / "models" / base.name)
        failed = crash_points(home, points)
        problems += failed or compare(home, reference, "crash points")
    while kills < args.kills or homes[-1:] and not homes[-1][1]:
        if not homes or homes[-1][1]:  # a new home once the last one's run got to the end
            episode += 1
            home = out / f"killed-{episode}" / "home"
            shutil.copytree(base, home / "models" / base.name)
            homes.append([home, False])
        home = homes[-1][0]
        todo = [m for m, reached in MILESTONES.items() if not reached(home)]
        if kills < args.kills:
            # Just after the next milestone this home has not reached (now and then the one after), so the
            # kills walk through the stages; once all are reached, a random moment of the run (the start,
            # the reused stages, the gate and the alias moves).
            milestone = (todo[0] if rng.random() < 0.7 else rng.choice(todo[:2])) if todo else None
            delay = rng.uniform(1.0, 15.0) if milestone is None else rng.uniform(0.0, 1.0)
            # Drawn only when asked for, so a seed run without SIGTERMs replays as before.
            sig = signal.SIGTERM if args.sigterm and rng.random() < args.sigterm else signal.SIGKILL
            code, took, last, sent = run(home, SOAK, kill=(milestone, delay, sig))
        else:
            milestone, sent, (code, took, last, _) = None, None, run(home, SOAK)
        if sent is not None and code != 0:
            kills += 1
            print(f"kill {kills}/{args.kills} in home {episode}: {sent} {delay:.2f} s after "
                  f"{milestone or 'the start'}, exit {code}; last line: {last}", flush=True)
            if "then SIGKILL" in sent:
                problems.append(f"home {episode}: a SIGTERM {delay:.2f} s after {milestone or 'the start'} did not "
                                f"stop the run within {GRACE_S:g} s")
            continue
        print(f"home {episode}: the run got to the end (exit {code}, {took:.0f} s)", flush=True)
        homes[-1][1] = True
        if code != 0:
            problems.append(f"home {episode}: the run failed ({code}): {last}")
            continue
        problems += compare(home, reference, f"home {episode}")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    if problems:
        print(f"seed {seed}: a killed home does not match the uninterrupted one:\n" + "\n".join(problems))
        return 1
    print(f"seed {seed}: {len(points)} crash points and {kills} kills over {episode + bool(points)} homes; each "
          f"ends with the uninterrupted run's registry "
          f"({len(reference['versions'])} versions, champion v{reference['aliases'].get('champion')}), no run left "
          "RUNNING, nothing half-written")
    return 0

if __name__ == "__main__":
    sys.exit(main())
