"""The base alone: build the embedded base under a config (and ``--set`` changes) and evaluate it.

The base's SFT recipe decides everything after it, and a whole seed run (``bench.seeds``)
takes as long as ``make demo``. This builds only the base (``model.embedded``: its traces,
seed, precision, optimiser) into ``--out`` and evaluates it on the config's evaluation sets
at every evaluation temperature, as the pipeline's evaluation stage does, then prints one
JSON line: the settings, the SFT's wall time, and accuracy and mean length per set and
temperature. A base already built in ``--out`` under the same settings is evaluated again,
not rebuilt.

    python -m bench.base [--config configs/demo.yaml] [--out DIR] [--set KEY=VALUE ...] [--ship]

It always builds (never copies the shipped base), and says whether the weights it built equal
the base shipped under the same name in training/prebuilt/ (``matches_shipped``: true, false,
or null where none of that name is shipped). ``--ship`` then makes the built base the shipped
one, with the command, commit, CPU and versions in training/prebuilt/manifest.json: the
command to run after any change to the base's config or build code.

e.g. ``python -m bench.base --set model.embedded.sft_dtype=bfloat16`` (the float32 / bf16
comparison of the base; about 10x slower on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from bench.phase2 import figures
from bench.seeds import cpu_kernels, cpu_model
from concise_rl.config import load_config, stable_hash
from concise_rl.evaluation.evaluate import evaluate_model
from concise_rl.grader import Grader
from concise_rl.tasks.stages import device, evaluation_sets
from concise_rl.training import prebuilt
from concise_rl.training.embedded import build_embedded_model
from concise_rl.training.models import embedded_dir, is_embedded, load_policy, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="a config whose model is embedded (configs/demo.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "base",
                        help="folder for the built bases (bench/results/base)")
    parser.add_argument("--set", dest="changes", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config changes, as the pipeline's --set: e.g. model.embedded.sft_seed=1")
    parser.add_argument("--ship", action="store_true",
                        help="make the built base the one shipped in --prebuilt (which make demo copies)")
    parser.add_argument("--prebuilt", type=Path, default=prebuilt.PREBUILT,
                        help="the shipped bases' folder to compare with and ship to (training/prebuilt)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.changes)
    if not is_embedded(cfg.model):
        raise SystemExit(f"bench.base: {args.config} trains no embedded base (model.name_or_path is "
                         f"{cfg.model.name_or_path!r}); give a config whose model is 'embedded:NAME'")
    settings = cfg.model.embedded.model_dump(exclude={"use_prebuilt"})
    model_dir = args.out / f"base-{stable_hash([settings, cfg.prompt.model_dump()])[:12]}"
    start = time.monotonic()
    build_embedded_model(model_dir, cfg.model.embedded, cfg.prompt)
    sft_min = round((time.monotonic() - start) / 60, 1)
    name = embedded_dir(cfg.model).name  # the name the pipeline gives this base
    shipped = prebuilt.manifest(args.prebuilt).get(name)
    matches = None if shipped is None else prebuilt.file_hashes(model_dir) == shipped["files"]
    if args.ship:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        command = " ".join(["python -m bench.base --ship", *(["--set", *args.changes] if args.changes else [])])
        prebuilt.ship(model_dir, name, {
            "command": command, "commit": commit, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "cpu": cpu_model(), "aten_cpu_capability": cpu_kernels(), "torch": torch.__version__,
            "transformers": transformers.__version__, "sft_minutes": sft_min,
        }, args.prebuilt)
        matches = True
    tokenizer = load_tokenizer(str(model_dir), prompt=cfg.prompt)
    model = load_policy(str(model_dir), cfg.model, device(cfg)).eval()
    grader = Grader.from_config(cfg.grader)
    try:
        summary, _ = evaluate_model(model, tokenizer, evaluation_sets(cfg), cfg.evaluation, cfg.prompt, grader,
                                    seed=cfg.seed)
    finally:
        grader.close()
    by_set = {name: figures(temps) for name, temps in summary.items()}
    print(json.dumps({"set": args.changes, "model": str(model_dir), "build_min": sft_min, "kernels": cpu_kernels(),
                      "name": name,
                      "matches_shipped": matches, "shipped": args.ship, "accuracy_length": by_set}))


if __name__ == "__main__":
    main()
