"""The pipeline's one typed config.

Every YAML file in configs/ validates against :class:`PipelineConfig`; the CLI
overrides single fields with ``--set ppo.lam=0.95``. Unknown keys and wrong types
are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from concise_rl.config_errors import blame, describe
from concise_rl.errors import ConfigError, did_you_mean


class _Strict(BaseModel):
    # No setting is meaningful at NaN or infinity (a reward of inf poisons every update), so
    # YAML's .nan/.inf and --set x=inf are refused with the other bad input.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class EmbeddedModelConfig(_Strict):
    """Shape and training budget of the small model the project builds itself."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(384, gt=0)
    vocab_size: int = Field(384, ge=64, description="BPE vocabulary size of the built tokenizer")
    max_position_embeddings: int = Field(1024, gt=0)
    sft_examples: int = Field(12000, gt=0, description="chain-of-thought traces to train the base on")
    sft_epochs: float = Field(1.0, gt=0)
    sft_learning_rate: float = Field(1e-3, gt=0)
    sft_batch_size: int = Field(8, gt=0)
    sft_adam_beta2: float = Field(
        0.95, gt=0, lt=1, description="AdamW's beta2 in the base's SFT (0.999 stalled it: docs/log/2026-12-06-sft-recipe.md)"
    )
    sft_weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay in the base's SFT")
    sft_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="precision of the base's SFT: float32, or bfloat16 (autocast over float32 weights; about 9x "
        "slower on a CPU without native bf16)",
    )
    sft_seed: int = Field(0, description="seed of the base's SFT: its data draw, initialisation and batch order")
    # Where the base comes from, not what it is: left out of the base's name (training/models.py).
    use_prebuilt: bool = Field(
        True,
        description="copy the base shipped in training/prebuilt/ when one of this exact config and build code is "
        "there (the demo's), instead of building it; false always builds",
    )


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "embedded:demo",
        description="hub id, local directory, or 'embedded:NAME' for the project's own small model",
    )
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    generation_engine: Literal["auto", "kv", "graph", "hf"] = Field(
        "auto",
        description="sampling engine for rollouts, curation and evaluation: 'kv' is the project's KV-cache "
        "decoder (Qwen2/Llama/Mistral), 'graph' the same with its decode step recorded as CUDA graphs on a GPU "
        "(compiled, slow to start, on a CPU), 'hf' is transformers' generate, 'auto' takes 'kv' where supported",
    )
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()


TEMPLATE_FIELDS = ("question", "instruction")


class PromptConfig(_Strict):
    """How a problem becomes the text the model sees."""

    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    style: Literal["r1", "qwen-math"] = Field(
        "r1",
        description="r1: the instruction follows the question in the user turn (DeepSeek-R1-Distill); "
        "qwen-math: the instruction is the system turn and the question the user turn (Qwen2.5-Math)",
    )
    use_chat_template: bool = True
    template: str | None = Field(
        None,
        description="the text of the user turn, or of the whole prompt when use_chat_template is false, with "
        "{question} and {instruction} filled in. null: the question, a newline and the instruction (style "
        "qwen-math: the question alone, as the instruction is the system turn). The paper's R1 data has "
        "'{question} {instruction}\\n'; its Qwen data is ChatML text written out, used without a chat template",
    )
    max_prompt_tokens: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _template_fields(self) -> PromptConfig:
        if self.template is None:
            return self
        if "{question}" not in self.template:
            raise ValueError(f"template {self.template!r} has no {{question}}; the problem must go somewhere")
        unknown = sorted(set(re.findall(r"\{(\w+)\}", self.template)) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(
                f"template {self.template!r} names {', '.join('{' + u + '}' for u in unknown)}; "
                f"it can fill in only {{question}} and {{instruction}}"
            )
        return self


class RewardConfig(_Strict):
    """The paper's reward: no term in it depends on length."""

    correct: float = 1.0
    wrong_boxed: float = -0.5
    no_box: float = -1.0


class DataSource(_Strict):
    """Where problems come from: a local file, a hub dataset, or the built-in task."""

    kind: Literal["synthetic", "file", "hf", "benchmark"] = Field(
        "synthetic",
        description="synthetic: the built-in task; file: a .jsonl/.json at 'path'; hf: hub dataset 'name'; "
        "benchmark: a named benchmark (math500, aime24, amc23, mmlu_stem, gsm8k, minerva_math, olympiadbench) "
        "from the directory 'path' (or $CONCISE_RL_BENCHMARK_DIR), else from the hub",
    )
    path: str | None = None
    name: str | None = None
    split: str = "test"
    limit: int | None = Field(None, gt=0)
    few_shot: int = Field(0, ge=0, description="benchmark mmlu_stem: solved questions of the same subject in the prompt")
    # Synthetic task: how many problems, which seed, which difficulty levels.
    num_problems: int = Field(200, gt=0)
    seed: int = 0
    min_level: int = Field(1, ge=1)
    max_level: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _needs_location(self) -> DataSource:
        if self.kind == "file" and not self.path:
            raise ValueError("kind 'file' needs 'path' (a .jsonl or .json file)")
        if self.kind == "hf" and not self.name:
            raise ValueError("kind 'hf' needs 'name' (a Hugging Face dataset id)")
        if self.kind == "benchmark":
            from concise_rl.benchmarks import BENCHMARKS

            if self.name not in BENCHMARKS:
                raise ValueError(
                    f"kind 'benchmark' needs 'name', one of {', '.join(BENCHMARKS)}; got {self.name!r}"
                    f"{did_you_mean(self.name or '', BENCHMARKS)}"
                )
            if self.few_shot and BENCHMARKS[self.name].kind != "choice":
                raise ValueError(f"few_shot applies to multiple-choice benchmarks (mmlu_stem), not {self.name!r}")
        if self.min_level > self.max_level:
            raise ValueError(f"min_level {self.min_level} is above max_level {self.max_level}")
        return self


class Band(_Strict):
    """A closed interval of pass rates."""

    low: float = Field(ge=0.0, le=1.0)
    high: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.low > self.high:
            raise ValueError(f"band low {self.low} is above high {self.high}")
        return self

    def contains(self, p: float) -> bool:
        return self.low <= p <= self.high


class CurationConfig(_Strict):
    candidates: DataSource = DataSource()
    samples_per_problem: int = Field(8, gt=0, description="k responses per candidate to estimate its pass rate")
    temperature: float = Field(0.6, ge=0.0)
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(64, gt=0)
    phase1_band: Band = Band(low=0.0, high=0.5)
    phase1_max_problems: int | None = Field(None, gt=0)
    phase2_band: Band = Band(low=0.125, high=0.875)
    phase2_num_problems: int = Field(8, gt=0)


class GuardConfig(_Strict):
    """When a PPO phase stops itself instead of training on (training/guards.py).

    A NaN or infinite reward, loss or gradient norm always stops the phase at the
    step it appears (no setting: such a step has already corrupted the weights in
    memory). The two guards below watch a trend over consecutive steps; null turns
    one off. A stopped phase keeps its last checkpoint, writes ``stopped.json`` and
    is never registered or promoted. The guards change nothing while they do not
    trip, so they are left out of the key that decides whether a checkpoint can be
    resumed: loosen one and the same command resumes from the kept checkpoint.

    The defaults sit far from what healthy runs show. The demo's truncation rate
    stays at or below 0.12 in phase 1 and 0.03 in phase 2 (64 responses a step), and
    no step of either phase is without a correct response (phase-1 accuracy >= 0.28).
    """

    max_truncation_rate: float | None = Field(
        0.5, gt=0.0, lt=1.0,
        description="runaway length: stop when more than this fraction of a step's responses hit ppo.max_new_tokens "
        "for truncation_patience steps in a row (null: off)",
    )
    truncation_patience: int = Field(5, gt=0, description="consecutive steps above max_truncation_rate that stop")
    reward_collapse_patience: int | None = Field(
        10, gt=0,
        description="collapsed rewards: stop when no response of a step is correct (every reward a penalty) for "
        "this many steps in a row (null: off)",
    )


class PPOConfig(_Strict):
    """PPO with a learned critic, as in the paper's public code."""

    steps: int = Field(150, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    samples_per_prompt: int = Field(8, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    mini_batch_size: int = Field(64, gt=0, description="rollouts per optimiser step")
    micro_batch_size: int = Field(16, gt=0, description="rollouts per forward/backward (gradient accumulation)")
    micro_batch_tokens: int | None = Field(
        None, gt=0,
        description="also cap a micro-batch at this many padded tokens (rows x their longest prompt + response): "
        "rows are grouped by length, so short responses are not padded to the longest of the mini-batch",
    )
    temperature: float = Field(0.6, gt=0.0, description="sampling temperature of the rollouts")
    logprob_temperature: float | None = Field(
        None, gt=0.0,
        description="temperature the old, reference and new log-probs are scored at; null (the default): the "
        "sampling temperature, so the importance ratio is against the distribution the rollouts came from. "
        "1.0 reproduces the paper's code, which sampled at 0.6 (vLLM) but scored raw logits",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, gt=0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0)
    value_clip_range: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(0.01, ge=0.0)
    advantage_norm: Literal["whiten", "scale", "none"] = Field(
        "whiten",
        description="how advantages are normalised over the step's tokens: 'whiten' to zero mean and unit "
        "variance (OpenRLHF, the paper's code); 'scale' divides by the standard deviation only, so every "
        "advantage keeps its sign; 'none' leaves GAE's values as they are",
    )
    actor_trainable_layers: int | None = Field(
        None,
        ge=1,
        description="train only the policy's top N decoder layers, its final norm and (when not tied to "
        "the embeddings) its output head; the embeddings and lower layers stay frozen. None trains every "
        "weight, as the paper did. Phase 2 fits a handful of problems, and on a small model updating every "
        "layer overwrites skills that other problems need (docs/log/2026-11-27-recheck-base.md)",
    )
    actor_trainable_parts: Literal["all", "mlp"] = Field(
        "all",
        description="which parts of the top actor_trainable_layers train: 'all', or 'mlp' (their "
        "feed-forward blocks and the norms before them, attention frozen). Needs actor_trainable_layers",
    )
    loss_agg_mode: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    rollout_logprobs: Literal["auto", "reuse", "recompute"] = Field(
        "auto",
        description="old log-probs for the PPO ratio: 'reuse' takes them from the KV engine's sampling pass "
        "(saves a forward), 'recompute' runs the training forward; 'auto' reuses them in float32 only, "
        "where the two agree to ~1e-5 (in bf16 they differ enough to bias the ratio)",
    )
    vf_coef: float = Field(1.0, gt=0.0)
    actor_lr: float = Field(5e-7, gt=0.0)
    critic_lr: float = Field(9e-6, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    checkpoint_every: int = Field(10, gt=0)
    preempt_grace_s: float = Field(
        20.0, gt=0.0, description="the time a SIGTERM or SIGINT gives the run to checkpoint its last completed step "
        "and stop (training/preempt.py); a stop that takes longer says so, to lengthen the job's grace period")
    seed: int = 0
    guards: GuardConfig = GuardConfig()

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOConfig:
        rollouts = self.prompts_per_step * self.samples_per_prompt
        if rollouts % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size {self.mini_batch_size} must divide the {rollouts} rollouts per step "
                f"(prompts_per_step x samples_per_prompt)"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide mini_batch_size {self.mini_batch_size}"
            )
        if self.actor_trainable_parts != "all" and self.actor_trainable_layers is None:
            raise ValueError(
                f"actor_trainable_parts {self.actor_trainable_parts!r} chooses parts of the top "
                "actor_trainable_layers, which is unset; set actor_trainable_layers (e.g. 1) or leave "
                "actor_trainable_parts at 'all'"
            )
        return self


class PhaseConfig(_Strict):
    """What one RL phase overrides on top of the shared PPO settings."""

    ppo: dict[str, Any] = Field(default_factory=dict, description="fields of 'ppo' to override for this phase")


class Phase1Config(PhaseConfig):
    enabled: bool = Field(True, description="false: phase 2 starts from the base (the paper's own setting)")


class EvalConfig(_Strict):
    heldout: DataSource | None = Field(
        DataSource(num_problems=500, seed=1), description="the main evaluation set (null: only 'benchmarks')"
    )
    benchmarks: dict[str, DataSource] = Field(
        default_factory=dict, description="extra named sets evaluated next to the held-out set"
    )
    temperatures: list[float] = Field(default_factory=lambda: [0.0, 0.6])
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    samples: int = Field(1, gt=0, description="responses per problem at temperature > 0")
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(128, gt=0)
    bootstrap_samples: int = Field(1000, gt=0)

    @model_validator(mode="after")
    def _temps(self) -> EvalConfig:
        if not self.temperatures:
            raise ValueError("temperatures must list at least one temperature")
        if any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}")
        if self.heldout is None and not self.benchmarks:
            raise ValueError("nothing to evaluate: heldout is null and benchmarks is empty")
        return self


class GateConfig(_Strict):
    """Promotion gate: phase 2 against the model it started from (evaluation/gate.py)."""

    max_accuracy_drop: float = Field(
        0.02, ge=0.0, le=1.0,
        description="delta, as a fraction (0.02 = 2 points): the lower CI bound of the paired accuracy change "
        "(candidate - parent) must be at least -delta",
    )
    min_length_reduction_pct: float = Field(20.0, ge=-100.0, le=100.0, description="r, in percent")
    sets: list[str] | None = Field(
        None, description="evaluated sets the gate judges (default: all); the others are reported only"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the paired bootstrap CI")
    bootstrap_samples: int = Field(2000, gt=0, description="bootstrap resamples of the paired difference")
    seed: int = 0


class GraderConfig(_Strict):
    """The answer grader behind rewards, curation and evaluation (math-verify in worker processes)."""

    workers: int | None = Field(
        None, ge=0, description="grading processes (default: min(4, CPUs)); 0 grades in-process with no hard timeout"
    )
    timeout_s: float = Field(5.0, gt=0, description="per-answer time limit; an answer that takes longer is wrong")


class RegistryConfig(_Strict):
    model_name: str = Field(
        "concise-rl-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="letters, digits, '.', '_' and '-', starting with a letter or digit: it names folders and store "
        "keys (checkpoints/MODEL/, locks/MODEL.lock), so it cannot hold a path",
    )
    experiment: str = Field("concise-rl", min_length=1)
    tracking_uri: str | None = Field(None, description="default: sqlite store under CONCISE_RL_HOME")


class LaunchConfig(_Strict):
    """How the flow runs its PPO stages (tasks/launch.py): in its own process, or as an
    ``accelerate launch`` child job of ``num_processes`` processes (data parallel, or DeepSpeed
    ZeRO through ``config_file``)."""

    num_processes: int = Field(
        1, ge=1, description="processes per PPO stage; above 1 the flow runs each as an `accelerate launch` child job"
    )
    config_file: str | None = Field(
        None,
        description="accelerate config file for the child job (infra/accelerate/cpu.yaml, deepspeed-zero3.yaml, ...); "
        "its num_processes is overridden by launch.num_processes",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="more `accelerate launch` arguments, e.g. [--num_machines, '2', --machine_rank, '0', "
        "--main_process_ip, 10.0.0.1, --main_process_port, '29500'] for several nodes (docs/gpu-and-distributed.md)",
    )
    stop_grace_s: float = Field(
        20.0, gt=0, description="seconds the child job gets to exit after SIGTERM (a cancelled flow run) before SIGKILL"
    )


class StoreConfig(_Strict):
    """Where registered checkpoints and evaluation outputs are copied (concise_rl/store.py).

    Credentials are never part of the config: for s3:// they come from boto3's usual
    chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config and
    credentials, an instance role).
    """

    uri: str | None = Field(
        None,
        description="a local directory (or file:// URI) or s3://BUCKET/PREFIX; default: <CONCISE_RL_HOME>/store",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, rclone, ...), e.g. http://127.0.0.1:9000; "
        "default: AWS. Custom endpoints use path-style addressing",
    )
    region: str | None = Field(None, description="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config)")
    multipart_threshold_mb: int = Field(64, ge=1, description="files at least this large upload in parts")
    multipart_chunk_mb: int = Field(
        64, ge=5, description="size of one part of a multipart upload (S3's minimum part size is 5 MB)"
    )
    max_concurrency: int = Field(4, ge=1, description="parallel part transfers per file")
    max_attempts: int = Field(
        5, ge=1, description="tries per file transfer on connection errors, with exponential backoff between them",
    )
    retry_base_s: float = Field(
        1.0, gt=0, description="backoff before the second try; it doubles each try, capped at 30 s",
    )
    timeout_s: float = Field(60.0, gt=0, description="connect and read timeout of one S3 request")
    mirror_checkpoints: bool | None = Field(
        None, description="copy every PPO checkpoint (the resume state) to the store as well, so that a run "
        "restarted on another machine resumes from it; default: on for s3://, off for a local store (the "
        "checkpoints are already on this disk)",
    )

    @model_validator(mode="after")
    def _scheme(self) -> StoreConfig:
        uri = self.uri or ""
        if "://" in uri and not uri.startswith(("s3://", "file://")):
            raise ValueError(f"uri {uri!r}: use a local directory, file:///PATH or s3://BUCKET/PREFIX")
        if uri.startswith("s3://") and not uri[len("s3://"):].split("/")[0]:
            raise ValueError(f"uri {uri!r} names no bucket: use s3://BUCKET/PREFIX")
        if not uri.startswith("s3://") and (self.endpoint_url or self.region):
            raise ValueError("endpoint_url and region apply to an s3:// uri only; set uri: s3://BUCKET/PREFIX")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {self.endpoint_url!r} must start with http:// or https://")
        return self


class PipelineConfig(_Strict):
    name: str = "demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    reward: RewardConfig = RewardConfig()
    grader: GraderConfig = GraderConfig()
    curation: CurationConfig = CurationConfig()
    ppo: PPOConfig = PPOConfig()
    phase1: Phase1Config = Phase1Config()
    phase2: PhaseConfig = PhaseConfig()
    evaluation: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    store: StoreConfig = StoreConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _phase_overrides_valid(self) -> PipelineConfig:
        for phase in ("phase1", "phase2"):
            self.ppo_for(phase)
        return self

    def ppo_for(self, phase: Literal["phase1", "phase2"]) -> PPOConfig:
        """The shared PPO settings with this phase's overrides applied and validated."""
        overrides = getattr(self, phase).ppo
        shared = self.ppo.model_dump()
        # A nested section (guards) is merged key by key, so `phase2.ppo.guards.X` changes X alone.
        merged = {**shared, **{k: {**shared[k], **v} if isinstance(v, dict) and isinstance(shared.get(k), dict) else v
                               for k, v in overrides.items()}}
        try:
            return PPOConfig.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(f"{phase}.ppo: {describe(exc, prefix=f'{phase}.ppo', root=PPOConfig)}") from None

    def loggable(self) -> dict[str, Any]:
        """The config as JSON-able data with any user:password part of its URLs removed (MLflow params)."""
        data = self.model_dump(mode="json")
        for section, key in (("store", "endpoint_url"), ("store", "uri"), ("registry", "tracking_uri")):
            if data[section][key]:
                data[section][key] = redact_url(data[section][key])
        return data

    def config_hash(self) -> str:
        """A short stable hash of the whole config (the registry's `config_hash` tag).

        ``store`` and ``launch`` are left out: where copies are kept and how many processes
        train do not change what is trained (a run on N processes registers the same lineage).
        """
        return stable_hash(self.model_dump(mode="json", exclude={"store", "launch"}))


def redact_url(url: str) -> str:
    """``url`` without the user:password part of its authority, should it have one."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
    return url


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """Read an override value as YAML so `--set a=0.5`, `=true`, `=[0, 0.6]` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. --set ppo.lam=0.95")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: the key is empty")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML config (or the defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, e.g. configs/demo.yaml")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(loaded).__name__}")
        data = loaded
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(blame(exc, path, overrides, PipelineConfig)) from None
