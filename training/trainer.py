"""The PPO loop: rollout, score, advantages, clipped updates; checkpoints through training/checkpoint.py.

Run through accelerate so the same code runs in one process on a CPU, data-parallel
over N processes (DDP), and under DeepSpeed ZeRO-2/3. The policy and the critic each
have an optimiser and a cosine schedule; the reference model is a frozen copy of the
starting policy used only for the KL penalty, never given to an optimiser.

Data parallelism (training/distributed.py): every process samples its own equal share
of the step's prompts and scores its rollouts; the per-token results are gathered so
that everything the single-process trainer computes over the whole batch (GAE inputs,
advantage whitening, logged metrics) is computed over the whole step's batch,
identically on every process. Each process then updates on its own rows with the
losses normalised by the whole mini-batch, and DDP (or DeepSpeed) averages the
gradients, so N processes make the update one process would make on the same rollouts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig, stable_hash
from concise_rl.errors import PreemptedError, TrainingGuardError
from concise_rl.grader import Grade, Grader
from concise_rl.problems import Problem, problems_hash
from concise_rl.training import distributed, guards, ppo, preempt
from concise_rl.training.checkpoint import Checkpointer, Models
from concise_rl.training.experience import (
    Rollout,
    Scored,
    critic_forward,
    experience,
    policy_forward,
    reuse_rollout_logprobs,
)
from concise_rl.training.generation import Generation, check_prompts, context_length, generate
from concise_rl.training.models import Critic, format_prompt, freeze_all_but_top_layers, load_policy, load_tokenizer
from concise_rl.training.precision import training_precision
from concise_rl.training.reward import score_responses

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
# (responses, reference answers) -> (grades, scalar rewards); the paper's reward (graded by ``grader``) by default.
Scorer = Callable[[list[str], list[str]], tuple[list[Grade], list[float]]]
# Process r of N samples with seed + r * RANK_SEED_STRIDE, so processes draw different responses
# (process 0, and a single process, keep the seed as it is).
RANK_SEED_STRIDE = 1_000_003


class PPOTrainer:
    """Trains a policy with PPO on ``problems`` and writes checkpoints to ``out_dir``.

    :meth:`train` runs the whole phase: it resumes from this run's last checkpoint, and
    checkpoints, logs and checks the guards after each :meth:`step`. :meth:`setup`,
    :meth:`step`, :meth:`rollout` and :meth:`update` are its parts, for a benchmark or
    a test that takes steps without writing anything.

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
        grader: Grader | None = None,
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
        if scorer is None:
            if grader is None:
                raise ValueError("PPOTrainer needs a grader (concise_rl.grader.Grader) for the paper's reward, or a scorer")
            scorer = partial(score_responses, cfg=reward_cfg, grader=grader)
        self.scorer = scorer
        self.problems = problems
        self.policy_path = policy_path
        self.out_dir = Path(out_dir)
        self.on_step = on_step
        self.accelerator = accelerator or Accelerator()
        self.world = self.accelerator.num_processes
        distributed.check_divides_across_processes(ppo_cfg, self.world)
        self._zero = distributed.zero_stage(self.accelerator)
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
             "ppo": ppo_cfg.model_dump(mode="json", exclude={"guards", "preempt_grace_s"})}
        )
        if self.world > 1:
            # One key for all: a process may have resolved the start model to a path of its own.
            self.run_key = broadcast_object_list([self.run_key])[0]
        self.steps_done = 0  # steps taken so far, resumed ones too; the next step's index
        # The prompts are checked here, before any model is loaded or step is taken, so a problem
        # whose prompt cannot fit fails the run at once instead of at the step that first draws it.
        self.tokenizer = load_tokenizer(policy_path, trust_remote_code=model_cfg.trust_remote_code, prompt=prompt_cfg)
        self.prompts = [format_prompt(p.prompt, self.tokenizer, prompt_cfg) for p in problems]
        check_prompts(self.tokenizer, {"training problems": ([p.id for p in problems], self.prompts)},
                      prompt_cfg.max_prompt_tokens, max_new_tokens=ppo_cfg.max_new_tokens,
                      new_tokens_key="ppo.max_new_tokens", context=context_length(policy_path))
        self.checkpointer = Checkpointer(
            self.out_dir, self.accelerator, run_key=self.run_key, base_policy=str(policy_path),
            problems_hash=self.problems_hash, tokenizer=self.tokenizer, precision=self.precision, zero=self._zero,
            keep=keep_checkpoints, on_checkpoint=on_checkpoint,
        )
        self.ckpt_dir = self.checkpointer.ckpt_dir
        self.stops = guards.StopRecord(self.out_dir, self.run_key, ppo_cfg, self.accelerator)
        self._history: list[dict] = []  # metrics rows of the steps so far (resumed ones too), for the guards
        self._ready = False

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Seed, load the models and build their optimizers and schedules; once (later calls do nothing)."""
        if self._ready:
            return
        acc = self.accelerator
        self._seed_everything(self.cfg.seed)
        if self._zero is not None:
            distributed.configure_deepspeed(acc, self.cfg)
        dtype = self.precision.load
        policy = load_policy(self.policy_path, self.model_cfg, dtype=dtype)
        if self.cfg.actor_trainable_layers is not None:
            trainable = freeze_all_but_top_layers(policy, self.cfg.actor_trainable_layers,
                                                  self.cfg.actor_trainable_parts)
            log.info("actor trains its top %d decoder layers (%s): %d weights", self.cfg.actor_trainable_layers,
                     "whole layers" if self.cfg.actor_trainable_parts == "all" else "MLPs only, attention frozen",
                     trainable)
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
        self.policy, self.critic, self.opt_actor, self.opt_critic, self.ref = distributed.prepare(
            acc, policy, critic, opt_actor, opt_critic, self.ref
        )
        self._ready = True

    def release(self) -> None:
        """Drop the models, optimizers and schedules, so ``accelerator.free_memory()`` can give their
        memory back (a benchmark does before another run starts); :meth:`setup` builds them afresh."""
        self.policy = self.critic = self.ref = self._sampler = self.opt_actor = self.opt_critic = None
        self.sched_actor = self.sched_critic = None
        self._ready = False

    def _models(self) -> Models:
        return Models(self.policy, self.critic, self.opt_actor, self.opt_critic, self.sched_actor, self.sched_critic)

    def _minibatches_per_epoch(self) -> int:
        return self.cfg.prompts_per_step * self.cfg.samples_per_prompt // self.cfg.mini_batch_size

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def batch_indices(self, step: int) -> list[int]:
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

    # ----------------------------------------------------------------- rollout
    @contextlib.contextmanager
    def generation_model(self) -> Iterator[torch.nn.Module]:
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
    def sample(self, step: int) -> tuple[torch.Tensor, torch.Tensor, Scored]:
        """This process's share of step ``step``: sampled, scored, and run through the reference, the
        critic and (unless reused) the policy. Its token ids and attention mask ([rows, prompt width +
        response width]) and what was scored of them; :meth:`rollout` turns them into experience."""
        cfg, acc = self.cfg, self.accelerator
        # Old log-probs and values must come from the same (dropout-free) mode as sampling.
        self.policy.eval()
        self.critic.eval()
        shard = distributed.shard_indices(acc, self.batch_indices(step))
        idx = [i for i in shard for _ in range(cfg.samples_per_prompt)]
        # A preemption drops the rollout in flight (nothing has changed yet); several processes finish it
        # instead, since one that stopped sampling early would leave the others in a collective.
        with self.generation_model() as model, preempt.abandonable(self.world == 1):
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
        return input_ids, attention_mask, local

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict[str, float]]:
        """Step ``step``'s experience (this process's rows) and metrics, both over the whole step's batch."""
        acc = self.accelerator
        input_ids, attention_mask, local = self.sample(step)
        advantages, returns, metrics = experience(distributed.gather(acc, local), self.cfg)
        if self.world > 1:
            # This process's rows of the whole batch, cut back to its own response width.
            n, width = local.response_mask.shape
            rows = slice(acc.process_index * n, (acc.process_index + 1) * n)
            advantages, returns = advantages[rows, :width], returns[rows, :width]
        rollout = Rollout(
            input_ids, attention_mask, local.response_mask, local.logprobs, local.values, advantages, returns
        )
        return rollout, metrics

    # ----------------------------------------------------------------- update
    def update(self, ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped PPO updates over this process's rows of ``ro``; the losses,
        gradient norms and learning rates, over the whole step's batch."""
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
                    num_tokens = distributed.all_reduce(acc, [num_tokens])[0] / self.world
                totals = dict.fromkeys(stats, 0.0)
                groups = self.micro_batches(mb, lengths, prompt_width)
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
                    distributed.backward(acc, self.policy, self.critic, pg_loss, vf_loss, vf_coef=cfg.vf_coef,
                                         sync=g == len(groups) - 1)
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
                    else:  # DeepSpeed clipped and stepped at the end of the mini-batch (distributed.backward)
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
            out = dict(zip(keys, (v / self.world for v in distributed.all_reduce(acc, [out[k] for k in keys])),
                           strict=True))
        out["lr_actor"] = self.sched_actor.get_last_lr()[0]
        out["lr_critic"] = self.sched_critic.get_last_lr()[0]
        return out

    def micro_batches(self, rows: torch.Tensor, lengths: torch.Tensor, prompt_width: int) -> list[torch.Tensor]:
        """The micro-batches this process runs for one mini-batch's ``rows`` (:func:`split_micro_batches`),
        split further, under N processes, until it has as many as every other (distributed.even_out)."""
        cfg = self.cfg
        groups = split_micro_batches(rows, lengths, prompt_width, cfg.micro_batch_size, cfg.micro_batch_tokens)
        return distributed.even_out(self.accelerator, groups) if self.world > 1 else groups

    # ----------------------------------------------------------------- guards
    def _check_guards(self, metrics: dict[str, float]) -> None:
        """Stop the phase if this step trips a guard (training/guards.py), before anything of it is saved."""
        self._history.append({"step": self.steps_done, **metrics})
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

    def step_seed(self, step: int) -> int:
        """The torch seed step ``step`` samples under: set by the config's seed and the step, so a resumed
        run samples as an uninterrupted one does, and different on each process."""
        return self.cfg.seed * 100_003 + step + RANK_SEED_STRIDE * self.accelerator.process_index

    def step(self, step: int) -> dict[str, float]:
        """One PPO step, number ``step`` from 0, after :meth:`setup`: a rollout seeded by :meth:`step_seed`
        and the updates on it. Its metrics, the same on every process; nothing is written to disk."""
        t0 = time.perf_counter()
        torch.manual_seed(self.step_seed(step))
        rollout, metrics = self.rollout(step)
        t_gen = time.perf_counter() - t0
        metrics |= self.update(rollout)
        elapsed = time.perf_counter() - t0
        if self.world > 1:  # the slowest process sets the pace; every process logs the same figures
            elapsed, t_gen = distributed.all_reduce(self.accelerator, [elapsed, t_gen], "max")
        return metrics | {
            "step_time_s": elapsed,
            "generation_time_s": t_gen,
            "tokens_per_s": metrics["generated_tokens"] / elapsed,
        }

    def train(self) -> Path:
        """Run PPO to ``cfg.steps`` (resuming from the last checkpoint) and return the final policy dir.

        Raises :class:`TrainingGuardError` when a guard stops the run (or stopped it before
        with the same settings); the last checkpoint is kept and no final policy is written.
        Raises :class:`PreemptedError` after SIGTERM or SIGINT, once the last completed step is
        checkpointed (training/preempt.py).
        """
        done = self.finished()
        if done is not None:
            log.info("PPO already finished in %s; reusing it", done)
            return done
        self.raise_if_stopped()
        self.setup()
        self.steps_done, self._history = self.checkpointer.resume_or_reset(self._models())
        bar = tqdm(total=self.cfg.steps, initial=self.steps_done, desc=f"PPO {self.out_dir.name}", unit="step",
                   disable=not self.accelerator.is_main_process)
        with preempt.watching():
            final = self._train_loop(bar)
            self._stop_if_preempted(bar, final=final)
        return final

    def _train_loop(self, bar) -> Path:
        acc = self.accelerator
        self._saved_step = self.steps_done  # the step the latest checkpoint holds (0: none yet)
        while self.steps_done < self.cfg.steps:
            self._stop_if_preempted(bar)
            rng = _rng_state()
            try:
                metrics = self.step(self.steps_done)
            except preempt.StepAbandoned:
                _set_rng_state(rng)  # the step's sampling never happened, as far as the checkpoint can tell
                self._stop_if_preempted(bar)
                raise  # not reached: a step is abandoned only when a preemption is pending
            self.steps_done += 1
            if acc.is_main_process:
                self.checkpointer.append_metrics(self.steps_done, metrics)
            if self.on_step:
                self.on_step(self.steps_done, metrics)
            try:
                self._check_guards(metrics)  # before the checkpoint: a step that trips one is never saved
            except TrainingGuardError:
                bar.close()  # the bar's last line comes before the message, not after it
                raise
            bar.update(1)
            bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", len=f"{metrics['response_length']:.0f}",
                            kl=f"{metrics['kl']:.3f}")
            if self.steps_done % self.cfg.checkpoint_every == 0 or self.steps_done == self.cfg.steps:
                self.checkpointer.save(self.steps_done, self._models())
                self._saved_step = self.steps_done
        bar.close()
        return self.checkpointer.save_final(self.steps_done, self.policy)

    def _stop_if_preempted(self, bar, final: Path | None = None) -> None:
        """Where a preemption is pending (on any process), checkpoint the last completed step unless that is
        the latest checkpoint already, and raise :class:`PreemptedError` (training/preempt.py)."""
        signum = preempt.requested()
        # Every process stops at the same step, or the others would wait in a collective. Once the phase
        # has finished no collective follows, so each process answers for itself: one more collective here,
        # the processes' last, let one exit while another's gloo thread still ran ("terminate called").
        if self.world > 1 and final is None:
            signum = int(distributed.all_reduce(self.accelerator, [float(signum or 0)], "max")[0]) or None
        if signum is None:
            return
        bar.close()
        name, step, steps = signal.Signals(signum).name, self.steps_done, self.cfg.steps
        if final is not None:
            saved = f"the phase had finished: its final policy is in {final}"
        elif step == 0:
            saved = "no step had completed, so there was nothing to save"
        else:
            if self._saved_step != step:
                self.checkpointer.save(step, self._models())
                self._saved_step = step
            saved = f"checkpoint {self.checkpointer.latest() or self.ckpt_dir} holds it"
        waited = time.monotonic() - (preempt.STATE.at or time.monotonic())
        late = (f"; the stop took {waited:.0f} s, over ppo.preempt_grace_s={self.cfg.preempt_grace_s:g}: give the "
                "job a longer grace period (Kubernetes: terminationGracePeriodSeconds)"
                if waited > self.cfg.preempt_grace_s else "")
        raise PreemptedError(f"preempted by {name} at step {step} of {steps}: {saved}; run the same command to "
                             f"resume{late}", step=step, signum=signum)


def split_micro_batches(rows: torch.Tensor, lengths: torch.Tensor, prompt_width: int, micro_batch_size: int,
                        micro_batch_tokens: int | None) -> list[torch.Tensor]:
    """``rows`` of one mini-batch in micro-batches, longest responses first.

    At most ``micro_batch_size`` rows each and, with ``micro_batch_tokens``, at most
    that many padded tokens (rows x (prompt width + the group's longest response)).
    The loss is normalised by the whole mini-batch, so the grouping changes nothing
    but the padding computed.
    """
    rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
    groups, start = [], 0
    while start < len(rows):
        width = prompt_width + max(int(lengths[rows[start]]), 1)  # the group's widest row comes first
        size = micro_batch_size
        if micro_batch_tokens is not None:
            size = max(1, min(size, micro_batch_tokens // width))
        groups.append(rows[start : start + size])
        start += size
    return groups


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
