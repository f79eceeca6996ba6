"""The PPO loop: rollout, score, advantages, clipped updates; checkpoints through training/checkpoint.py.

Run through accelerate so the same code runs in one process on a CPU, data-parallel
over N processes (DDP), and under DeepSpeed ZeRO-2/3. The policy and the critic each
have an optimiser and a cosine schedule; the reference model is a frozen copy of the
starting policy used only for the KL penalty, never given to an optimiser.

Data parallelism: every process samples its own equal share of the step's prompts
and scores its rollouts; the per-token results are gathered so that everything the
single-process trainer computes over the whole batch (GAE inputs, advantage
whitening, logged metrics) is computed over the whole step's batch, identically on
every process. Each process then updates on its own rows with the losses normalised
by the whole mini-batch, and DDP (or DeepSpeed) averages the gradients, so N
processes make the update one process would make on the same rollouts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig, stable_hash
from concise_rl.errors import TrainingGuardError
from concise_rl.problems import Problem, problems_hash
from evaluation.grader import Grade
from training import guards, ppo
from training.checkpoint import Checkpointer, Models
from training.experience import Rollout, Scored, critic_forward, experience, policy_forward, reuse_rollout_logprobs
from training.generation import Generation, check_prompt_lengths, generate
from training.models import Critic, format_prompt, freeze_all_but_top_layers, load_policy, load_tokenizer
from training.precision import training_precision
from training.reward import score_responses

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
# (responses, reference answers) -> (grades, scalar rewards); the paper's reward by default.
Scorer = Callable[[list[str], list[str]], tuple[list[Grade], list[float]]]
# Process r of N samples with seed + r * RANK_SEED_STRIDE, so processes draw different responses
# (process 0, and a single process, keep the seed as it is).
RANK_SEED_STRIDE = 1_000_003


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage ``accelerator`` runs under; None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


class PPOTrainer:
    """Trains a policy with PPO on ``problems`` and writes checkpoints to ``out_dir``.

    Under N processes (``accelerate launch``) every process runs this with the same
    arguments; ``on_step`` is called on every process with the same metrics (those of
    the whole step), and ``out_dir`` must be one folder all processes see.
    ``on_checkpoint`` is called on the main process with each checkpoint folder once
    it is complete and ``latest`` points at it (the pipeline mirrors it to the store).
    """

    def __init__(
        self,
        *,
        policy_path: str,
        problems: list[Problem],
        out_dir: Path,
        ppo_cfg: PPOConfig,
        model_cfg: ModelConfig,
        prompt_cfg: PromptConfig,
        reward_cfg: RewardConfig,
        on_step: StepCallback | None = None,
        keep_checkpoints: int = 2,
        accelerator: Accelerator | None = None,
        scorer: Scorer | None = None,
        start_key: str | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ):
        if not problems:
            raise ValueError("PPO needs at least one training problem; the problem set is empty")
        self.cfg = ppo_cfg
        self.model_cfg = model_cfg
        self.prompt_cfg = prompt_cfg
        self.scorer = scorer or (lambda texts, answers: score_responses(texts, answers, reward_cfg))
        self.problems = problems
        self.policy_path = policy_path
        self.out_dir = Path(out_dir)
        self.on_step = on_step
        self.accelerator = accelerator or Accelerator()
        self.world = self.accelerator.num_processes
        self._check_divides_across_processes()
        self._zero = zero_stage(self.accelerator)
        # float32 master weights and optimizer states whatever model.dtype says (training/precision.py).
        self.precision = training_precision(
            model_cfg.dtype, self.accelerator.mixed_precision, deepspeed=self._zero is not None
        )
        # The temperature log-probs are scored at: the sampling one (a consistent importance ratio), or
        # ppo.logprob_temperature (the paper's code scored at T = 1 while sampling at 0.6).
        self.logprob_temperature = ppo_cfg.logprob_temperature or ppo_cfg.temperature
        # What makes a checkpoint resumable by this run: same start, data and settings. The start
        # is ``start_key`` where given (the pipeline passes the registry URI, models:/NAME/N, which
        # stays the same when the version's files are downloaded to another folder), else the path.
        # The guards change nothing until they stop a run, so loosening one resumes the run they stopped.
        self.problems_hash = problems_hash(problems)
        self.run_key = stable_hash(
            {"policy": start_key or str(policy_path), "problems": self.problems_hash,
             "ppo": ppo_cfg.model_dump(mode="json", exclude={"guards"})}
        )
        if self.world > 1:
            # One key for all: a process may have resolved the start model to a path of its own.
            self.run_key = broadcast_object_list([self.run_key])[0]
        self.step = 0
        # The prompts are checked here, before any model is loaded or step is taken, so a problem
        # whose prompt cannot fit fails the run at once instead of at the step that first draws it.
        self.tokenizer = load_tokenizer(policy_path, trust_remote_code=model_cfg.trust_remote_code, prompt=prompt_cfg)
        self.prompts = [format_prompt(p.prompt, self.tokenizer, prompt_cfg) for p in problems]
        check_prompt_lengths(self.tokenizer, self.prompts, [p.id for p in problems], prompt_cfg.max_prompt_tokens)
        self.checkpointer = Checkpointer(
            self.out_dir, self.accelerator, run_key=self.run_key, base_policy=str(policy_path),
            problems_hash=self.problems_hash, tokenizer=self.tokenizer, precision=self.precision, zero=self._zero,
            keep=keep_checkpoints, on_checkpoint=on_checkpoint,
        )
        self.ckpt_dir = self.checkpointer.ckpt_dir
        self.stops = guards.StopRecord(self.out_dir, self.run_key, ppo_cfg, self.accelerator)
        self._history: list[dict] = []  # metrics rows of the steps so far (resumed ones too), for the guards

    def _check_divides_across_processes(self) -> None:
        n, cfg = self.world, self.cfg
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

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        acc = self.accelerator
        self._seed_everything(self.cfg.seed)
        if self._zero is not None:
            self._configure_deepspeed()
        dtype = self.precision.load
        policy = load_policy(self.policy_path, self.model_cfg, dtype=dtype)
        if self.cfg.actor_trainable_layers is not None:
            trainable = freeze_all_but_top_layers(policy, self.cfg.actor_trainable_layers)
            log.info("actor trains its top %d decoder layers: %d weights", self.cfg.actor_trainable_layers, trainable)
        critic = Critic.from_policy(self.policy_path, self.model_cfg, dtype=dtype)
        # The reference is loaded like the policy and runs under the same autocast, so it computes
        # exactly as the policy does and the KL starts at 0 (a model.dtype reference would not: under
        # autocast its residual stream stays in bf16 where the float32 policy's is float32).
        self.ref = load_policy(self.policy_path, self.model_cfg, device=acc.device, dtype=dtype)
        self.ref.eval().requires_grad_(False)
        # Rollouts sample from a model.dtype copy of the float32 policy, refreshed before each one.
        self._sampler = None
        if self.precision.sampling_copy:
            self._sampler = load_policy(self.policy_path, self.model_cfg, device=acc.device)
            self._sampler.eval().requires_grad_(False)
        betas = tuple(self.cfg.adam_betas)
        opt_actor = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=self.cfg.actor_lr, betas=betas, weight_decay=self.cfg.weight_decay
        )
        opt_critic = torch.optim.AdamW(
            critic.parameters(), lr=self.cfg.critic_lr, betas=betas, weight_decay=self.cfg.weight_decay
        )
        updates = self.cfg.steps * self.cfg.ppo_epochs * self._minibatches_per_epoch()
        warmup = math.ceil(self.cfg.warmup_ratio * updates)

        def schedule(opt):
            return get_cosine_with_min_lr_schedule_with_warmup(
                opt, num_warmup_steps=warmup, num_training_steps=updates, min_lr_rate=self.cfg.min_lr_ratio
            )

        # The schedules stay outside accelerate: its scheduler wrapper steps once per process
        # (N times per update under N processes), and here every process steps its own once.
        self.sched_actor, self.sched_critic = schedule(opt_actor), schedule(opt_critic)
        if self._zero is None:
            self.policy, self.critic, self.opt_actor, self.opt_critic = acc.prepare(
                policy, critic, opt_actor, opt_critic
            )
        else:
            # accelerate takes one model per prepare() under DeepSpeed: one engine for each, and
            # the reference in an engine of its own with no optimizer (ZeRO-3: sharded like the others).
            from trl.models.utils import prepare_deepspeed

            self.policy, self.opt_actor = acc.prepare(policy, opt_actor)
            self.critic, self.opt_critic = acc.prepare(critic, opt_critic)
            self.ref = prepare_deepspeed(self.ref, acc)

    def _configure_deepspeed(self) -> None:
        """Settings the DeepSpeed config must take from the PPO config (no dataloader sets them)."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.cfg.micro_batch_size
        ds["gradient_clipping"] = self.cfg.max_grad_norm  # DeepSpeed clips inside its step
        # The trainer marks the end of each mini-batch itself (_backward), however many micro-batches it had.
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = "auto"  # accelerate fills it in: micro-batch x processes

    def _models(self) -> Models:
        return Models(self.policy, self.critic, self.opt_actor, self.opt_critic, self.sched_actor, self.sched_critic)

    def _minibatches_per_epoch(self) -> int:
        return self.cfg.prompts_per_step * self.cfg.samples_per_prompt // self.cfg.mini_batch_size

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _batch_indices(self, step: int) -> list[int]:
        """Problems of one step: a fresh permutation per pass over the set, fixed by the seed.

        Derived from the step alone, so a resumed run draws the same data as an uninterrupted one.
        """
        n, k = len(self.problems), self.cfg.prompts_per_step
        start = step * k
        out = []
        while len(out) < k:
            epoch, offset = divmod(start + len(out), n)
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
            out.extend(perm[offset : offset + k - len(out)].tolist())
        return out

    def _shard_indices(self, step: int) -> list[int]:
        """This process's problems of one step: an equal, contiguous share of ``_batch_indices``.

        In process order the shards make up the step's problems, so the gathered rollouts
        are in the order a single process would have them.
        """
        batch = self._batch_indices(step)
        share = len(batch) // self.world
        rank = self.accelerator.process_index
        return batch[rank * share : (rank + 1) * share]

    # ----------------------------------------------------------------- rollout
    @contextlib.contextmanager
    def _generation_model(self) -> Iterator[torch.nn.Module]:
        """The policy as a plain Hugging Face model to sample from (ZeRO-3: its parameters gathered;
        mixed precision without DeepSpeed: the model.dtype copy, brought up to date)."""
        if self._zero == 3:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(self.policy, self.accelerator) as model:
                yield model
        elif self._sampler is not None:
            self._sync_sampler()
            yield self._sampler
        else:
            yield self.accelerator.unwrap_model(self.policy)

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        """Copy the float32 policy into the sampling copy, rounding to its dtype."""
        master = self.accelerator.unwrap_model(self.policy).named_parameters()
        for (name, dst), (master_name, src) in zip(self._sampler.named_parameters(), master, strict=True):
            if name != master_name:
                raise RuntimeError(f"sampling copy and policy disagree on their weights ({name} vs {master_name})")
            dst.copy_(src)

    @torch.no_grad()
    def _rollout(self, step: int) -> tuple[Rollout, dict[str, float]]:
        cfg, acc = self.cfg, self.accelerator
        # Old log-probs and values must come from the same (dropout-free) mode as sampling.
        self.policy.eval()
        self.critic.eval()
        idx = [i for i in self._shard_indices(step) for _ in range(cfg.samples_per_prompt)]
        with self._generation_model() as model:
            gen: Generation = generate(
                model,
                self.tokenizer,
                [self.prompts[i] for i in idx],
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=len(idx),
                max_prompt_tokens=self.prompt_cfg.max_prompt_tokens,
                engine=self.model_cfg.generation_engine,
            )
        # Trim the response columns no row used, so later passes don't pay for padding.
        width = max(int(gen.lengths.max()), 1)
        response_ids, mask = gen.response_ids[:, :width], gen.response_mask[:, :width]
        input_ids = torch.cat([gen.prompt_ids, response_ids], 1)
        attention_mask = torch.cat([gen.prompt_mask, mask.long()], 1)

        grades, scores = self.scorer(gen.texts, [self.problems[i].answer for i in idx])
        scores = torch.tensor(scores, dtype=torch.float32)

        reuse = reuse_rollout_logprobs(gen, cfg, self.logprob_temperature, self.precision.mixed)
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for s in range(0, len(idx), cfg.micro_batch_size):
            ids = input_ids[s : s + cfg.micro_batch_size].to(acc.device)
            am = attention_mask[s : s + cfg.micro_batch_size].to(acc.device)
            tok = response_ids[s : s + cfg.micro_batch_size].to(acc.device)
            with self.precision.autocast(acc.device):
                if not reuse:
                    lp, logits = policy_forward(self.policy, ids, am, width, self.logprob_temperature, tok)
                    logprobs.append(lp.cpu())
                    entropy.append(ppo.entropy_from_logits(logits).cpu())
                rlp, _ = policy_forward(self.ref, ids, am, width, self.logprob_temperature, tok)
                ref_logprobs.append(rlp.cpu())
                values.append(critic_forward(self.critic, ids, am, width).cpu())
        if reuse:
            logprobs, entropy = gen.logprobs[:, :width] * mask, gen.entropy[:, :width]
        else:
            logprobs, entropy = torch.cat(logprobs), torch.cat(entropy)
        ref_logprobs, values = torch.cat(ref_logprobs), torch.cat(values) * mask
        local = Scored(
            mask, logprobs, ref_logprobs, values, entropy, scores,
            correct=torch.tensor([g.correct for g in grades]),
            boxed=torch.tensor([g.boxed for g in grades]),
            truncated=gen.truncated,
        )
        advantages, returns, metrics = experience(self._gather(local), self.cfg)
        if self.world > 1:
            # This process's rows of the whole batch, cut back to its own response width.
            rows = slice(acc.process_index * len(idx), (acc.process_index + 1) * len(idx))
            advantages, returns = advantages[rows, :width], returns[rows, :width]
        return Rollout(input_ids, attention_mask, mask, logprobs, values, advantages, returns), metrics

    def _gather(self, local: Scored) -> Scored:
        """Every process's rows in process order, right-padded with zeros to one response width
        (padding is masked out of everything computed from it). One process: ``local`` itself."""
        if self.world == 1:
            return local
        acc = self.accelerator

        def rows(t: torch.Tensor) -> torch.Tensor:  # [rows] from every process
            return acc.gather(t.float().to(acc.device)).cpu()

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [rows, width] from every process
            return acc.gather(acc.pad_across_processes(t.float().to(acc.device), dim=1)).cpu()

        return Scored(
            tokens(local.response_mask), tokens(local.logprobs), tokens(local.ref_logprobs), tokens(local.values),
            tokens(local.entropy), rows(local.scores), rows(local.correct).bool(), rows(local.boxed).bool(),
            rows(local.truncated).bool(),
        )

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` summed (or their maximum taken) over all processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=reduce_op)
        return t.tolist()

    # ----------------------------------------------------------------- update
    def _update(self, ro: Rollout) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        n, width = ro.response_mask.shape
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "approx_kl": []}
        self.policy.train()
        self.critic.train()
        lengths = ro.response_mask.sum(1).long()
        prompt_width = ro.input_ids.shape[1] - width
        # Each process takes an equal share of every mini-batch from its own rows.
        local_mini = cfg.mini_batch_size // self.world
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for m in range(0, n, local_mini):
                mb = order[m : m + local_mini]
                num_tokens = ro.response_mask[mb].sum().item()
                if self.world > 1:
                    # Normalise by the whole mini-batch's token count over N (num_seqs, this process's
                    # rows, already is the whole count over N): each process's loss is then N times its
                    # share of the whole mini-batch's loss, and the average of the processes'
                    # gradients, which DDP and DeepSpeed take, is the whole mini-batch's gradient.
                    num_tokens = self._all_reduce([num_tokens])[0] / self.world
                totals = dict.fromkeys(stats, 0.0)
                groups = self._micro_batches(mb, lengths, prompt_width)
                if self.world > 1:
                    groups = self._even_out(groups)
                for g, ub in enumerate(groups):
                    # Each micro-batch is cut to its own longest response: the rest is padding.
                    w = max(int(lengths[ub].max()), 1)
                    ids = ro.input_ids[ub, : prompt_width + w].to(acc.device)
                    am = ro.attention_mask[ub, : prompt_width + w].to(acc.device)
                    mask = ro.response_mask[ub, :w].to(acc.device)
                    old_lp, adv = ro.logprobs[ub, :w].to(acc.device), ro.advantages[ub, :w].to(acc.device)
                    old_v, ret = ro.values[ub, :w].to(acc.device), ro.returns[ub, :w].to(acc.device)
                    with self.precision.autocast(acc.device):
                        lp, _ = policy_forward(self.policy, ids, am, w, self.logprob_temperature, ids[:, -w:])
                        v = critic_forward(self.critic, ids, am, w)
                    agg = {"num_seqs": len(mb), "num_tokens": num_tokens, "max_len": cfg.max_new_tokens}
                    pg_mat, clipped = ppo.policy_loss_matrix(lp, old_lp, adv, cfg.clip_range)
                    pg_loss = ppo.aggregate(pg_mat, mask, cfg.loss_agg_mode, **agg)
                    vf_mat = ppo.value_loss_matrix(v, old_v, ret, cfg.value_clip_range)
                    vf_loss = ppo.aggregate(vf_mat, mask, cfg.loss_agg_mode, **agg)
                    self._backward(pg_loss, vf_loss, sync=g == len(groups) - 1)
                    share = mask.sum().item() / max(num_tokens, 1)
                    totals["policy_loss"] += pg_loss.item()
                    totals["value_loss"] += vf_loss.item()
                    totals["clip_frac"] += ppo.masked_mean(clipped, mask).item() * share
                    totals["approx_kl"] += ppo.masked_mean(0.5 * (lp - old_lp) ** 2, mask).item() * share
                for name, opt, sched, model in (
                    ("actor", self.opt_actor, self.sched_actor, self.policy),
                    ("critic", self.opt_critic, self.sched_critic, self.critic),
                ):
                    if self._zero is None:
                        norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        opt.step()
                    else:  # DeepSpeed clipped and stepped at the end of the mini-batch (_backward)
                        norm = model.get_global_grad_norm()
                    stats.setdefault(f"grad_norm_{name}", []).append(float("nan") if norm is None else float(norm))
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                for key, value in totals.items():
                    stats[key].append(value)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        if self.world > 1:
            # Each process's losses are its share of the whole mini-batch's, times N (see above).
            keys = sorted(out)
            out = dict(zip(keys, (v / self.world for v in self._all_reduce([out[k] for k in keys])), strict=True))
        out["lr_actor"] = self.sched_actor.get_last_lr()[0]
        out["lr_critic"] = self.sched_critic.get_last_lr()[0]
        return out

    def _backward(self, pg_loss: torch.Tensor, vf_loss: torch.Tensor, *, sync: bool) -> None:
        """Accumulate one micro-batch's gradients; ``sync`` on the last of a mini-batch.

        Under DDP the gradients are averaged over the processes once, on the last micro-batch.
        Under DeepSpeed each engine runs its own backward and, on the last micro-batch, its
        step (clip, optimizer, zero grad): accelerate's backward drives only one engine.
        """
        acc, cfg = self.accelerator, self.cfg
        if self._zero is not None:
            for engine, loss in ((self.policy, pg_loss), (self.critic, cfg.vf_coef * vf_loss)):
                engine.set_gradient_accumulation_boundary(sync)
                engine.backward(loss)
                if sync:
                    engine.step()
            return
        loss = pg_loss + cfg.vf_coef * vf_loss
        if sync or self.world == 1:
            acc.backward(loss)
            return
        with acc.no_sync(self.policy), acc.no_sync(self.critic):
            acc.backward(loss)

    def _even_out(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Split micro-batches until this process has as many as the process with the most.

        Every process must run as many forwards and backwards per mini-batch: under ZeRO-3
        each is a collective. Possible because all hold the same number of rows and every
        micro-batch has at least one; the loss is normalised by the mini-batch, so the
        split changes nothing but the grouping.
        """
        target = int(self._all_reduce([len(groups)], "max")[0])
        groups = list(groups)
        while len(groups) < target:
            i = max(range(len(groups)), key=lambda j: len(groups[j]))
            half = (len(groups[i]) + 1) // 2
            groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
        return groups

    def _micro_batches(self, rows: torch.Tensor, lengths: torch.Tensor, prompt_width: int) -> list[torch.Tensor]:
        """``rows`` of one mini-batch in micro-batches, longest responses first.

        At most ``micro_batch_size`` rows each and, with ``micro_batch_tokens``, at most
        that many padded tokens (rows x (prompt width + the group's longest response)).
        The loss is normalised by the whole mini-batch, so the grouping changes nothing
        but the padding computed.
        """
        rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
        budget = self.cfg.micro_batch_tokens
        groups, start = [], 0
        while start < len(rows):
            width = prompt_width + max(int(lengths[rows[start]]), 1)  # the group's widest row comes first
            size = self.cfg.micro_batch_size
            if budget is not None:
                size = max(1, min(size, budget // width))
            groups.append(rows[start : start + size])
            start += size
        return groups

    def _check_guards(self, metrics: dict[str, float]) -> None:
        """Stop the phase if this step trips a guard (training/guards.py), before anything of it is saved."""
        self._history.append({"step": self.step, **metrics})
        finite = guards.FINITE_KEYS
        if self._zero is None:  # DeepSpeed may report no gradient norm (logged as NaN)
            finite += ("grad_norm_actor", "grad_norm_critic")
        trip = guards.check(self._history, self.cfg.guards, finite)
        if trip is not None:
            self.stops.stop(trip, metrics, self.checkpointer.latest())

    def raise_if_stopped(self) -> None:
        """Raise the recorded stop again if a guard stopped this run with the guards it has now
        (guards.StopRecord.raise_if_stopped); with other guards, :meth:`train` resumes instead."""
        self.stops.raise_if_stopped()

    # ----------------------------------------------------------------- loop
    def finished(self) -> Path | None:
        """The final policy dir if this exact run (same start, data, settings) already completed."""
        final = self.checkpointer.finished(self.cfg.steps)
        # A run a guard stopped never writes final/; a record next to one still wins.
        return final if final is not None and self.stops.read() is None else None

    def resumable_step(self) -> int | None:
        """The step of this run's last checkpoint, if there is one to resume from (else None)."""
        own = self.checkpointer.own()
        return int(own[1]["step"]) if own else None

    def train(self) -> Path:
        """Run PPO to ``cfg.steps`` (resuming from the last checkpoint) and return the final policy dir.

        Raises :class:`TrainingGuardError` when a guard stops the run (or stopped it before
        with the same settings); the last checkpoint is kept and no final policy is written.
        """
        done = self.finished()
        if done is not None:
            log.info("PPO already finished in %s; reusing it", done)
            return done
        self.raise_if_stopped()
        self._build()
        self.step, self._history = self.checkpointer.resume_or_reset(self._models())
        acc = self.accelerator
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"PPO {self.out_dir.name}", unit="step",
                   disable=not acc.is_main_process)
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            torch.manual_seed(self.cfg.seed * 100_003 + self.step + RANK_SEED_STRIDE * acc.process_index)
            rollout, metrics = self._rollout(self.step)
            t_gen = time.perf_counter() - t0
            metrics |= self._update(rollout)
            elapsed = time.perf_counter() - t0
            if self.world > 1:  # the slowest process sets the pace; every process logs the same figures
                elapsed, t_gen = self._all_reduce([elapsed, t_gen], "max")
            metrics |= {
                "step_time_s": elapsed,
                "generation_time_s": t_gen,
                "tokens_per_s": metrics["generated_tokens"] / elapsed,
            }
            self.step += 1
            if acc.is_main_process:
                self.checkpointer.append_metrics(self.step, metrics)
            if self.on_step:
                self.on_step(self.step, metrics)
            try:
                self._check_guards(metrics)  # before the checkpoint: a step that trips one is never saved
            except TrainingGuardError:
                bar.close()  # the bar's last line comes before the message, not after it
                raise
            bar.update(1)
            bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", len=f"{metrics['response_length']:.0f}",
                            kl=f"{metrics['kl']:.3f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.checkpointer.save(self.step, self._models())
        bar.close()
        return self.checkpointer.save_final(self.step, self.policy)
