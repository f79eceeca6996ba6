"""GRPO through TRL's GRPOTrainer, set up like one of our PPO phases for a side-by-side run.

Same model directory, tokenizer, chat-formatted prompts (``format_prompt``) and reward
(``score_responses``); the PPO phase's batch, sampling and optimiser settings are
mapped onto ``GRPOConfig`` by :func:`grpo_args`. What differs is the algorithm: GRPO
has no critic, its advantage is the reward normalised within each prompt's group,
and its KL term (weight ``beta`` = our ``kl_coef``) is TRL's k3 estimate added to the
loss rather than our per-token k1 penalty on the reward. TRL's other defaults stay,
e.g. rewards scaled by their group's standard deviation (``scale_rewards="group"``)
whatever the loss type. ``ppo.logprob_temperature`` has no GRPO counterpart: TRL scores
log-probs at the sampling temperature, as our PPO does by default.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from concise_rl.ablation import GRPO_LOSS_TYPES
from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig, stable_hash
from concise_rl.files import replaced_dir
from concise_rl.grader import Grader
from concise_rl.problems import Problem, problems_hash
from concise_rl.training.models import format_prompt, freeze_all_but_top_layers, load_tokenizer
from concise_rl.training.precision import training_precision
from concise_rl.training.reward import score_responses

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
# TRL's names for what our PPO logs as response_length and truncation_rate.
_ALIASES = {"response_length": "completions/mean_length", "truncation_rate": "completions/clipped_ratio"}


def grpo_dataset(problems: list[Problem], tokenizer, prompt_cfg: PromptConfig) -> Dataset:
    """Prompts already in the chat format (TRL leaves plain-text prompts as they are) and their answers."""
    return Dataset.from_dict({
        "prompt": [format_prompt(p.prompt, tokenizer, prompt_cfg) for p in problems],
        "answer": [p.answer for p in problems],
    })


def paper_reward(reward_cfg: RewardConfig, grader: Grader):
    """The paper's reward as a TRL reward function; it also logs accuracy and the boxed rate."""

    def paper_reward(completions: list[str], answer: list[str], log_metric=None, **_) -> list[float]:
        grades, scores = score_responses(completions, answer, reward_cfg, grader)
        if log_metric is not None:
            log_metric("accuracy", float(np.mean([g.correct for g in grades])))
            log_metric("boxed_rate", float(np.mean([g.boxed for g in grades])))
        return scores

    return paper_reward


def optimizer_steps_per_rl_step(ppo_cfg: PPOConfig) -> int:
    """PPO's mini-batches per epoch: how many optimiser steps one batch of rollouts feeds."""
    return ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt // ppo_cfg.mini_batch_size


def grpo_args(ppo_cfg: PPOConfig, out_dir: Path, *, loss_type: str, model_cfg: ModelConfig, use_cpu: bool) -> GRPOConfig:
    """GRPOConfig with the PPO phase's settings wherever GRPO has the same knob.

    One RL step generates ``prompts_per_step x samples_per_prompt`` completions and
    feeds ``ppo_epochs`` passes of mini-batches of ``mini_batch_size``, each
    accumulated over micro-batches of ``micro_batch_size``, as our PPO does. TRL
    counts optimiser steps, so ``max_steps`` is RL steps times mini-batches per step.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"GRPO loss_type {loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}")
    precision = training_precision(model_cfg.dtype, "no", deepspeed=False)
    rollouts = ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt
    return GRPOConfig(
        output_dir=str(out_dir),
        loss_type=loss_type,
        max_steps=ppo_cfg.steps * ppo_cfg.ppo_epochs * optimizer_steps_per_rl_step(ppo_cfg),
        num_generations=ppo_cfg.samples_per_prompt,
        per_device_train_batch_size=ppo_cfg.micro_batch_size,
        gradient_accumulation_steps=ppo_cfg.mini_batch_size // ppo_cfg.micro_batch_size,
        steps_per_generation=rollouts // ppo_cfg.micro_batch_size,
        num_iterations=ppo_cfg.ppo_epochs,
        max_completion_length=ppo_cfg.max_new_tokens,
        temperature=ppo_cfg.temperature,
        top_p=ppo_cfg.top_p,
        beta=ppo_cfg.kl_coef,
        epsilon=ppo_cfg.clip_range,
        learning_rate=ppo_cfg.actor_lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": ppo_cfg.min_lr_ratio},
        warmup_steps=ppo_cfg.warmup_ratio,  # below 1: a fraction of the optimiser steps, as ours
        adam_beta1=ppo_cfg.adam_betas[0],
        adam_beta2=ppo_cfg.adam_betas[1],
        weight_decay=ppo_cfg.weight_decay,
        max_grad_norm=ppo_cfg.max_grad_norm,
        seed=ppo_cfg.seed,
        # As our PPO (training/precision.py): float32 weights and optimizer states, forwards under
        # autocast in model.dtype (TRL's bf16 flag), and gradient checkpointing only when the model
        # config asks (TRL defaults to bf16 autocast and checkpointing whatever the model is).
        bf16=precision.mixed,
        fp16=False,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        model_init_kwargs={"dtype": "float32"},
        trust_remote_code=model_cfg.trust_remote_code,
        use_cpu=use_cpu,
        use_vllm=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=ppo_cfg.ppo_epochs * optimizer_steps_per_rl_step(ppo_cfg),
        disable_tqdm=True,
    )


class _RLStepLog(TrainerCallback):
    """Turns TRL's log, once per RL step, into a metrics row, a progress-bar tick and ``on_step``."""

    def __init__(self, run: GRPORun):
        self.run = run
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=self.run.cfg.steps, desc=f"GRPO {self.run.out_dir.name}", unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:  # the closing summary (train_runtime, ...) has no reward
            return
        step = state.global_step // args.logging_steps
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        metrics |= {ours: metrics[theirs] for ours, theirs in _ALIASES.items() if theirs in metrics}
        with open(self.run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run.on_step:
            self.run.on_step(step, metrics)
        self.bar.update(1)
        self.bar.set_postfix(acc=f"{metrics.get('accuracy', float('nan')):.2f}",
                             len=f"{metrics.get('response_length', float('nan')):.0f}",
                             kl=f"{metrics.get('kl', float('nan')):.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class GRPORun:
    """GRPO on ``problems`` from ``policy_path`` with a PPO phase's settings; the final policy in ``out_dir/final``.

    Like PPOTrainer, a run that already finished with the same start, data and
    settings is reused; an interrupted one starts again (GRPO keeps no checkpoints here).
    """

    def __init__(
        self,
        *,
        policy_path: str,
        problems: list[Problem],
        out_dir: Path,
        ppo_cfg: PPOConfig,
        loss_type: str,
        model_cfg: ModelConfig,
        prompt_cfg: PromptConfig,
        reward_cfg: RewardConfig,
        grader: Grader,
        device: torch.device,
        on_step: StepCallback | None = None,
    ):
        if not problems:
            raise ValueError("GRPO needs at least one training problem; the problem set is empty")
        self.cfg = ppo_cfg
        self.loss_type = loss_type
        self.policy_path = policy_path
        self.problems = problems
        self.out_dir = Path(out_dir)
        self.model_cfg = model_cfg
        self.prompt_cfg = prompt_cfg
        self.reward_cfg = reward_cfg
        self.grader = grader
        self.device = device
        self.on_step = on_step
        self.run_key = stable_hash({
            "algorithm": "grpo", "loss_type": loss_type, "policy": str(policy_path),
            # ppo.guards belong to the PPO trainer; they change nothing here.
            "problems": problems_hash(problems), "ppo": ppo_cfg.model_dump(mode="json", exclude={"guards"}),
            "reward": reward_cfg.model_dump(), "prompt": prompt_cfg.model_dump(),
        })

    def build(self, trainer_cls: type[GRPOTrainer] = GRPOTrainer, callbacks: list[TrainerCallback] = ()) -> GRPOTrainer:
        """The TRL trainer, ready to ``train()``; ``trainer_cls`` and ``callbacks`` let a benchmark time it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(
            self.policy_path, trust_remote_code=self.model_cfg.trust_remote_code, prompt=self.prompt_cfg
        )
        args = grpo_args(self.cfg, self.out_dir, loss_type=self.loss_type, model_cfg=self.model_cfg,
                         use_cpu=self.device.type == "cpu")
        trainer = trainer_cls(
            model=self.policy_path,
            reward_funcs=paper_reward(self.reward_cfg, self.grader),
            args=args,
            train_dataset=grpo_dataset(self.problems, tokenizer, self.prompt_cfg),
            processing_class=tokenizer,
            callbacks=[_RLStepLog(self), *callbacks],
        )
        trainer.remove_callback(PrinterCallback)  # our callback reports each step instead
        if self.cfg.actor_trainable_layers is not None:
            # Before train(): TRL builds the optimiser there, from the weights that still need grads.
            freeze_all_but_top_layers(trainer.model, self.cfg.actor_trainable_layers,
                                      self.cfg.actor_trainable_parts)
        return trainer

    def finished(self) -> Path | None:
        """The final policy dir if this exact run already completed."""
        final = self.out_dir / "final"
        try:
            state = json.loads((final / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return final if state.get("run_key") == self.run_key and state.get("step") == self.cfg.steps else None

    def train(self) -> Path:
        done = self.finished()
        if done is not None:
            log.info("GRPO already finished in %s; reusing it", done)
            return done
        shutil.rmtree(self.out_dir, ignore_errors=True)
        trainer = self.build()
        trainer.train()
        final = self.out_dir / "final"
        with replaced_dir(final) as tmp:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, safe_serialization=True)
            trainer.processing_class.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.cfg.steps, "run_key": self.run_key}))
        return final
