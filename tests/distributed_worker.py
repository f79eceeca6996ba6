"""One process of the 2-process PPO test (tests/test_distributed.py), started by `accelerate launch`
(DDP, or DeepSpeed ZeRO-2/3 when launched with DeepSpeed).

Trains the tiny model three times in the same process group and writes what the test
checks to ``--out``:
- ``refused``: the errors for a step and a mini-batch that do not divide among the processes;
- ``straight``: 3 steps; per step this process's shard of the prompts, the step's
  prompts and the logged metrics; step 0's rollout (its own rows before and after
  the gather) for the single-process comparison; hashes of the final policy and critic;
- ``resumed``: the same run stopped by an exception after step 3's metrics (step 2's
  checkpoint is the last), then started again: it must resume and end where ``straight`` ended;
- ``paper_lr``: 3 steps at the paper's learning rates (actor 5e-7, critic 9e-6), then how far
  the float32 master weights moved (DeepSpeed's own master copy under bf16), which the test
  holds against a float32 run: bf16 must not round the updates away.
The model config's dtype follows the launcher (bfloat16 under a bf16 DeepSpeed config), as the
trainer requires.
Every process logs to its own ``rank{N}.log``, so the test can count checkpoint writes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import load_file

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.grader import Grader
from concise_rl.synthetic import generate_problems
from concise_rl.training.distributed import exit_skipping_finalization, shard_indices, zero_stage
from concise_rl.training.precision import DTYPES
from concise_rl.training.trainer import PPOTrainer, split_micro_batches

# Prompts of 114-138 tokens, so the processes' shards have different prompt widths.
PROBLEMS = generate_problems(6, seed=5, min_level=1, max_level=8)
# 4 prompts x 2 samples, one mini-batch of all 8 rollouts (each process: 4), micro-batches of
# at most 2 rows and 300 padded tokens: at step 0 one process fits 2 rows in one, the other 1.
# token-mean: the loss normaliser is the token count of both processes' rows (the per-response
# means of the default mode need no more than each process's share of the rows).
SETTINGS = {
    "steps": 3, "prompts_per_step": 4, "samples_per_prompt": 2, "mini_batch_size": 8, "micro_batch_size": 2,
    "micro_batch_tokens": 300, "max_new_tokens": 16, "actor_lr": 1e-3, "critic_lr": 1e-3, "warmup_ratio": 0.0,
    "checkpoint_every": 1, "loss_agg_mode": "token-mean",
}
PAPER_LR = {"actor_lr": 5e-7, "critic_lr": 9e-6}


class Crash(Exception):
    pass


class RecordingTrainer(PPOTrainer):
    """The trainer as it is, noting what each process sampled and how it split its micro-batches."""

    def __init__(self, *args, dump: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dump = dump
        self.shards: list[dict] = []
        self.groupings: list[list[int]] = []  # per mini-batch: this process's micro-batches, then after evening out
        self._local = None

    def sample(self, step: int):
        batch = self.batch_indices(step)
        self.shards.append({"step": step, "batch": batch, "shard": shard_indices(self.accelerator, batch)})
        input_ids, attention_mask, local = super().sample(step)
        self._local = local
        return input_ids, attention_mask, local

    def rollout(self, step: int):
        rollout, metrics = super().rollout(step)
        if step == 0 and self.dump is not None:
            torch.save({"local": self._local, "rollout": rollout, "metrics": metrics}, self.dump)
        return rollout, metrics

    def micro_batches(self, rows, lengths, prompt_width):
        out = super().micro_batches(rows, lengths, prompt_width)
        own = split_micro_batches(rows, lengths, prompt_width, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)
        self.groupings.append([len(own), len(out)])
        return out


def weights_hash(acc: Accelerator, model: torch.nn.Module) -> str:
    """sha256 of the model's whole weights (ZeRO-3: gathered from every process's shard)."""
    module = acc.unwrap_model(model)
    gathered = contextlib.nullcontext()
    if zero_stage(acc) == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    digest = hashlib.sha256()
    with gathered:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_dtype(acc: Accelerator) -> str:
    return "bfloat16" if acc.mixed_precision == "bf16" else "float32"


def make(acc: Accelerator, model: Path, out: Path, settings: dict | None = None, **kwargs) -> RecordingTrainer:
    return RecordingTrainer(
        policy_path=str(model), problems=PROBLEMS, out_dir=out, ppo_cfg=PPOConfig(**SETTINGS | (settings or {})),
        model_cfg=ModelConfig(dtype=model_dtype(acc)), prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(),
        grader=Grader(workers=0), keep_checkpoints=3, accelerator=acc, **kwargs,
    )


def master_weights(acc: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float32 weights the optimizer updates: the parameters themselves, or DeepSpeed's master
    copy (under bf16 the module holds bf16 weights; gathered from every process under ZeRO-3)."""
    module = acc.unwrap_model(model)
    if zero_stage(acc) is None:
        return {name: p.detach().float().cpu() for name, p in module.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).cpu() for name, p in module.named_parameters()}


def mean_abs_change(start: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> float:
    total = sum((now[k].double() - v.double()).abs().sum().item() for k, v in start.items())
    return total / sum(v.numel() for v in start.values())


def paper_lr_moved(acc: Accelerator, model: Path, out: Path) -> dict[str, float]:
    """How far 3 steps at the paper's learning rates move the policy and the critic's body."""
    trainer = make(acc, model, out, PAPER_LR | {"warmup_ratio": 0.0})
    trainer.train()
    # What the trainer started from: the base weights in the dtype it loaded them in (DeepSpeed
    # bf16 builds its float32 masters from bf16 weights).
    start = {k: v.to(DTYPES[model_dtype(acc)] if zero_stage(acc) is not None else torch.float32)
             for k, v in load_file(str(model / "model.safetensors")).items()}
    critic = master_weights(acc, trainer.critic)
    body = {"model." + k.removeprefix("backbone."): v for k, v in critic.items() if k.startswith("backbone.")}
    return {
        "policy": mean_abs_change(start, master_weights(acc, trainer.policy)),
        "critic": mean_abs_change({k: v for k, v in start.items() if k.startswith("model.")}, body),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # accelerate starts DeepSpeed on a CPU only with the backend named (DeepSpeed's CPU
        # accelerator speaks gloo); on GPUs it picks nccl itself.
        acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        acc = Accelerator(cpu=True)
    rank = acc.process_index
    logging.basicConfig(filename=args.out / f"rank{rank}.log", level=logging.INFO,
                        format="%(name)s %(levelname)s %(message)s")

    refused = []
    for settings in ({"prompts_per_step": 3, "mini_batch_size": 6}, {"mini_batch_size": 1, "micro_batch_size": 1}):
        try:
            make(acc, args.model, args.out / "refused", settings)
        except ValueError as exc:
            refused.append(str(exc))

    metrics: list[dict] = []
    straight = make(acc, args.model, args.out / "straight", dump=args.out / f"rank{rank}-step0.pt",
                    on_step=lambda step, m: metrics.append({"step": step, **m}))
    straight.train()
    record = {
        "rank": rank, "num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "refused": refused,
        "shards": straight.shards, "metrics": metrics, "micro_batches": straight.groupings,
        "policy": weights_hash(acc, straight.policy),
        "critic": weights_hash(acc, straight.critic),
    }

    def crash_at_3(step: int, _metrics: dict) -> None:
        if step == 3:
            raise Crash

    try:
        make(acc, args.model, args.out / "resumed", on_step=crash_at_3).train()
    except Crash:
        record["crashed"] = True
    resumed = make(acc, args.model, args.out / "resumed")
    resumed.train()
    record["resumed_shards"] = resumed.shards
    record["resumed_policy"] = weights_hash(acc, resumed.policy)
    record["resumed_critic"] = weights_hash(acc, resumed.critic)
    record["model_dtype"] = model_dtype(acc)
    record["paper_lr_moved"] = paper_lr_moved(acc, args.model, args.out / "paper-lr")
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    acc.end_training()  # leave the process group before exiting


if __name__ == "__main__":
    main()
    # Everything this worker produces is in files it has closed (two_process_run says whether the
    # records were written); skip the finalization where gloo can abort the process.
    exit_skipping_finalization(0)
