"""Rollout speed: the KV engine (training/kv_decode.py) against transformers' generate.

Both engines sample the same chat-formatted prompts from the same model through
``concise_rl.training.generation.generate`` (the code path of PPO rollouts, curation and
evaluation), greedy and at T = 0.6, one untimed warm-up call each and then
``--repeats`` timed calls. Prints, per temperature and engine, generated tokens,
seconds and generated tokens per second as JSON lines, the speed-up, and for
greedy decoding whether both engines produced the same tokens.

    python -m bench.rollout [--model DIR] [--prompts 64] [--max-new-tokens 384] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.throughput import default_model
from concise_rl.config import PromptConfig
from concise_rl.synthetic import generate_problems
from concise_rl.training.generation import generate
from concise_rl.training.models import format_prompt, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(model, tok, prompts, *, engine: str, temperature: float, max_new: int, repeats: int):
    """(mean seconds per call, generated tokens per call, the last call's Generation)."""
    device = next(model.parameters()).device
    kwargs = {"temperature": temperature, "top_p": 1.0, "max_new_tokens": max_new, "batch_size": len(prompts),
              "engine": engine}
    torch.manual_seed(0)
    generate(model, tok, prompts, **kwargs)  # warm-up
    seconds, tokens, gen = [], [], None
    for r in range(repeats):
        torch.manual_seed(1 + r)
        _sync(device)
        t0 = time.perf_counter()
        gen = generate(model, tok, prompts, **kwargs)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(gen.lengths.sum()))
    return sum(seconds) / repeats, sum(tokens) / repeats, gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: newest embedded demo, else tiny random)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per call (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per engine after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    if args.prompts < 1 or args.repeats < 1:
        parser.error("--prompts and --repeats must be at least 1")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
        model_dir, origin = (args.model, "--model") if args.model else default_model(Path(tmp))
        tok = load_tokenizer(str(model_dir), prompt=PromptConfig())
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).to(args.device).eval()
    problems = generate_problems(args.prompts, seed=0, min_level=2, max_level=8, split="heldout")
    prompts = [format_prompt(p.prompt, tok, PromptConfig()) for p in problems]
    print(f"model: {model_dir} ({origin}); {args.prompts} prompts x {args.max_new_tokens} new tokens; "
          f"{args.device} {args.dtype}; torch threads={torch.get_num_threads()}")
    for temperature in (0.0, 0.6):
        results = {}
        for engine in ("hf", "kv"):
            seconds, tokens, gen = time_engine(model, tok, prompts, engine=engine, temperature=temperature,
                                               max_new=args.max_new_tokens, repeats=args.repeats)
            results[engine] = (seconds, tokens, gen)
            print(json.dumps({"engine": engine, "temperature": temperature, "generated_tokens": tokens,
                              "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}))
        (hf_s, hf_t, hf_gen), (kv_s, kv_t, kv_gen) = results["hf"], results["kv"]
        line = {"temperature": temperature, "speedup_tokens_per_s": round((kv_t / kv_s) / (hf_t / hf_s), 2)}
        if temperature == 0.0:
            same = (hf_gen.response_ids * hf_gen.response_mask) == (kv_gen.response_ids * kv_gen.response_mask)
            line["greedy_rows_identical"] = f"{int(same.all(1).sum())}/{len(prompts)}"
        print(json.dumps(line))


if __name__ == "__main__":
    main()
