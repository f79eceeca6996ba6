"""Throughput of one full RL step: our PPO against TRL's GRPOTrainer, same model and batch.

One RL step is a rollout (sample P x S completions, score them, run the extra
forwards the algorithm needs) followed by the update (forward/backward and an
optimiser step). Both engines run in this one process on the same model
directory, tokenizer, chat-formatted prompts, reward, batch (P prompts x S
samples per optimiser step), completion budget and temperature (0.6). Each runs
one untimed warm-up step and then ``--repeats`` timed steps.

The unit is generated tokens per second of step wall time: the number of
completion tokens sampled in a step (EOS included) divided by the time of the
whole step. It charges each engine for everything it does per step, and it is
fair across engines whose responses differ in length, which a per-step or
per-sample time is not (a step of shorter responses is cheaper regardless of the
engine).

What the steps do differs, so the ratio is of two recipes, not two implementations
of one: our PPO's rollout also runs the reference policy (KL penalty) and the
critic, and its update backpropagates through policy and critic; GRPO has no
critic, and with ``beta`` > 0 it runs a reference forward in the rollout.

    python -m bench.throughput [--model DIR] [--prompts 8] [--samples 8] [--max-new-tokens 256] [--repeats 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from bench.mechanism import tiny_random_model
from concise_rl import paths
from concise_rl.config import ModelConfig, PPOConfig, PromptConfig, RewardConfig
from concise_rl.grader import Grader
from concise_rl.problems import Problem
from concise_rl.synthetic import generate_problems
from concise_rl.training.grpo import GRPORun
from concise_rl.training.trainer import PPOTrainer

TEMPERATURE = 0.6
KL_COEF = 0.01  # our PPOConfig default; GRPO's beta is set to match, so both run a reference forward


@dataclass
class Result:
    engine: str
    rollouts_per_step: int
    generated_tokens_per_step: float
    step_time_s: float
    rollout_time_s: float
    update_time_s: float | None
    tokens_per_s: float
    timed_steps: int


def summarise(engine: str, rollouts: int, tokens: list[int], rollout_s: list[float], step_s: list[float],
              update_s: list[float] | None) -> Result:
    """Means over the timed steps; tokens/s is total tokens over total time."""
    return Result(
        engine=engine,
        rollouts_per_step=rollouts,
        generated_tokens_per_step=statistics.mean(tokens),
        step_time_s=statistics.mean(step_s),
        rollout_time_s=statistics.mean(rollout_s),
        update_time_s=statistics.mean(update_s) if update_s is not None else None,
        tokens_per_s=sum(tokens) / sum(step_s),
        timed_steps=len(step_s),
    )


# ----------------------------------------------------------------- our PPO
def step_config(prompts: int, samples: int, max_new: int, repeats: int) -> PPOConfig:
    """One optimiser step per RL step of P x S rollouts; GRPO takes the same settings (concise_rl.training.grpo.grpo_args)."""
    return PPOConfig(
        steps=1 + repeats, prompts_per_step=prompts, samples_per_prompt=samples, mini_batch_size=prompts * samples,
        micro_batch_size=prompts * samples, max_new_tokens=max_new, temperature=TEMPERATURE, kl_coef=KL_COEF,
    )


def bench_ppo(model: Path, problems: list[Problem], samples: int, max_new: int, repeats: int, work: Path,
              micro_batch_tokens: int | None = None) -> Result:
    prompts = len(problems)
    cfg = step_config(prompts, samples, max_new, repeats).model_copy(update={"micro_batch_tokens": micro_batch_tokens})
    trainer = PPOTrainer(
        policy_path=str(model), problems=problems, out_dir=work / "ppo", ppo_cfg=cfg, model_cfg=ModelConfig(),
        prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), grader=Grader(),
    )
    trainer.setup()
    tokens, rollout_s, update_s = [], [], []
    for step in range(1 + repeats):
        torch.manual_seed(trainer.step_seed(step))
        t0 = time.perf_counter()
        rollout, metrics = trainer.rollout(step)
        t1 = time.perf_counter()
        trainer.update(rollout)
        t2 = time.perf_counter()
        if step:  # step 0 is the warm-up
            tokens.append(int(metrics["generated_tokens"]))
            rollout_s.append(t1 - t0)
            update_s.append(t2 - t1)
    step_s = [r + u for r, u in zip(rollout_s, update_s)]
    return summarise("ours (PPO)", prompts * samples, tokens, rollout_s, step_s, update_s)


# ----------------------------------------------------------------- TRL GRPO
class _StepTimer(TrainerCallback):
    """Wall time of each optimiser step, generation included (it runs inside ``training_step``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


class _TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records how long each rollout (generate, score, extra forwards) takes and its tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rollout_times: list[float] = []
        self.rollout_tokens: list[int] = []

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.rollout_times.append(time.perf_counter() - t0)
        self.rollout_tokens.append(int(out["completion_mask"].sum()))
        return out


def bench_grpo(model: Path, problems: list[Problem], samples: int, max_new: int, repeats: int, work: Path) -> Result:
    """TRL's GRPOTrainer (its default loss, dapo) set up as concise_rl.training.grpo sets it up for `concise-rl ablate`."""
    prompts = len(problems)
    run = GRPORun(
        policy_path=str(model), problems=problems, out_dir=work / "grpo",
        ppo_cfg=step_config(prompts, samples, max_new, repeats), loss_type="dapo", model_cfg=ModelConfig(),
        prompt_cfg=PromptConfig(), reward_cfg=RewardConfig(), grader=Grader(), device=torch.device("cpu"),
    )
    timer = _StepTimer()
    trainer = run.build(_TimedGRPOTrainer, callbacks=[timer])
    trainer.train()
    counts = {len(timer.times), len(trainer.rollout_times), len(trainer.rollout_tokens)}
    if counts != {1 + repeats}:
        raise RuntimeError(f"expected {1 + repeats} GRPO steps, each with one rollout; timed {counts}")
    step_s, rollout_s = timer.times[1:], trainer.rollout_times[1:]
    return summarise("TRL GRPOTrainer", prompts * samples, trainer.rollout_tokens[1:], rollout_s, step_s, None)


# ----------------------------------------------------------------- main
def default_model(work: Path) -> tuple[Path, str]:
    """The newest embedded demo model, or else a tiny random Qwen2 built in ``work``."""
    demos = sorted(paths.models().glob("embedded-demo-*/config.json"), key=lambda p: p.stat().st_mtime)
    if demos:
        return demos[-1].parent, "embedded demo model"
    return tiny_random_model(work / "tiny-random"), "tiny random model (no embedded demo model found)"


def print_table(results: list[Result]) -> None:
    head = f"{'engine':<16} {'rollouts/step':>13} {'gen tok/step':>12} {'step s':>8} {'rollout s':>9} " \
           f"{'update s':>8} {'tok/s':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        update = f"{r.update_time_s:.2f}" if r.update_time_s is not None else "-"
        print(f"{r.engine:<16} {r.rollouts_per_step:>13} {r.generated_tokens_per_step:>12.1f} {r.step_time_s:>8.2f} "
              f"{r.rollout_time_s:>9.2f} {update:>8} {r.tokens_per_s:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: newest embedded demo, else tiny random)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (S)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion budget (N)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="our PPO's ppo.micro_batch_tokens (length-grouped micro-batches; default: off, one "
                        "micro-batch of P x S rows like GRPO's)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        work = Path(tmp)
        model, origin = (args.model, "--model") if args.model else default_model(work)
        problems = generate_problems(args.prompts, seed=0, min_level=2, max_level=8)
        print(f"model: {model} ({origin}); P={args.prompts} S={args.samples} N={args.max_new_tokens} "
              f"T={TEMPERATURE}; {args.repeats} timed step(s) after 1 warm-up; torch threads={torch.get_num_threads()}")
        bench = (args.samples, args.max_new_tokens, args.repeats, work)
        results = [bench_ppo(model, problems, *bench, micro_batch_tokens=args.micro_batch_tokens),
                   bench_grpo(model, problems, *bench)]

    print()
    print_table(results)
    print(f"\nratio ours / TRL (tokens/s): {results[0].tokens_per_s / results[1].tokens_per_s:.2f}")
    for r in results:
        print(json.dumps({**asdict(r), "model": str(model), "max_new_tokens": args.max_new_tokens}))


if __name__ == "__main__":
    main()
