"""Data parallelism for the PPO trainer: how the processes share a step, what they exchange,
and what differs between one process, DDP and DeepSpeed.

Every process runs the trainer with the same arguments. Each samples an equal share of
the step's prompts (:func:`shard_indices`); the per-token results are gathered
(:func:`gather`) so that every process computes advantages and metrics over the whole
step's batch, and each trains on an equal share of every mini-batch, as many micro-batches
as the others (:func:`even_out`). The models are prepared (:func:`prepare`) and their
gradients accumulated (:func:`backward`) as DDP or DeepSpeed needs. These take the
accelerator the trainer runs under.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from concise_rl.config import PPOConfig
from concise_rl.training.experience import Scored


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage ``accelerator`` runs under; None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def configure_deepspeed(accelerator: Accelerator, cfg: PPOConfig) -> None:
    """Settings the DeepSpeed config must take from the PPO config (no dataloader sets them)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step
    # The trainer marks the end of each mini-batch itself (backward), however many micro-batches it had.
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = "auto"  # accelerate fills it in: micro-batch x processes


def prepare(accelerator: Accelerator, policy, critic, opt_actor, opt_critic, ref):
    """The policy, critic, their optimizers and the reference, prepared to run under ``accelerator``."""
    if zero_stage(accelerator) is None:
        return *accelerator.prepare(policy, critic, opt_actor, opt_critic), ref
    # accelerate takes one model per prepare() under DeepSpeed: one engine for each, and
    # the reference in an engine of its own with no optimizer (ZeRO-3: sharded like the others).
    from trl.models.utils import prepare_deepspeed

    policy, opt_actor = accelerator.prepare(policy, opt_actor)
    critic, opt_critic = accelerator.prepare(critic, opt_critic)
    return policy, critic, opt_actor, opt_critic, prepare_deepspeed(ref, accelerator)


def backward(accelerator: Accelerator, policy, critic, pg_loss: torch.Tensor, vf_loss: torch.Tensor, *,
             vf_coef: float, sync: bool) -> None:
    """Accumulate one micro-batch's gradients; ``sync`` on the last of a mini-batch.

    Under DDP the gradients are averaged over the processes once, on the last micro-batch.
    Under DeepSpeed each engine runs its own backward and, on the last micro-batch, its
    step (clip, optimizer, zero grad): accelerate's backward drives only one engine.
    """
    acc = accelerator
    if zero_stage(acc) is not None:
        for engine, loss in ((policy, pg_loss), (critic, vf_coef * vf_loss)):
            engine.set_gradient_accumulation_boundary(sync)
            engine.backward(loss)
            if sync:
                engine.step()
        return
    loss = pg_loss + vf_coef * vf_loss
    if sync or acc.num_processes == 1:
        acc.backward(loss)
        return
    with acc.no_sync(policy), acc.no_sync(critic):
        acc.backward(loss)


def check_divides_across_processes(cfg: PPOConfig, n: int) -> None:
    """Refuse a step or a mini-batch that ``n`` processes cannot share equally."""
    if cfg.prompts_per_step % n:
        raise ValueError(
            f"ppo.prompts_per_step={cfg.prompts_per_step} does not divide among {n} processes: each process "
            f"samples an equal share of the step's prompts; set it to a multiple of {n} or launch fewer processes"
        )
    if cfg.mini_batch_size % n:
        raise ValueError(
            f"ppo.mini_batch_size={cfg.mini_batch_size} does not divide among {n} processes: each process "
            f"trains on an equal share of every mini-batch; set it to a multiple of {n} or launch fewer processes"
        )


def shard_indices(accelerator: Accelerator, batch: list[int]) -> list[int]:
    """This process's problems of one step: an equal, contiguous share of ``batch``, the step's problems.

    In process order the shards make up the step's problems, so the gathered rollouts
    are in the order a single process would have them.
    """
    share = len(batch) // accelerator.num_processes
    rank = accelerator.process_index
    return batch[rank * share : (rank + 1) * share]


def gather(accelerator: Accelerator, local: Scored) -> Scored:
    """Every process's rows in process order, right-padded with zeros to one response width
    (padding is masked out of everything computed from it). One process: ``local`` itself."""
    if accelerator.num_processes == 1:
        return local
    acc = accelerator

    def rows(t: torch.Tensor) -> torch.Tensor:  # [rows] from every process
        return acc.gather(t.float().to(acc.device)).cpu()

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [rows, width] from every process
        return acc.gather(acc.pad_across_processes(t.float().to(acc.device), dim=1)).cpu()

    return Scored(
        tokens(local.response_mask), tokens(local.logprobs), tokens(local.ref_logprobs), tokens(local.values),
        tokens(local.entropy), rows(local.scores), rows(local.correct).bool(), rows(local.boxed).bool(),
        rows(local.truncated).bool(),
    )


def all_reduce(accelerator: Accelerator, values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (or their maximum taken) over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(t, op=reduce_op)
    return t.tolist()


def even_out(accelerator: Accelerator, groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split micro-batches until this process has as many as the process with the most.

    Every process must run as many forwards and backwards per mini-batch: under ZeRO-3
    each is a collective. Possible because all hold the same number of rows and every
    micro-batch has at least one; the loss is normalised by the mini-batch, so the
    split changes nothing but the grouping.
    """
    target = int(all_reduce(accelerator, [len(groups)], "max")[0])
    groups = list(groups)
    while len(groups) < target:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        half = (len(groups[i]) + 1) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def exit_skipping_finalization(code: int) -> None:
    """Exit a data-parallel process without the interpreter's finalization.

    gloo's threads can release tensors while Python shuts down and abort the process
    ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291) even after
    the process group was left: CI lost two-process launches to it, on rank 0 of the test worker
    and on rank 1 of `concise-rl train`, after every rank had finished. Call it once everything
    the process produces is in closed files or committed rows (and its MLflow runs are ended):
    only logging and the standard streams are flushed here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
