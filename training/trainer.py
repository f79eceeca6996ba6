"""The PPO loop: rollout, score, advantages, clipped updates, checkpoints.

Run through accelerate so the same code runs on a CPU and under DeepSpeed. The
policy and the critic each have an optimiser and a cosine schedule; the reference
model is a frozen copy of the starting policy used only for the KL penalty.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig, stable_hash
from concise_rl.problems import Problem, problems_hash
from evaluation.grader import Grade
from training import ppo
from training.generation import Generation, generate
from training.models import Critic, format_prompt, load_policy, load_tokenizer
from training.reward import score_responses

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
# (responses, reference answers) -> (grades, scalar rewards); the paper's reward by default.
Scorer = Callable[[list[str], list[str]], tuple[list[Grade], list[float]]]


@dataclass
class Rollout:
    """One step's experience; every [batch, ...] tensor is on the CPU until used."""

    input_ids: torch.Tensor  # [batch, prompt_len + response_len]
    attention_mask: torch.Tensor  # [batch, prompt_len + response_len]
    response_mask: torch.Tensor  # [batch, response_len]
    logprobs: torch.Tensor  # [batch, response_len]
    values: torch.Tensor  # [batch, response_len]
    advantages: torch.Tensor  # [batch, response_len]
    returns: torch.Tensor  # [batch, response_len]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, input_ids, attention_mask, response_len: int, temperature: float, tokens):
    """Log-probs (and logits) of ``tokens``, the last ``response_len`` ids of ``input_ids``."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).logits
    # Logits at position i predict token i+1; temperature matches the sampling distribution.
    logits = logits[:, -response_len - 1 : -1] / temperature  # [batch, response_len, vocab]
    return ppo.logprobs_from_logits(logits, tokens), logits


def critic_forward(critic, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value of the state that emitted it.  # [batch, response_len]"""
    values = critic(input_ids, attention_mask, position_ids(attention_mask))
    return values[:, -response_len - 1 : -1]


class PPOTrainer:
    """Trains a policy with PPO on ``problems`` and writes checkpoints to ``out_dir``."""

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
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.on_step = on_step
        self.keep_checkpoints = keep_checkpoints
        self.accelerator = accelerator or Accelerator()
        # What makes a checkpoint resumable by this run: same start, data and settings.
        self.problems_hash = problems_hash(problems)
        self.run_key = stable_hash(
            {"policy": str(policy_path), "problems": self.problems_hash, "ppo": ppo_cfg.model_dump(mode="json")}
        )
        self.step = 0

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        acc = self.accelerator
        self._seed_everything(self.cfg.seed)
        self.tokenizer = load_tokenizer(
            self.policy_path, trust_remote_code=self.model_cfg.trust_remote_code, prompt=self.prompt_cfg
        )
        policy = load_policy(self.policy_path, self.model_cfg)
        critic = Critic.from_policy(self.policy_path, self.model_cfg)
        self.ref = load_policy(self.policy_path, self.model_cfg, device=acc.device).eval().requires_grad_(False)
        betas = tuple(self.cfg.adam_betas)
        opt_actor = torch.optim.AdamW(
            policy.parameters(), lr=self.cfg.actor_lr, betas=betas, weight_decay=self.cfg.weight_decay
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

        sched_actor, sched_critic = schedule(opt_actor), schedule(opt_critic)
        (self.policy, self.critic, self.opt_actor, self.opt_critic, self.sched_actor, self.sched_critic) = (
            acc.prepare(policy, critic, opt_actor, opt_critic, sched_actor, sched_critic)
        )
        self.prompts = [format_prompt(p.prompt, self.tokenizer, self.prompt_cfg) for p in self.problems]

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

    # ----------------------------------------------------------------- rollout
    @torch.no_grad()
    def _rollout(self, step: int) -> tuple[Rollout, dict[str, float]]:
        cfg, acc = self.cfg, self.accelerator
        # Old log-probs and values must come from the same (dropout-free) mode as sampling.
        self.policy.eval()
        self.critic.eval()
        idx = [i for i in self._batch_indices(step) for _ in range(cfg.samples_per_prompt)]
        gen: Generation = generate(
            acc.unwrap_model(self.policy),
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

        reuse = self._reuse_rollout_logprobs(gen)
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for s in range(0, len(idx), cfg.micro_batch_size):
            ids = input_ids[s : s + cfg.micro_batch_size].to(acc.device)
            am = attention_mask[s : s + cfg.micro_batch_size].to(acc.device)
            tok = response_ids[s : s + cfg.micro_batch_size].to(acc.device)
            if not reuse:
                lp, logits = policy_forward(self.policy, ids, am, width, cfg.temperature, tok)
                logprobs.append(lp.cpu())
                entropy.append(ppo.entropy_from_logits(logits).cpu())
            rlp, _ = policy_forward(self.ref, ids, am, width, cfg.temperature, tok)
            ref_logprobs.append(rlp.cpu())
            values.append(critic_forward(self.critic, ids, am, width).cpu())
        if reuse:
            logprobs, entropy = gen.logprobs[:, :width] * mask, gen.entropy[:, :width]
        else:
            logprobs, entropy = torch.cat(logprobs), torch.cat(entropy)
        ref_logprobs, values = torch.cat(ref_logprobs), torch.cat(values) * mask

        rewards, kl = ppo.token_rewards(scores, logprobs, ref_logprobs, mask, cfg.kl_coef)
        advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask)

        lengths = mask.sum(1)
        correct = torch.tensor([g.correct for g in grades])
        metrics = {
            "reward": scores.mean().item(),
            "accuracy": correct.float().mean().item(),
            "boxed_rate": float(np.mean([g.boxed for g in grades])),
            "response_length": lengths.mean().item(),
            "response_length_correct": lengths[correct].mean().item() if correct.any() else float("nan"),
            "response_length_incorrect": lengths[~correct].mean().item() if (~correct).any() else float("nan"),
            "truncation_rate": gen.truncated.float().mean().item(),
            "kl": (kl.sum(1)).mean().item(),
            "entropy": ppo.masked_mean(entropy, mask).item(),
            "explained_variance": ppo.explained_variance(values, returns, mask),
            "generated_tokens": lengths.sum().item(),
        }
        return Rollout(input_ids, attention_mask, mask, logprobs, values, advantages, returns), metrics

    def _reuse_rollout_logprobs(self, gen: Generation) -> bool:
        """Whether the sampling pass's log-probs stand in for a training forward (see PPOConfig)."""
        if gen.logprobs is None:
            if self.cfg.rollout_logprobs == "reuse":
                raise ValueError(
                    "ppo.rollout_logprobs='reuse' needs the KV generation engine (model.generation_engine "
                    "'auto' or 'kv', on a Qwen2/Llama/Mistral model); set ppo.rollout_logprobs to 'auto' or 'recompute'"
                )
            return False
        if self.cfg.rollout_logprobs == "auto":
            return self.model_cfg.dtype == "float32"
        return self.cfg.rollout_logprobs == "reuse"

    # ----------------------------------------------------------------- update
    def _update(self, ro: Rollout) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        n, width = ro.response_mask.shape
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "approx_kl": []}
        self.policy.train()
        self.critic.train()
        lengths = ro.response_mask.sum(1).long()
        prompt_width = ro.input_ids.shape[1] - width
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for m in range(0, n, cfg.mini_batch_size):
                mb = order[m : m + cfg.mini_batch_size]
                num_tokens = ro.response_mask[mb].sum().item()
                totals = dict.fromkeys(stats, 0.0)
                for ub in self._micro_batches(mb, lengths, prompt_width):
                    # Each micro-batch is cut to its own longest response: the rest is padding.
                    w = max(int(lengths[ub].max()), 1)
                    ids = ro.input_ids[ub, : prompt_width + w].to(acc.device)
                    am = ro.attention_mask[ub, : prompt_width + w].to(acc.device)
                    mask = ro.response_mask[ub, :w].to(acc.device)
                    old_lp, adv = ro.logprobs[ub, :w].to(acc.device), ro.advantages[ub, :w].to(acc.device)
                    old_v, ret = ro.values[ub, :w].to(acc.device), ro.returns[ub, :w].to(acc.device)
                    lp, _ = policy_forward(self.policy, ids, am, w, cfg.temperature, ids[:, -w:])
                    v = critic_forward(self.critic, ids, am, w)
                    agg = {"num_seqs": len(mb), "num_tokens": num_tokens, "max_len": cfg.max_new_tokens}
                    pg_mat, clipped = ppo.policy_loss_matrix(lp, old_lp, adv, cfg.clip_range)
                    pg_loss = ppo.aggregate(pg_mat, mask, cfg.loss_agg_mode, **agg)
                    vf_mat = ppo.value_loss_matrix(v, old_v, ret, cfg.value_clip_range)
                    vf_loss = ppo.aggregate(vf_mat, mask, cfg.loss_agg_mode, **agg)
                    acc.backward(pg_loss + cfg.vf_coef * vf_loss)
                    share = mask.sum().item() / max(num_tokens, 1)
                    totals["policy_loss"] += pg_loss.item()
                    totals["value_loss"] += vf_loss.item()
                    totals["clip_frac"] += ppo.masked_mean(clipped, mask).item() * share
                    totals["approx_kl"] += ppo.masked_mean(0.5 * (lp - old_lp) ** 2, mask).item() * share
                for name, opt, sched, model in (
                    ("actor", self.opt_actor, self.sched_actor, self.policy),
                    ("critic", self.opt_critic, self.sched_critic, self.critic),
                ):
                    norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    stats.setdefault(f"grad_norm_{name}", []).append(float(norm))
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                for key, value in totals.items():
                    stats[key].append(value)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["lr_actor"] = self.sched_actor.get_last_lr()[0]
        out["lr_critic"] = self.sched_critic.get_last_lr()[0]
        return out

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

    def _check_finite(self, metrics: dict[str, float]) -> None:
        for key in ("policy_loss", "value_loss"):
            if not math.isfinite(metrics[key]):
                raise FloatingPointError(
                    f"PPO step {self.step}: {key} is {metrics[key]}; training stopped and the last "
                    f"checkpoint in {self.ckpt_dir} kept. Lower ppo.actor_lr/critic_lr or check the rewards."
                )

    # ----------------------------------------------------------------- loop
    def finished(self) -> Path | None:
        """The final policy dir if this exact run (same start, data, settings) already completed."""
        final = self.out_dir / "final"
        state = self._read_state(final / "trainer_state.json")
        if state and state.get("run_key") == self.run_key and state.get("step") == self.cfg.steps:
            return final
        return None

    def train(self) -> Path:
        """Run PPO to ``cfg.steps`` (resuming from the last checkpoint) and return the final policy dir."""
        done = self.finished()
        if done is not None:
            log.info("PPO already finished in %s; reusing it", done)
            return done
        self._build()
        self._resume_or_reset()
        acc = self.accelerator
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"PPO {self.out_dir.name}", unit="step",
                   disable=not acc.is_main_process)
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            torch.manual_seed(self.cfg.seed * 100_003 + self.step)
            rollout, metrics = self._rollout(self.step)
            t_gen = time.perf_counter() - t0
            metrics |= self._update(rollout)
            self._check_finite(metrics)
            elapsed = time.perf_counter() - t0
            metrics |= {
                "step_time_s": elapsed,
                "generation_time_s": t_gen,
                "tokens_per_s": metrics["generated_tokens"] / elapsed,
            }
            self.step += 1
            self._append_metrics(metrics)
            if self.on_step:
                self.on_step(self.step, metrics)
            bar.update(1)
            bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", len=f"{metrics['response_length']:.0f}",
                            kl=f"{metrics['kl']:.3f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
        bar.close()
        return self._save_final(self.out_dir / "final")

    # ----------------------------------------------------------------- state
    @staticmethod
    def _read_state(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if (path / "trainer_state.json").is_file() else None

    def _resume_or_reset(self) -> None:
        latest = self._latest_checkpoint()
        state = self._read_state(latest / "trainer_state.json") if latest else None
        if state and state.get("run_key") == self.run_key:
            self.load_checkpoint(latest)
            log.info("resumed PPO from %s at step %d", latest, self.step)
            return
        if self.out_dir.exists():
            log.info("starting %s afresh: its checkpoints belong to another run", self.out_dir)
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True)

    def _append_metrics(self, metrics: dict[str, float]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def save_checkpoint(self) -> Path:
        """Write everything needed to resume; the ``latest`` pointer moves only once it is complete."""
        acc = self.accelerator
        name = f"step-{self.step:06d}"
        path = self.ckpt_dir / name
        tmp = self.ckpt_dir / f"{name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            acc.unwrap_model(self.policy).save_pretrained(tmp / "policy", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "policy")
            acc.unwrap_model(self.critic).save(tmp / "critic.safetensors")
            torch.save(
                {
                    "opt_actor": self.opt_actor.state_dict(),
                    "opt_critic": self.opt_critic.state_dict(),
                    "sched_actor": self.sched_actor.state_dict(),
                    "sched_critic": self.sched_critic.state_dict(),
                },
                tmp / "optim.pt",
            )
            torch.save(
                {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                tmp / "rng.pt",
            )
            (tmp / "trainer_state.json").write_text(
                json.dumps({"step": self.step, "run_key": self.run_key, "base_policy": str(self.policy_path)})
            )
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            pointer_tmp = self.ckpt_dir / "latest.tmp"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return path

    def _prune_checkpoints(self) -> None:
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        from safetensors.torch import load_file

        policy = acc.unwrap_model(self.policy)
        result = policy.load_state_dict(load_file(str(path / "policy" / "model.safetensors")), strict=False)
        # save_pretrained leaves out weights tied to the embeddings; nothing else may be missing.
        tied = {"lm_head.weight"} if policy.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(
                f"checkpoint {path} does not match the policy (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}); delete {self.ckpt_dir} to start this phase afresh"
            )
        acc.unwrap_model(self.critic).load(path / "critic.safetensors")
        optim = torch.load(path / "optim.pt", weights_only=False)
        self.opt_actor.load_state_dict(optim["opt_actor"])
        self.opt_critic.load_state_dict(optim["opt_critic"])
        self.sched_actor.load_state_dict(optim["sched_actor"])
        self.sched_critic.load_state_dict(optim["sched_critic"])
        rng = torch.load(path / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self.step = json.loads((path / "trainer_state.json").read_text())["step"]
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def _save_final(self, final: Path) -> Path:
        acc = self.accelerator
        if acc.is_main_process:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.policy).save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(
                json.dumps({"step": self.step, "run_key": self.run_key, "problems_hash": self.problems_hash})
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final
