"""The long help texts of `concise-rl` and its commands: what each does, writes and exits with, and examples.

The commands themselves (their options and what they run) are in concise_rl/cli.py.
"""

DESCRIPTION = """\
Two-phase PPO post-training that makes a reasoning model concise without losing
accuracy (Fatemi et al., "Concise Reasoning via Reinforcement Learning").

  run        the whole Prefect flow: base -> curate -> phase 1 -> register ->
             phase 2 -> register -> evaluate -> gate/promote
  curate     measure pass rates and pick the phase-1 and phase-2 problem sets
  train      one PPO phase (--phase 1 or 2), then register the result
  evaluate   evaluate models on the held-out sets or named benchmarks, with a report
  compare    the gate's verdict for one model against another
  promote    gate the phase-2 candidate against its parent and move 'champion'
  ablate     phase 2 side by side: lambda, loss aggregation, GRPO, pass-rate bands
  grade      grade a JSONL file of responses with the project's grader
  deploy     apply the Prefect deployments of infra/prefect.yaml (and their work pool)
  retrain    trigger a deployment run (CI: --param git_sha=$GITHUB_SHA --wait)
  models     list the registered versions: aliases, lineage, gate verdict, figures

State lives under ./.concise-rl (or $CONCISE_RL_HOME): mlflow.db, mlartifacts/,
checkpoints/phase1|phase2, curation/, evaluations/, reports/latest/summary.json.
"""


EPILOG = """\
examples:
  concise-rl run --config configs/demo.yaml
  concise-rl run --config configs/demo.yaml --set ppo.lam=1.0 --set phase2.ppo.steps=20
  concise-rl train --phase 2 --config configs/demo.yaml --model models:/concise-rl-demo@phase1
  concise-rl evaluate --config configs/demo.yaml
  concise-rl ablate --config configs/demo.yaml --variants ppo-lam1.0-seq-mean-token-mean,grpo-dapo
  concise-rl grade responses.jsonl -o graded.jsonl --response-field response --answer-field answer
  PREFECT_API_URL=http://127.0.0.1:4200/api concise-rl deploy --pool gpu
  PREFECT_API_URL=http://127.0.0.1:4200/api concise-rl retrain --deployment retrain --param git_sha=abc123 --wait

exit codes: 0 ok, 1 error, 2 bad input (the message names it), 3 gate failed,
4 another pipeline is running against the same registered model, 5 a training
guard stopped a PPO phase (nothing registered or promoted; the message says why),
143 / 130 SIGTERM / SIGINT stopped a PPO phase once its last completed step was
checkpointed (run the same command to resume)
"""


ABLATE_DESCRIPTION = """\
Run phase 2 side by side under other settings, every variant from the model phase 2
starts from (alias 'phase1', or 'base' when phase1.enabled is false) with the config's
phase-2 PPO settings, and evaluate each on the held-out set next to that model.

variants (--variants, comma-separated; default: all of them):
  ppo-lam{L}-{AGG}   our PPO with GAE lambda L and loss aggregation AGG, on the curated
                     phase-2 set; the defaults are L in {0.95, 1.0} x AGG in
                     {seq-mean-token-mean (the paper's), token-mean, seq-mean-token-sum-norm}
  grpo-{LOSS}        TRL's GRPOTrainer with loss_type LOSS in {grpo, dr_grpo, dapo, bnpo}:
                     same problems, reward, prompts, steps, prompts x samples per step,
                     temperature, max new tokens, actor learning rate and KL weight (beta)
  band-{LOW}-{HIGH}  our PPO on curation.phase2_num_problems problems drawn from the
                     curated pass-rate band [LOW, HIGH] (the paper's difficulty study);
                     the default bands are --bands; a band with too few problems uses
                     what it has, an empty one is skipped, both noted in the table
  logprob-t{T}       our PPO with the old, reference and new log-probs scored at
                     temperature T (ppo.logprob_temperature) instead of the sampling one;
                     the default is logprob-t1.0, the paper's code's objective

Writes ablation.md, ablation.json and ablation.png (accuracy against length reduction)
to the output folder, prints the table and logs it as one MLflow run (stage 'ablate').
Each variant has its own subfolder; a re-run skips the variants already done with the
same settings; an interrupted PPO variant resumes from its last checkpoint, a GRPO
one starts over. Needs a curation and the phase-1 model: run `concise-rl run` first
(or `concise-rl curate` and `concise-rl train --phase 1`).
"""


ABLATE_EPILOG = """\
examples:
  concise-rl ablate --config configs/demo.yaml
  concise-rl ablate --config configs/demo.yaml --steps 2 --eval-problems 50 --variants ppo-lam0.95-token-mean,grpo-dr_grpo
  concise-rl ablate --config configs/demo.yaml --variants band-0.125-0.375,band-0.625-0.875
"""


GRADE_DESCRIPTION = """\
Grade every response in a JSONL file with the grader that training and evaluation
use: the last \\boxed{...} of the response against the reference answer, decided by
math-verify (LaTeX only; model text is never run as Python) in worker processes with
a per-answer time limit. Each row gains three fields:

  correct    true/false
  extracted  the boxed answer, or null when there is none
  reason     why: exact match, equal integers, equivalent, not equivalent,
             no \\boxed{} answer, grading took longer than the limit, ...

A response field holding a list of strings (several samples per row) gets a list
in each of the three fields.
"""


GRADE_EPILOG = """\
examples:
  concise-rl grade responses.jsonl -o graded.jsonl
  concise-rl grade math_cot_50_dev.jsonl -o graded.jsonl --response-field code --answer-field gt --label-field score
"""


EVALUATE_DESCRIPTION = """\
Accuracy (pass@1 over --samples responses per problem, with a 95% bootstrap CI over
problems), mean and median response length in tokens for all, correct and incorrect
responses, and the truncation rate, per set and temperature, plus the macro average.

Sets: the config's evaluation.heldout and evaluation.benchmarks, or with --benchmarks
the named ones (math500, aime24, amc23, mmlu_stem, gsm8k, minerva_math,
olympiadbench) from --data-dir, $CONCISE_RL_BENCHMARK_DIR, or the Hugging Face hub.

Writes, under the concise-rl home: evaluations/<model>-<key>/responses.jsonl (every
response with its grade) and summary.json, cached per model and settings, and
evaluations/reports/<key>/report.md with accuracy_vs_length.png and
length_histograms.png; all of it is logged to MLflow (stage 'evaluate').
"""


EVALUATE_EPILOG = """\
examples:
  concise-rl evaluate --config configs/demo.yaml
  concise-rl evaluate --config configs/demo.yaml --model models:/concise-rl-demo@champion \\
      --benchmarks math500,aime24,amc23,mmlu_stem --few-shot 0 --data-dir ../shared/data/benchmarks \\
      --limit 50 --temperatures 0,0.6 --samples 4 --set prompt.max_prompt_tokens=832 \\
      --set evaluation.max_new_tokens=192
      (the embedded model: 1,024 positions, about 0% on real benchmarks; docs/command-line.md)
  concise-rl evaluate --model old=models:/concise-rl-demo/2 --model new=models:/concise-rl-demo/3
"""


COMPARE_DESCRIPTION = """\
Evaluate two models on the same problems (cached like `evaluate`) and print the
promotion gate's verdict for B against A: for every set and temperature, accuracy
is non-inferior when the lower bound of the paired bootstrap CI of (B - A) per-problem
pass@1 is at least -gate.max_accuracy_drop, and B's mean length is at least
gate.min_length_reduction_pct shorter. Exits 0 when every criterion passes, 3 when
one fails. Takes the same set options as `evaluate`.

example:
  concise-rl compare models:/concise-rl-demo@phase1 models:/concise-rl-demo@candidate --config configs/demo.yaml
"""


MODELS_DESCRIPTION = """\
List every registered version of the config's model (registry.model_name) in its
tracking store (registry.tracking_uri: the local sqlite store by default, or an MLflow
server such as http://HOST:PORT): aliases, phase, parent version, creation time (UTC),
gate verdict, and for a promoted version its figures per set and temperature:
accuracy, its paired change against the parent with the 95% CI (points), mean
length and the length reduction against the parent.
"""
