"""The base alone: build the embedded base under a config (and ``--set`` changes) and evaluate it.

The base's SFT recipe decides everything after it, and a whole seed run (``bench.seeds``)
takes as long as ``make demo``. This builds only the base (``model.embedded``: its traces,
seed, precision, optimiser) into ``--out`` and evaluates it on the config's evaluation sets
at every evaluation temperature, as the pipeline's evaluation stage does, then prints one
JSON line: the settings, the SFT's wall time, and accuracy and mean length per set and
temperature. A base already built in ``--out`` under the same settings is evaluated again,
not rebuilt.

    python -m bench.base [--config configs/demo.yaml] [--out DIR] [--set KEY=VALUE ...]

e.g. ``python -m bench.base --set model.embedded.sft_dtype=bfloat16`` (the float32 / bf16
comparison of the base; about 10x slower on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.phase2 import figures
from concise_rl.config import load_config, stable_hash
from concise_rl.evaluation.evaluate import evaluate_model
from concise_rl.grader import Grader
from concise_rl.tasks.stages import device, evaluation_sets
from concise_rl.training.embedded import build_embedded_model
from concise_rl.training.models import is_embedded, load_policy, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="a config whose model is embedded (configs/demo.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "base",
                        help="folder for the built bases (bench/results/base)")
    parser.add_argument("--set", dest="changes", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config changes, as the pipeline's --set: e.g. model.embedded.sft_seed=1")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.changes)
    if not is_embedded(cfg.model):
        raise SystemExit(f"bench.base: {args.config} trains no embedded base (model.name_or_path is "
                         f"{cfg.model.name_or_path!r}); give a config whose model is 'embedded:NAME'")
    settings = cfg.model.embedded.model_dump()
    model_dir = args.out / f"base-{stable_hash([settings, cfg.prompt.model_dump()])[:12]}"
    start = time.monotonic()
    build_embedded_model(model_dir, cfg.model.embedded, cfg.prompt)
    sft_min = round((time.monotonic() - start) / 60, 1)
    tokenizer = load_tokenizer(str(model_dir), prompt=cfg.prompt)
    model = load_policy(str(model_dir), cfg.model, device(cfg)).eval()
    grader = Grader.from_config(cfg.grader)
    try:
        summary, _ = evaluate_model(model, tokenizer, evaluation_sets(cfg), cfg.evaluation, cfg.prompt, grader,
                                    seed=cfg.seed)
    finally:
        grader.close()
    by_set = {name: figures(temps) for name, temps in summary.items()}
    print(json.dumps({"set": args.changes, "model": str(model_dir), "build_min": sft_min, "accuracy_length": by_set}))


if __name__ == "__main__":
    main()
