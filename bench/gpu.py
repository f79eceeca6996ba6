"""GPU benchmark on a model of DeepSeek-R1-Distill-Qwen-1.5B's shape: rollout engines and a paper-size PPO step.

A Qwen2 with the 1.5B model's shape (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151936, untied embeddings: 1.78B parameters) and random
weights is built on the device (no download; random weights almost never sample EOS,
so every response runs to its token budget and the timings are of full-length
decoding). Then, printing one JSON line per result as it goes:

1. rollouts: ``concise_rl.training.generation.generate`` with transformers' ``generate``
   (engine "hf"), the project's KV engine ("kv", training/kv_decode.py) and its decode
   step recorded as CUDA graphs ("graph", training/graph_decode.py) on the same prompts
   (256 prompts of 256 tokens, 1024 new tokens, one batch, T = 0.6), after a short
   warm-up each: generated tokens per second and peak GPU memory; then one plain line
   ``rollout speedup N x`` (graph against hf, with both engines' tokens/s and peak
   memory), and greedy token-equality checks (kv against hf, graph against kv) on a
   few short prompts. An engine that fails prints ``failed`` with its error and the
   others go on (when it is the PPO part's engine, that part samples with kv instead);
2. PPO: ``--ppo-steps`` steps (default 1) of the project's PPOTrainer at the paper's
   phase-2 size: 8 prompts x 8 samples, 8,192 new tokens, micro-batches of 2, in bf16
   with gradient checkpointing, sampling with ``--ppo-engine`` (default "graph" on a
   GPU), in this process (plain PyTorch); with ``--deepspeed CONFIG`` also under that
   accelerate DeepSpeed config, started with ``accelerate launch --num_processes 1``:
   step time, rollout and update time, tokens per second and peak GPU memory.

One command (the rollouts took 2.5 min for hf and kv on one H200 on 2026-11-27; the graph
engine and the 8,192-token PPO step have not run on a GPU yet, so the total is not known):

    python -m bench.gpu | tee gpu.jsonl

``--tiny`` runs every part with small shapes on the CPU (a smoke test; the figures mean
nothing; the graph engine compiles its step with torch.compile there). On a CPU the
memory figure is the process's peak resident set instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import gc
import importlib.util
import json
import logging
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.grader import Grader
from concise_rl.problems import Problem
from concise_rl.training.embedded import SPECIAL_TOKENS, build_tokenizer
from concise_rl.training.generation import generate
from concise_rl.training.precision import LAUNCHER_PRECISION

R1_DISTILL_1_5B = {  # config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "intermediate_size": 8960, "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated since the last reset, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The project's byte-level BPE (Qwen2's layout) with no merges: one token per letter, so a prompt of
    n letters is exactly n tokens. The model's other ids decode to nothing (they are never in a prompt)."""
    return build_tokenizer([string.ascii_lowercase], 256 + len(SPECIAL_TOKENS))


def random_model(shape: dict, tokenizer, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def random_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, 26, (n, length), generator=gen)
    return ["".join(string.ascii_lowercase[i] for i in row.tolist()) for row in letters]


# ----------------------------------------------------------------- rollouts
def bench_rollouts(model, tokenizer, args, device: torch.device) -> set[str]:
    """Time each engine of ``args.engines``; the engines that failed."""
    prompts = random_prompts(args.prompts, args.prompt_tokens)
    warm = prompts[: min(8, len(prompts))]
    results, failed = {}, set()
    for engine in args.engines:
        kwargs = {"temperature": 0.6, "top_p": 1.0, "engine": engine}
        try:
            generate(model, tokenizer, warm, max_new_tokens=8, batch_size=len(warm), **kwargs)  # kernels, allocator
            torch.manual_seed(1)
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            gen = generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                           **kwargs)
            sync(device)
        except Exception as exc:  # one engine's failure must not cost the others' figures
            emit(stage="rollout", engine=engine, failed=f"{type(exc).__name__}: {str(exc)[:2000]}")
            failed.add(engine)
            continue
        seconds = time.perf_counter() - t0
        tokens = int(gen.lengths.sum())
        results[engine] = {"tokens_per_s": round(tokens / seconds, 1), **peak_memory(device)}
        emit(stage="rollout", engine=engine, prompts=len(prompts), prompt_tokens=args.prompt_tokens,
             max_new_tokens=args.new_tokens, batch_size=args.batch_size, generated_tokens=tokens,
             seconds=round(seconds, 2), **results[engine])
        del gen
    if "hf" in results:
        for engine in ("kv", "graph"):
            if engine in results:
                emit(stage="rollout", **{f"speedup_{engine}_over_hf": round(
                    results[engine]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2)})
        best = "graph" if "graph" in results else "kv" if "kv" in results else None
        if best:
            fast, hf = results[best], results["hf"]
            memory = "peak_memory_gb" if "peak_memory_gb" in hf else "peak_rss_gb"
            print(f"rollout speedup {fast['tokens_per_s'] / hf['tokens_per_s']:.2f} x ({best} "
                  f"{fast['tokens_per_s']:,.0f} tokens/s, peak {fast[memory]} GB; hf {hf['tokens_per_s']:,.0f} "
                  f"tokens/s, peak {hf[memory]} GB; {args.prompts} prompts x {args.new_tokens} new tokens, T = 0.6)",
                  flush=True)
    greedy_checks(model, tokenizer, prompts[:8], [e for e in ("hf", "kv", "graph") if e in results])
    return failed


def greedy_checks(model, tokenizer, check: list[str], engines: list[str]) -> None:
    """Greedy tokens of kv against hf and of graph against kv, 32 new tokens."""
    greedy = {e: generate(model, tokenizer, check, temperature=0.0, max_new_tokens=32, batch_size=len(check),
                          engine=e) for e in engines}
    for engine, reference in (("kv", "hf"), ("graph", "kv")):
        if engine not in greedy or reference not in greedy:
            continue
        a, b = greedy[engine], greedy[reference]
        same = (a.response_ids * a.response_mask) == (b.response_ids * b.response_mask)
        # Random weights give near-uniform logits, so in bf16 a near-tie can break either way and the
        # rows part there: the common prefix says how far they agree.
        emit(stage="greedy_check", engine=engine, against=reference, new_tokens=32,
             rows_identical=f"{int(same.all(1).sum())}/{len(check)}",
             mean_common_prefix=float(same.long().cumprod(1).sum(1).float().mean()),
             dtype=str(next(model.parameters()).dtype))


# ----------------------------------------------------------------- PPO
def ppo_settings(args) -> tuple[PPOConfig, ModelConfig, PromptConfig]:
    rollouts = args.ppo_prompts * args.ppo_samples
    ppo = PPOConfig(
        steps=args.ppo_steps, prompts_per_step=args.ppo_prompts, samples_per_prompt=args.ppo_samples,
        mini_batch_size=rollouts, micro_batch_size=args.ppo_micro_batch, max_new_tokens=args.ppo_new_tokens,
        warmup_ratio=0.0, checkpoint_every=args.ppo_steps,
    )
    model = ModelConfig(dtype=args.dtype, gradient_checkpointing=not args.tiny, generation_engine=args.ppo_engine)
    prompt = PromptConfig(instruction="", use_chat_template=False, max_prompt_tokens=args.prompt_tokens)
    return ppo, model, prompt


def bench_ppo(model_dir: Path, args, mode: str) -> None:
    """PPO steps in this process: plain PyTorch, or DeepSpeed when started by `accelerate launch` with it."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from concise_rl.training.trainer import PPOTrainer

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # DeepSpeed's CPU accelerator
    else:
        acc = Accelerator(cpu=args.device == "cpu")
    ppo, model_cfg, prompt = ppo_settings(args)
    texts = random_prompts(args.ppo_prompts * 2, args.prompt_tokens, seed=1)
    problems = [Problem(id=str(i), prompt=t, answer="0", source="bench") for i, t in enumerate(texts)]
    model_cfg = model_cfg.model_copy(update={"name_or_path": str(model_dir)})
    trainer = PPOTrainer(policy_path=str(model_dir), problems=problems, out_dir=model_dir.parent / f"ppo-{mode}",
                         ppo_cfg=ppo, model_cfg=model_cfg, prompt_cfg=prompt, reward_cfg=RewardConfig(),
                         grader=Grader(), accelerator=acc)
    device = acc.device
    t0 = time.perf_counter()
    trainer.setup()
    if acc.is_main_process:
        emit(stage="ppo", mode=mode, build_s=round(time.perf_counter() - t0, 1), processes=acc.num_processes,
             **peak_memory(device))
    for step in range(ppo.steps):
        torch.manual_seed(trainer.step_seed(step))
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        rollout, metrics = trainer.rollout(step)
        sync(device)
        t1 = time.perf_counter()
        metrics |= trainer.update(rollout)
        sync(device)
        t2 = time.perf_counter()
        if acc.is_main_process:
            emit(stage="ppo", mode=mode, step=step + 1, rollouts=ppo.prompts_per_step * ppo.samples_per_prompt,
                 engine=args.ppo_engine, micro_batch=ppo.micro_batch_size,
                 max_new_tokens=ppo.max_new_tokens, generated_tokens=int(metrics["generated_tokens"]),
                 step_time_s=round(t2 - t0, 2), rollout_time_s=round(t1 - t0, 2), update_time_s=round(t2 - t1, 2),
                 tokens_per_s=round(metrics["generated_tokens"] / (t2 - t0), 1),
                 policy_loss=metrics["policy_loss"], value_loss=metrics["value_loss"], **peak_memory(device))
    acc.wait_for_everyone()
    # Give the GPU back before a DeepSpeed run starts in another process.
    trainer.release()
    acc.free_memory()
    acc.end_training()  # a DeepSpeed child leaves its process group before it exits


def launch_deepspeed(config: Path, model_dir: Path, args) -> None:
    """The PPO part again, in a child started by `accelerate launch` with the DeepSpeed config."""
    mode = f"deepspeed:{config.stem}"
    if importlib.util.find_spec("deepspeed") is None:
        emit(stage="ppo", mode=mode, skipped="deepspeed is not installed (pip install --no-build-isolation deepspeed==0.19.8)")
        return
    forwarded = ["--device", args.device, "--dtype", args.dtype, "--prompt-tokens", str(args.prompt_tokens),
                 "--ppo-steps", str(args.ppo_steps), "--ppo-prompts", str(args.ppo_prompts),
                 "--ppo-samples", str(args.ppo_samples), "--ppo-new-tokens", str(args.ppo_new_tokens),
                 "--ppo-micro-batch", str(args.ppo_micro_batch), "--ppo-engine", args.ppo_engine]
    # The launcher's precision follows --dtype (the trainer refuses a mismatch): the configs say bf16.
    precision = LAUNCHER_PRECISION[args.dtype]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "--mixed_precision", precision,
           "--main_process_port", str(args.port), "-m", "bench.gpu", "--ppo-only", str(model_dir), "--mode", mode,
           *forwarded, *(["--tiny"] if args.tiny else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    if done.returncode != 0:
        emit(stage="ppo", mode=mode, failed=done.returncode, stderr_tail=done.stderr[-3000:])
    else:
        emit(stage="ppo", mode=mode, launch_total_s=round(time.perf_counter() - t0, 1))


# ----------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a smoke run")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available, cpu with --tiny)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--prompts", type=int, help="rollout prompts (default 256; --tiny 8)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 256; --tiny 16)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per rollout response (default 1024; --tiny 16)")
    parser.add_argument("--batch-size", type=int, help="rollout prompts per batch (default: all in one)")
    parser.add_argument("--engines", default="hf,kv,graph",
                        help="rollout engines to time, in order (default hf,kv,graph)")
    parser.add_argument("--ppo-steps", type=int, default=1, help="PPO steps per mode (default 1; 0: no PPO)")
    parser.add_argument("--ppo-prompts", type=int, help="PPO prompts per step (default 8, the paper's; --tiny 2)")
    parser.add_argument("--ppo-samples", type=int, help="PPO samples per prompt (default 8, the paper's; --tiny 2)")
    parser.add_argument("--ppo-new-tokens", type=int,
                        help="PPO response budget (default 8192, the paper's phase 2; --tiny 8)")
    parser.add_argument("--ppo-micro-batch", type=int, help="rollouts per forward/backward (default 2, the paper's)")
    parser.add_argument("--ppo-engine", choices=["kv", "graph", "hf"],
                        help="the PPO rollouts' generation engine (default graph on a GPU, kv on a CPU)")
    parser.add_argument("--deepspeed", type=Path, action="append", default=[], metavar="CONFIG",
                        help="also run the PPO steps under this accelerate DeepSpeed config (repeatable)")
    parser.add_argument("--port", type=int, default=29561, help="rendezvous port of the DeepSpeed child")
    parser.add_argument("--work", type=Path, help="where the random model is saved for PPO (default: a temp dir)")
    parser.add_argument("--ppo-only", type=Path, metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"prompts": 8 if tiny else 256, "prompt_tokens": 16 if tiny else 256, "new_tokens": 16 if tiny else 1024,
                "ppo_prompts": 2 if tiny else 8, "ppo_samples": 2 if tiny else 8, "ppo_new_tokens": 8 if tiny else 8192,
                "ppo_micro_batch": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.ppo_engine = args.ppo_engine or ("graph" if args.device.startswith("cuda") else "kv")
    args.batch_size = args.batch_size or args.prompts
    args.engines = [e for e in args.engines.split(",") if e]
    args.shape = TINY if tiny else R1_DISTILL_1_5B
    if min(args.prompts, args.prompt_tokens, args.new_tokens, args.batch_size) < 1 or args.ppo_steps < 0:
        parser.error("sizes must be at least 1 (--ppo-steps at least 0)")
    return args


# What the PPO part imports beyond the rollout part: the grader (math-verify, in a pebble pool) scores
# every rollout, and the trainer wraps the reference model with TRL's DeepSpeed helper. A GPU image
# with only torch and transformers ran the rollouts for minutes and then failed on these.
PPO_MODULES = {"pebble": "pebble", "math_verify": "math-verify"}
DEEPSPEED_MODULES = {"trl": "trl"}


def missing_packages(args: argparse.Namespace) -> list[str]:
    """The packages (pip names) the requested parts need that this interpreter cannot import."""
    needed = dict(PPO_MODULES) if args.ppo_steps else {}
    if args.ppo_steps and args.deepspeed:
        needed |= DEEPSPEED_MODULES
    return [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = missing_packages(args)
    if missing:
        sys.exit(f"bench.gpu: the PPO part needs {', '.join(missing)}, which this Python cannot import. "
                 f"Install the project (pip install -e '.[gpu]') or those packages, "
                 f"or run only the rollouts with --ppo-steps 0.")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.ppo_only is not None:
        bench_ppo(args.ppo_only, args, args.mode)
        return
    start = time.perf_counter()
    device = torch.device(args.device)
    tokenizer = char_tokenizer()
    model = random_model(args.shape, tokenizer, device, DTYPES[args.dtype])
    emit(stage="setup", device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
         dtype=args.dtype, parameters=sum(p.numel() for p in model.parameters()), shape=args.shape,
         torch=torch.__version__, transformers=transformers.__version__, build_s=round(time.perf_counter() - start, 1))
    failed = bench_rollouts(model, tokenizer, args, device)
    if args.ppo_steps and args.ppo_engine in failed:
        # The PPO step's figures still come, from the engine that ran; the line says which.
        emit(stage="ppo", note=f"engine {args.ppo_engine} failed in the rollout part: PPO samples with kv")
        args.ppo_engine = "kv"
    if args.ppo_steps:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.work) as tmp:
            model_dir = Path(tmp) / "model"
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                bench_ppo(model_dir, args, "plain")
            except Exception as exc:  # an out-of-memory at the paper's size is a result too; the rest goes on
                emit(stage="ppo", mode="plain", failed=f"{type(exc).__name__}: {str(exc)[:2000]}",
                     **peak_memory(device))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                emit(stage="ppo", mode="plain", still_allocated_gb=round(torch.cuda.memory_allocated(device) / 2**30, 2))
            for config in args.deepspeed:
                launch_deepspeed(config, model_dir, args)
    emit(stage="done", total_s=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
