"""The training config: one YAML file plus ``key=value`` overrides, validated before Ray starts.

The dataclasses below are the schema, one per section; a section another part owns is defined there and
handed to it whole (``rewards.RewardConfig``, ``cost.CostModel``; the engine takes ``rollout.vllm``).
``config_merge`` reads the file and overrides (OmegaConf rejects unknown keys and wrong types); ``validate``
rejects impossible values, one ``validate_<section>`` per section. Every error is a ``ConfigError`` that
names the key path and the bad value, so a typo fails in a second instead of after a cluster has started.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf

from . import colocation, devices, paths
from .config_merge import ConfigError, bad, merge_structured, non_negative, positive
from .algorithms import LENGTH_TERM_ON, AlgorithmConfig, resolve as resolve_algorithm
from .cost import CostModel
from .prompt_hint import check_prompt_hint
from .rewards import RewardConfig  # the reward section: the reward code takes it whole


@dataclass
class TinyModelConfig:
    """Shape of the embedded tiny Qwen2 model (built when ``model.build_if_missing=tiny``)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    seed: int = 0


@dataclass
class ModelConfig:
    # Any local Hugging Face causal-LM directory (save_pretrained layout).
    path: str = MISSING
    # Build a model at path when it holds none (train only; never over another checkpoint): none | tiny (the
    # embedded tiny Qwen2, model.tiny) | standin (the stand-in chat checkpoint, orchestrator/standin_model.py).
    build_if_missing: str = "none"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # auto | float32 | bfloat16 | float16, for the engines, the learner (autocast over fp32 masters), the warm start.
    # auto: bfloat16 on GPUs and CPUs with bf16 instructions, else float32 (devices.py; show-config says why).
    dtype: str = "auto"
    # How a task prompt becomes model input. "{prompt}" is replaced; use chat_template for chat models.
    prompt_template: str = "<s>{prompt}<think>"
    chat_template: bool = False
    think_end: str = "</think>"
    max_model_len: int = 4096


@dataclass
class DataConfig:
    # Either a registered task generator (entry point group "budgetrl.tasks") or a Parquet/JSONL file.
    task: str = "addition"
    path: Optional[str] = None  # train prompts file; overrides the generator when set
    eval_path: Optional[str] = None
    difficulties: list[int] = field(default_factory=lambda: [2, 3, 4])
    train_size: int = 4096
    eval_size: int = 256
    seed: int = 0
    # A prompt whose tokens plus the largest budget exceed model.max_model_len: error (before any work),
    # drop (skip it, counted in the log and the run's tags) or truncate_left (keep its last tokens).
    overlong_prompts: str = "error"


@dataclass(frozen=True)
class Budget:
    """One token budget, the one name for it everywhere (training, eval grid, serving, sweeps): think up to
    ``thinking`` tokens, answer up to ``solution``. ``label`` names it in an eval grid ("16x8",
    "unconstrained"); by default THINKxSOLUTION. Rollout records keep it as budget_thinking/budget_solution."""

    thinking: int
    solution: int
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", f"{self.thinking}x{self.solution}")

    @property
    def total(self) -> int:
        return self.thinking + self.solution


@dataclass
class DrawConfig:
    """A ``mixture`` dimension: ``values`` (``weights``: default equal), an inclusive ``range`` [lo, hi], or neither."""

    values: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    range: list[int] = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of a ``stages`` schedule: ``steps`` steps at this budget (the last stage: to the end)."""

    steps: int = 0
    thinking: int = MISSING
    solution: int = MISSING


@dataclass
class ScheduleConfig:
    """How each prompt of a step gets its budget (orchestrator/budget_schedule.py; docs/elastic.md)."""

    kind: str = "fixed"  # fixed | mixture | stages | curriculum
    thinking: DrawConfig = field(default_factory=DrawConfig)  # mixture
    solution: DrawConfig = field(default_factory=DrawConfig)  # mixture
    stages: list[StageConfig] = field(default_factory=list)  # stages, in order
    # curriculum: "THINKxSOLUTION" budgets, loose to tight; the next once accuracy over ``window`` steps >= threshold
    ladder: list[str] = field(default_factory=list)
    threshold: float = 0.8
    window: int = 4


@dataclass
class BudgetConfig:
    """Elastic Reasoning's separate budgets: think up to ``thinking`` tokens, answer up to ``solution``."""

    thinking: int = 1024
    solution: int = 1024
    # Train on the end-of-thinking marker when the rollout had to force it (Elastic Reasoning keeps it).
    train_forced_think_end: bool = True
    # Per-prompt training budgets (default fixed: every prompt gets thinking x solution).
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The budget told to the model, prepended to the task prompt ("" = off), e.g. "<budget {thinking}>\n";
    # fields {thinking}, {solution}, {total}. Training, the eval grid and serving render it alike.
    prompt_hint: str = ""


@dataclass
class VllmConfig:
    kv_cache_gib: float = 1.0
    # auto: false on GPU (CUDA graphs and compilation), true on CPU (orchestrator/devices.py).
    enforce_eager: bool | str = "auto"
    multiprocess: bool = False  # in-process engine: faster start and weight sync on CPU
    # Fraction of each GPU for the engine. auto: 0.85 with whole GPUs per rollout worker, 0.85 x the share
    # of a fractional one; ignored on CPU (kv_cache_gib sizes the cache there).
    gpu_memory_utilization: float | int | str = "auto"  # int too: OmegaConf does not widen 1 in a union
    # GPUs one engine shards the model over (1 <= it <= rollout.gpus_per_worker; 1 on CPU).
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    # Requests decoded together. 0: vLLM's default on GPU; 1024 on CPU, where vLLM's default (256) splits a
    # 512-sample rollout batch into two waves (docs/performance.md, section 1).
    max_num_seqs: int = 0
    # Enforce the thinking and solution budgets inside one request per sample (a logits processor forces
    # </think> and EOS) instead of a second generate call that re-prefills prompt + thinking.
    budget_forcing: bool = True
    # On CPU, load synced weights by copying, stacking and re-packing each layer in place
    # (orchestrator/rollout/cpu_reload.py) instead of vLLM's layerwise reload_weights; a model the
    # in-place path does not fit (quantized, unknown names) falls back to reload_weights by itself.
    inplace_reload: bool = True


@dataclass
class WeightSyncConfig:
    # How each step's weights reach the engines (docs/performance.md, section 5): object_store (one export through
    # Ray's object store) or collective (learner rank 0 broadcasts over a torch.distributed group per engine: NCCL
    # between GPUs, gloo otherwise; the object store is the fallback for an engine whose group fails). auto:
    # collective when both have GPUs or vLLM runs in its own process, else object_store (devices.py).
    method: str = "auto"
    bucket_mb: float = 64.0  # collective: flat buffers of at most this many MiB, one dtype each (two in flight)
    timeout_s: float = 120.0  # collective: joining a group, and each broadcast, before it counts as failed


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Custom Ray resources per worker, e.g. {rollout_gpu: 1} to land on a cluster's rollout node group.
    resources: dict[str, float] = field(default_factory=dict)
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    colocate: bool | str = "auto"  # the HF engine in learner rank 0's process: auto | true | false (colocation.py)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)


@dataclass
class LearnerConfig:
    num_workers: int = 1  # data-parallel ranks (gloo on CPU, NCCL on GPU)
    strategy: str = "auto"  # auto (fsdp on GPUs, ddp on CPUs) | ddp (replicated, all-reduce) | fsdp (FSDP2 shards)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank, e.g. {learner_gpu: 1}
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 32
    # > 0: a micro-batch also keeps rows x its longest row <= this many tokens (activations and logits
    # grow with it); rows are packed by length. 0: rows only (micro_batch_size).
    micro_batch_tokens: int = 0
    # Recompute each decoder layer in backward: ~1/3 more compute, a fraction of the activations (`plan CONFIG`).
    activation_checkpointing: bool = False
    # torch.compile the learner's forward: auto (where measured to pay: devices.py, show-config) | true | false
    compile: bool | str = "auto"
    lr_warmup_steps: int = 0
    num_threads: int = 0  # 0: leave torch's default
    # Checkpoints and resumable states (weights, optimizer moments) are sharded above this size ("5GB", "1MB").
    max_shard_size: str = "5GB"


@dataclass
class WarmstartConfig:
    """Supervised warm start on the task's reference reasoning before RL (0 steps: skip)."""

    steps: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    train_size: int = 20000
    concise_fraction: float = 0.0
    num_threads: int = 2


@dataclass
class TrainerConfig:
    steps: int = 200
    prompts_per_step: int = 16
    eval_every: int = 0  # 0: evaluate only before and after training
    checkpoint_every: int = 0  # 0: only the final checkpoint
    log_samples_every: int = 10
    # Resumable state (weights, optimizer, RNG, data position) every N steps; 0: never (no resume).
    # MLflow receives a step's metrics once the state covering it is saved (see orchestrator/resume.py).
    state_every: int = 10
    resume: str = "auto"  # auto: continue an unfinished run of the same run_name | never | must
    max_restarts: int = 3  # rollout/learner actors replaced after a crash, per run
    # Seconds to wait for nodes that offer the run's resources: at the start, and when a node holding
    # rollout workers or learner ranks is lost (Ray re-places them on another node that fits). Past it
    # the run stops with an error naming the missing resources; its state stays for a re-run.
    node_wait_s: float = 600.0
    # Stop once this many tokens were generated (training rollouts + a curriculum's previews); 0: no limit.
    # Compares methods at equal generation cost; trainer.steps still caps the run.
    max_generated_tokens: int = 0
    # 1: the rollout workers generate step k+1's samples while the learner updates on step k's (one-step
    # off-policy, as verl's one_step_off_policy): a step costs about max(generate, learn) + sync instead
    # of their sum; the samples are one update behind the policy that learns from them. 0: synchronous.
    off_policy_steps: int = 0
    output_dir: str = "outputs"
    run_name: Optional[str] = None
    seed: int = 0


@dataclass
class EvalConfig:
    # Budget grid as "THINKxSOLUTION" strings, e.g. "16x8"; "unconstrained" uses max_thinking.
    budgets: list[str] = field(default_factory=lambda: ["unconstrained"])
    max_thinking: int = 128
    max_solution: int = 16
    num_prompts: int = 256
    samples_per_prompt: int = 1  # Avg@k
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def unconstrained(self) -> Budget:
        return Budget(self.max_thinking, self.max_solution, "unconstrained")


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite)
    experiment: str = "budgetrl"
    parent_run_id: Optional[str] = None  # nest this run under a sweep's or a pipeline's parent run
    tags: dict[str, str] = field(default_factory=dict)  # extra tags on the run (e.g. a sweep's trial number)
    # MLflow's own system metrics sampler (system/*: CPU, memory, disk, network; GPU with pynvml) on
    # training runs, one sample every system_metrics_interval_s seconds (orchestrator/system_metrics.py).
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS or the job's cluster, else a local runtime
    num_cpus: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cost: CostModel = field(default_factory=CostModel)  # prices for the cost/* metrics of every run


# Short names the CLI accepts on the command line (``eval CONFIG checkpoint=... budgets=...``).
ALIASES = {"checkpoint": "model.path", "budgets": "eval.budgets"}
WEIGHT_SYNC_METHODS = ("auto", "object_store", "collective")

_BUDGET_RE = re.compile(r"^\s*(\d+)\s*[xX:]\s*(\d+)\s*$")


def parse_budget(text: str, cfg: EvalConfig | None, key: str = "eval.budgets") -> Budget:
    """'16x8' -> Budget(16, 8); 'unconstrained' -> the eval's maximum lengths (an eval grid only)."""
    if cfg is not None and text.strip().lower() == "unconstrained":
        return cfg.unconstrained
    m = _BUDGET_RE.match(text)
    if not m:
        also = " or 'unconstrained'" if cfg is not None else ""
        raise ConfigError(f"{key}: {text!r} is not THINKxSOLUTION (e.g. '16x8'){also}")
    budget = Budget(int(m.group(1)), int(m.group(2)))
    if budget.thinking <= 0 or budget.solution <= 0:
        raise ConfigError(f"{key}: {text!r} has a budget <= 0; both budgets must be positive")
    return budget


def largest_train_budget(b: BudgetConfig) -> Budget:
    """The longest (thinking + solution) budget ``budget.schedule`` may give a training prompt."""
    s, budgets = b.schedule, [Budget(b.thinking, b.solution)]
    if s.kind == "stages":
        budgets = [Budget(x.thinking, x.solution) for x in s.stages]
    elif s.kind == "curriculum":
        budgets = [parse_budget(x, None, "budget.schedule.ladder") for x in s.ladder]
    elif s.kind == "mixture":
        budgets = [Budget(max(s.thinking.values or s.thinking.range or [b.thinking]),
                          max(s.solution.values or s.solution.range or [b.solution]))]
    return max(budgets, key=lambda x: x.total)


def resolve_base_config(base: str, workload_config: str | os.PathLike, key: str = "base") -> str:
    """A workload's base training config: as given, else relative to the workload config's folders."""
    p = Path(base)
    if not p.is_absolute() and not p.is_file():
        for root in Path(workload_config).resolve().parents:
            if (root / p).is_file():
                p = root / p
                break
    if not p.is_file():
        raise ConfigError(f"{key}={base!r}: no such training config")
    return str(p)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                check_paths: bool = True) -> Config:
    """YAML file + dotted ``key=value`` overrides -> validated ``Config`` (dataclass instance), with
    every ``auto`` value resolved for the devices the config names.

    ``check_paths=False`` skips the existence checks of model and data paths (for validating a
    cluster config on a machine that does not hold the cluster's files)."""
    return load_config_explained(path, overrides, check_paths=check_paths)[0]


def load_config_explained(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                          check_paths: bool = True) -> tuple[Config, list[devices.Resolution]]:
    """``load_config`` and what each ``auto`` value became, with the reason (``show-config`` prints them)."""
    obj = merge_structured(Config, path, overrides, aliases=ALIASES)
    try:
        paths.resolve_durable_paths(obj)  # inside a Ray job: under $BUDGETRL_HOME
    except paths.DurablePathError as exc:
        raise ConfigError(str(exc)) from None
    validate(obj, check_paths=check_paths)
    obj.algorithm = _algorithm(obj)  # the preset's values filled in: what show-config and MLflow record
    return obj, devices.resolve_auto(obj)


def durable_output(value: str, key: str) -> str:
    """A relative path a command writes, resolved for a Ray job (``ConfigError`` naming ``key`` when it cannot be)."""
    try:
        return paths.output_path(value, key)
    except paths.DurablePathError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Reject impossible values, section by section; messages name the key path and the bad value."""
    validate_model(cfg.model, check_paths)
    validate_budget(cfg.budget)
    validate_rollout(cfg.rollout)
    a = _algorithm(cfg)
    if cfg.rollout.group_size < 2:  # every registered estimator subtracts a group baseline
        bad("rollout.group_size", cfg.rollout.group_size,
            f"algorithm.advantage={a.advantage!r} subtracts a group baseline: it needs at least 2 samples per prompt")
    validate_reward(cfg.reward)
    validate_learner(cfg.learner)
    validate_warmstart(cfg.warmstart)
    validate_trainer(cfg.trainer)
    colocation.check(cfg)
    positive("tracking.system_metrics_interval_s", cfg.tracking.system_metrics_interval_s)
    non_negative("cost.accelerator_hour_price", cfg.cost.accelerator_hour_price)
    non_negative("cost.cpu_hour_price", cfg.cost.cpu_hour_price)
    total = cfg.trainer.prompts_per_step * cfg.rollout.group_size
    if total % a.mini_batches:
        bad("algorithm.mini_batches", a.mini_batches,
            f"must divide the batch of {total} samples (trainer.prompts_per_step x rollout.group_size)")
    validate_data(cfg.data, check_paths)
    validate_eval(cfg.eval)
    longest = max(b.total for b in [largest_train_budget(cfg.budget), *eval_budgets(cfg)])
    if longest >= cfg.model.max_model_len:
        bad("model.max_model_len", cfg.model.max_model_len,
            f"must exceed the longest budget (thinking + solution = {longest}) plus the prompt")


def validate_model(m: ModelConfig, check_paths: bool) -> None:
    if not m.path:
        bad("model.path", m.path, "set it to a Hugging Face model directory")
    if m.build_if_missing not in ("none", "tiny", "standin"):
        bad("model.build_if_missing", m.build_if_missing, "must be one of none, tiny, standin")
    if check_paths and m.build_if_missing == "none" and not Path(m.path).exists():
        bad("model.path", m.path, "no such directory (set model.build_if_missing=tiny to build the tiny model "
            "there, or model.build_if_missing=standin for the stand-in chat model)")
    if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad("model.dtype", m.dtype, "must be one of auto, float32, bfloat16, float16")
    if "{prompt}" not in m.prompt_template and not m.chat_template:
        bad("model.prompt_template", m.prompt_template, "must contain '{prompt}'")
    positive("model.max_model_len", m.max_model_len)


def validate_budget(b: BudgetConfig) -> None:
    positive("budget.thinking", b.thinking)
    positive("budget.solution", b.solution)
    check_prompt_hint("budget.prompt_hint", b.prompt_hint)
    validate_schedule(b.schedule)


def validate_schedule(s: ScheduleConfig) -> None:
    k, kinds = "budget.schedule", ("fixed", "mixture", "stages", "curriculum")  # budget_schedule.SCHEDULES
    if s.kind not in kinds:
        bad(f"{k}.kind", s.kind, f"must be one of {', '.join(kinds)}")
    if s.kind == "mixture":
        for name, d in (("thinking", s.thinking), ("solution", s.solution)):
            _validate_draw(f"{k}.{name}", d)
    if s.kind == "stages":
        if not s.stages:
            bad(f"{k}.stages", s.stages, "list at least one {steps, thinking, solution}")
        for i, st in enumerate(s.stages):
            positive(f"{k}.stages[{i}].thinking", st.thinking)
            positive(f"{k}.stages[{i}].solution", st.solution)
            (non_negative if i == len(s.stages) - 1 else positive)(f"{k}.stages[{i}].steps", st.steps)
    if s.kind == "curriculum":
        if len(s.ladder) < 2:
            bad(f"{k}.ladder", s.ladder, "list at least two budgets, loose to tight (e.g. ['64x16', '16x8'])")
        rungs = [parse_budget(x, None, f"{k}.ladder") for x in s.ladder]
        for a, b in zip(rungs, rungs[1:]):
            if b.thinking > a.thinking or b.solution > a.solution or a == b:
                bad(f"{k}.ladder", s.ladder, f"{b.label} after {a.label}: each budget must be tighter than the last")
        if not 0 < s.threshold <= 1:
            bad(f"{k}.threshold", s.threshold, "must be an accuracy in (0, 1]")
        positive(f"{k}.window", s.window)


def _validate_draw(key: str, d: DrawConfig) -> None:
    if d.values and d.range:
        bad(f"{key}.range", d.range, f"set either {key}.values or {key}.range, not both")
    for i, v in enumerate(d.values):
        positive(f"{key}.values[{i}]", v)
    if d.weights:
        if not d.values or len(d.weights) != len(d.values):
            bad(f"{key}.weights", d.weights, f"needs one weight per entry of {key}.values ({len(d.values)})")
        if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
            bad(f"{key}.weights", d.weights, "weights must be >= 0 with a positive sum")
    if d.range and (len(d.range) != 2 or not 0 < d.range[0] <= d.range[1]):
        bad(f"{key}.range", d.range, "must be [lo, hi] with 0 < lo <= hi")


def validate_rollout(r: RolloutConfig) -> None:
    if r.engine not in ("vllm", "hf"):
        bad("rollout.engine", r.engine, "must be 'vllm' or 'hf'")
    positive("rollout.num_workers", r.num_workers)
    non_negative("rollout.cpus_per_worker", r.cpus_per_worker)
    non_negative("rollout.gpus_per_worker", r.gpus_per_worker)
    non_negative("rollout.temperature", r.temperature)
    if not 0 < r.top_p <= 1:
        bad("rollout.top_p", r.top_p, "must be in (0, 1]")
    positive("rollout.vllm.kv_cache_gib", r.vllm.kv_cache_gib)
    non_negative("rollout.vllm.max_num_seqs", r.vllm.max_num_seqs)
    validate_vllm(r.vllm, "rollout.vllm", r.gpus_per_worker, "rollout.gpus_per_worker")
    if r.weight_sync.method not in WEIGHT_SYNC_METHODS:
        bad("rollout.weight_sync.method", r.weight_sync.method, f"must be one of {', '.join(WEIGHT_SYNC_METHODS)}")
    positive("rollout.weight_sync.bucket_mb", r.weight_sync.bucket_mb)
    positive("rollout.weight_sync.timeout_s", r.weight_sync.timeout_s)


def validate_vllm(v: VllmConfig, prefix: str, gpus: float, gpus_key: str) -> None:
    """The vLLM settings that may be ``auto`` or depend on the GPUs one engine gets (training and serving)."""
    if not (v.enforce_eager == devices.AUTO or isinstance(v.enforce_eager, bool)):
        raise ConfigError(f"{prefix}.enforce_eager={v.enforce_eager!r}: must be true, false or auto")
    g = v.gpu_memory_utilization
    if g != devices.AUTO and (isinstance(g, (bool, str)) or not 0 < g <= 1):
        raise ConfigError(f"{prefix}.gpu_memory_utilization={g!r}: must be auto or a fraction in (0, 1]")
    tp = v.tensor_parallel_size
    if tp < 1:
        raise ConfigError(f"{prefix}.tensor_parallel_size={tp!r}: must be >= 1")
    if tp > gpus and tp > 1:
        raise ConfigError(f"{prefix}.tensor_parallel_size={tp!r}: an engine shards over that many GPUs but gets "
                          f"{gpus_key}={gpus:g}; raise {gpus_key} to {tp} or lower the tensor parallel size")


def validate_reward(r: RewardConfig) -> None:
    positive("reward.timeout_s", r.timeout_s)
    non_negative("reward.num_workers", r.num_workers)
    non_negative("reward.length_penalty", r.length_penalty)
    if r.length_penalty_on not in LENGTH_TERM_ON:
        bad("reward.length_penalty_on", r.length_penalty_on, "must be all or correct")


def _algorithm(cfg: Config) -> AlgorithmConfig:
    """``cfg.algorithm`` with its preset's values filled in and checked (orchestrator/algorithms/presets.py)."""
    longest = largest_train_budget(cfg.budget).total + 1  # the forced end-of-thinking token included
    try:
        return resolve_algorithm(cfg.algorithm, longest_response=longest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate_learner(le: LearnerConfig) -> None:
    positive("learner.num_workers", le.num_workers)
    if le.strategy not in ("auto", "ddp", "fsdp"):
        bad("learner.strategy", le.strategy, "must be auto, ddp or fsdp")
    positive("learner.lr", le.lr)
    positive("learner.micro_batch_size", le.micro_batch_size)
    non_negative("learner.micro_batch_tokens", le.micro_batch_tokens)
    non_negative("learner.num_threads", le.num_threads)
    if not (le.compile == devices.AUTO or isinstance(le.compile, bool)):
        bad("learner.compile", le.compile, "must be true, false or auto")
    if not re.fullmatch(r"[1-9]\d*(KB|MB|GB|TB)", le.max_shard_size):
        bad("learner.max_shard_size", le.max_shard_size, "must be a size such as '5GB' or '1MB' (KB, MB, GB, TB)")


def validate_warmstart(w: WarmstartConfig) -> None:
    non_negative("warmstart.steps", w.steps)
    if w.steps:
        positive("warmstart.batch_size", w.batch_size)
        positive("warmstart.lr", w.lr)
        positive("warmstart.train_size", w.train_size)
    if not 0 <= w.concise_fraction <= 1:
        bad("warmstart.concise_fraction", w.concise_fraction, "must be in [0, 1]")


def validate_trainer(t: TrainerConfig) -> None:
    positive("trainer.prompts_per_step", t.prompts_per_step)
    for key in ("steps", "eval_every", "state_every", "max_restarts", "node_wait_s", "max_generated_tokens"):
        non_negative(f"trainer.{key}", getattr(t, key))
    if t.off_policy_steps not in (0, 1):
        bad("trainer.off_policy_steps", t.off_policy_steps, "must be 0 (synchronous) or 1 (one step ahead)")
    if t.resume not in ("auto", "never", "must"):
        bad("trainer.resume", t.resume, "must be auto, never or must")
    if t.run_name is not None and (not t.run_name or "/" in t.run_name or t.run_name in (".", "..")):
        bad("trainer.run_name", t.run_name, "must be a plain directory name")


def validate_data(d: DataConfig, check_paths: bool) -> None:
    if d.path is None:
        if not d.difficulties:
            bad("data.difficulties", d.difficulties, "must list at least one level")
        positive("data.train_size", d.train_size)
    elif check_paths and not Path(d.path).exists():
        bad("data.path", d.path, "no such file")
    if check_paths and d.eval_path is not None and not Path(d.eval_path).exists():
        bad("data.eval_path", d.eval_path, "no such file")
    positive("data.eval_size", d.eval_size)
    if d.overlong_prompts not in ("error", "drop", "truncate_left"):
        bad("data.overlong_prompts", d.overlong_prompts, "must be error, drop or truncate_left")


def validate_eval(e: EvalConfig) -> None:
    if not e.budgets:
        bad("eval.budgets", e.budgets, "list at least one budget")
    for b in e.budgets:
        parse_budget(b, e)
    positive("eval.max_thinking", e.max_thinking)
    positive("eval.max_solution", e.max_solution)
    positive("eval.num_prompts", e.num_prompts)
    positive("eval.samples_per_prompt", e.samples_per_prompt)
    non_negative("eval.temperature", e.temperature)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for hashing, logging and shipping to actors)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def eval_budgets(cfg: Config) -> list[Budget]:
    return [parse_budget(b, cfg.eval) for b in cfg.eval.budgets]
