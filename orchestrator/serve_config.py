"""The serving config: ``ServeConfig`` (schema) and its validation, done before Ray starts.

One YAML file (optional) plus ``key=value`` overrides plus the served target. Every error is a
``ConfigError`` naming the key and value. Values left unset are filled from the checkpoint: the
context window from its ``config.json``, the budget limits from that context.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from . import devices, registry
from .config import Budget, RayConfig, VllmConfig, validate_vllm
from .config_merge import ConfigError, bad, merge_structured, non_negative, positive
from .prompt_hint import check_prompt_hint

# The context of a model whose config.json names a longer one, unless model.max_model_len says otherwise:
# vLLM reserves KV cache for one full-length sequence, so a 128k-context model would not start by default.
DEFAULT_MAX_MODEL_LEN = 4096
# config.json keys that hold a model's context length, the usual one first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass
class ServeModelConfig:
    # A local Hugging Face directory, or models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH.
    path: str = MISSING
    name: Optional[str] = None  # the name clients put in "model"; default: model.path as given
    aliases: list[str] = field(default_factory=list)  # other accepted "model" values (filled in)
    tracking_uri: Optional[str] = None  # MLflow store of registry URIs; default MLFLOW_TRACKING_URI, ./mlflow.db
    cache_dir: Optional[str] = None  # where registry models are downloaded; default ~/.cache/budgetrl/models
    engine: str = "vllm"  # vllm | hf
    dtype: str = "auto"  # auto: bfloat16 on GPUs and CPUs with bf16 instructions, else float32 (as training's)
    # Context window: prompt + thinking + </think> + solution. Unset: the checkpoint's (config.json), at most
    # DEFAULT_MAX_MODEL_LEN; an explicit value wins but may not exceed the checkpoint's.
    max_model_len: Optional[int] = None
    prompt_template: str = "<s>{prompt}<think>"  # completions (and chat without chat_template)
    chat_template: bool = False  # use the tokenizer's chat template for chat requests and prompts
    think_end: str = "</think>"
    seed: int = 0
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class ServeBudgetConfig:
    """Per-request budgets. Unset limits fit the context: max_thinking = min(2048, context // 2),
    max_solution = min(1024, context // 4); unset defaults: thinking = min(1024, max_thinking),
    solution = min(512, max_solution) (for a 4096-token context: 2048, 1024, 1024, 512)."""

    thinking: Optional[int] = None  # default thinking budget of a request that sets none
    solution: Optional[int] = None
    max_thinking: Optional[int] = None  # larger requested budgets get HTTP 400
    max_solution: Optional[int] = None
    # The request's budget told to the model before its prompt, as the model was trained (the training config's
    # budget.prompt_hint, e.g. "<budget {thinking}>"). None: a registered model's own (its version's
    # budgetrl.prompt_hint tag), else off; "" = off.
    prompt_hint: Optional[str] = None

    @property
    def default(self) -> Budget:
        """The budget of a request that sets none (once validation filled the unset values)."""
        return Budget(self.thinking, self.solution)

    @property
    def most(self) -> Budget:
        """The largest budget a request may ask for."""
        return Budget(self.max_thinking, self.max_solution)


@dataclass
class SamplingDefaults:
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    max_n: int = 8


@dataclass
class AutoscalingConfig:
    enabled: bool = False  # false: deployment.num_replicas fixed replicas
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0


@dataclass
class DeploymentConfig:
    name: str = "budgetrl"  # Serve application name
    num_replicas: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 64  # per replica; more wait in the proxy
    max_batch_size: int = 32  # samples (prompts x n) per engine batch; also the most one request may ask
    batch_wait_timeout_s: float = 0.01


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"  # loopback only; there is no authentication
    port: int = 8000
    route_prefix: str = "/"  # the API is at {route_prefix}/v1/...


@dataclass
class ServeConfig:
    model: ServeModelConfig = field(default_factory=ServeModelConfig)
    budget: ServeBudgetConfig = field(default_factory=ServeBudgetConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_serve_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                      target: str | None = None, check_paths: bool = True) -> ServeConfig:
    """YAML file (optional) + ``key=value`` overrides + the served target -> validated ``ServeConfig``.

    Raises ``ConfigError`` naming the key and value. ``check_paths=False`` skips checks that read
    the model (directory, tokenizer, registry lookups).
    """
    cfg = merge_structured(ServeConfig, path, overrides,
                           extra={"model": {"path": target}} if target is not None else None)
    validate_serve_config(cfg, check_paths=check_paths)
    return cfg


def validate_serve_config(cfg: ServeConfig, *, check_paths: bool = True) -> None:
    """Reject impossible values (naming key and value); fill in absolute paths, served names, and the
    context and budget limits left unset (from the checkpoint's config.json when ``check_paths``)."""
    _check_fields(cfg)
    flags = devices.cpu_bf16_flags()
    facts = devices.DeviceFacts.of(cfg.deployment.gpus_per_replica, flags)
    devices.resolve_vllm(cfg.model.vllm, facts, "model.vllm")
    if cfg.model.dtype == devices.AUTO:  # training's rule: bf16 on GPUs and CPUs with bf16 instructions
        cfg.model.dtype = devices.resolve("dtype", facts, "model.dtype").value
    elif (msg := devices.dtype_warning(cfg.model.dtype, [cfg.deployment.gpus_per_replica], flags)):
        warnings.warn(msg, stacklevel=2)
    conf = _check_target(cfg, check_paths)
    if cfg.budget.prompt_hint is None:  # not a registered model, or not looked up
        cfg.budget.prompt_hint = ""
    _fit_context(cfg, conf)
    _check_budgets(cfg)


def _check_fields(cfg: ServeConfig) -> None:
    """Every check that needs neither the model's files nor its context length."""
    m = cfg.model
    if not m.path or not str(m.path).strip():
        bad("model.path", m.path, "set it to a model directory or a models:/ URI")
    if m.engine not in ("vllm", "hf"):
        bad("model.engine", m.engine, "must be 'vllm' or 'hf'")
    if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad("model.dtype", m.dtype, "must be one of auto, float32, bfloat16, float16")
    if "{prompt}" not in m.prompt_template and not m.chat_template:
        bad("model.prompt_template", m.prompt_template, "must contain '{prompt}'")
    if not m.think_end:
        bad("model.think_end", m.think_end, "must be the end-of-thinking token, e.g. '</think>'")
    if m.max_model_len is not None:
        positive("model.max_model_len", m.max_model_len)
    positive("model.vllm.kv_cache_gib", m.vllm.kv_cache_gib)
    non_negative("model.vllm.max_num_seqs", m.vllm.max_num_seqs)
    if m.name is not None and not m.name.strip():
        bad("model.name", m.name, "must be non-empty (or unset to use model.path)")
    for key in ("thinking", "solution", "max_thinking", "max_solution"):
        if getattr(cfg.budget, key) is not None:
            positive(f"budget.{key}", getattr(cfg.budget, key))
    if cfg.budget.prompt_hint is not None:
        check_prompt_hint("budget.prompt_hint", cfg.budget.prompt_hint)

    s = cfg.sampling
    non_negative("sampling.temperature", s.temperature)
    if not 0 < s.top_p <= 1:
        bad("sampling.top_p", s.top_p, "must be in (0, 1]")
    positive("sampling.max_n", s.max_n)

    d = cfg.deployment
    if not d.name or "/" in d.name:
        bad("deployment.name", d.name, "must be a non-empty name without '/'")
    positive("deployment.num_replicas", d.num_replicas)
    a = d.autoscaling
    if a.enabled:
        non_negative("deployment.autoscaling.min_replicas", a.min_replicas)
        positive("deployment.autoscaling.max_replicas", a.max_replicas)
        if a.max_replicas < a.min_replicas:
            bad("deployment.autoscaling.max_replicas", a.max_replicas,
                 f"must be >= deployment.autoscaling.min_replicas={a.min_replicas}")
        positive("deployment.autoscaling.target_ongoing_requests", a.target_ongoing_requests)
    non_negative("deployment.cpus_per_replica", d.cpus_per_replica)
    non_negative("deployment.gpus_per_replica", d.gpus_per_replica)
    validate_vllm(m.vllm, "model.vllm", d.gpus_per_replica, "deployment.gpus_per_replica")
    positive("deployment.max_ongoing_requests", d.max_ongoing_requests)
    positive("deployment.max_batch_size", d.max_batch_size)
    non_negative("deployment.batch_wait_timeout_s", d.batch_wait_timeout_s)
    if s.max_n > d.max_batch_size:
        bad("sampling.max_n", s.max_n, f"must be <= deployment.max_batch_size={d.max_batch_size}")

    h = cfg.http
    if not h.host or any(c.isspace() for c in h.host):
        bad("http.host", h.host, "must be a host or IP address, e.g. 127.0.0.1")
    if not 1 <= h.port <= 65535:
        bad("http.port", h.port, "must be in 1..65535")
    if not h.route_prefix.startswith("/") or (h.route_prefix != "/" and h.route_prefix.endswith("/")) \
            or any(c.isspace() for c in h.route_prefix):
        bad("http.route_prefix", h.route_prefix, "must start with '/' and not end with '/' (e.g. '/' or '/llm')")
    if cfg.ray.num_cpus is not None:
        positive("ray.num_cpus", cfg.ray.num_cpus)


def _model_hint(cfg: ServeConfig, trained: str | None) -> None:
    """budget.prompt_hint from the registered model when unset; a set one that differs from training's fails."""
    given = cfg.budget.prompt_hint
    if given is None:
        cfg.budget.prompt_hint = trained or ""
    elif trained and given != trained:
        bad("budget.prompt_hint", given, f"{cfg.model.path} was trained with the hint {trained!r}; leave "
            "budget.prompt_hint unset to use it (or set it to that)")


def _check_target(cfg: ServeConfig, check_paths: bool) -> dict | None:
    """The model: syntax always; existence, tokenizer and config.json when ``check_paths``.

    Returns the checkpoint's config.json (None without ``check_paths``); fills in the served names."""
    m = cfg.model
    given = str(m.path)
    names = [m.name or given]
    conf = None
    if registry.is_registry_uri(given):
        try:
            ref = registry.parse_model_uri(given)
        except registry.RegistryError as exc:
            bad("model.path", given, str(exc).removeprefix(f"{given!r}: "))
        from .tracking import resolve_tracking_uri

        m.tracking_uri = resolve_tracking_uri(m.tracking_uri)
        if ref.kind != "run":
            names.append(ref.name)
        if check_paths:
            try:  # the whole model dir (index and shards listed, small files read), before Ray starts
                conf = registry.check_model_files(given, m.tracking_uri, think_end=m.think_end,
                                                  chat_template=m.chat_template)
                registry.load_frontier(given, m.tracking_uri)  # readable, as each replica will read it
                _model_hint(cfg, registry.version_tags(given, m.tracking_uri).get(registry.TAG_PROMPT_HINT))
            except ConfigError:  # CheckpointError naming model.think_end or model.chat_template
                raise
            except Exception as exc:  # RegistryError, TrackingError
                bad("model.path", given, str(exc).removeprefix(f"{given!r}: "))
    else:
        local = Path(given).expanduser()
        if check_paths:
            if not (local / "config.json").is_file():
                bad("model.path", given, "no such model directory (no config.json)")
            conf = _check_model_dir(cfg, local)
        m.path = str(local.resolve())
        names.append(m.path)
    if m.cache_dir:
        m.cache_dir = str(Path(m.cache_dir).expanduser().resolve())
    m.aliases = [n for n in dict.fromkeys(names[1:] + list(m.aliases)) if n and n != names[0]]
    m.name = names[0]
    return conf


def checkpoint_context(conf: dict) -> int | None:
    """The context length a model's config.json names (also under ``text_config``), or None."""
    if not isinstance(conf, dict):
        return None
    for source in (conf, conf.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _fit_context(cfg: ServeConfig, conf: dict | None) -> None:
    """``model.max_model_len``: an explicit value, checked against the checkpoint's context; unset, the
    checkpoint's (at most ``DEFAULT_MAX_MODEL_LEN``); then the budget limits left unset, from it."""
    m, b = cfg.model, cfg.budget
    limit = checkpoint_context(conf) if conf is not None else None
    where = f"the checkpoint's config.json at {m.path}"
    if m.max_model_len is not None and limit is not None and m.max_model_len > limit:
        bad("model.max_model_len", m.max_model_len,
             f"larger than the checkpoint's context of {limit} tokens ({where}); lower it, or leave it unset")
    if m.max_model_len is None:
        if conf is not None and limit is None:
            bad("model.max_model_len", None, f"{where} names no context length ({', '.join(_CONTEXT_KEYS)}); "
                                              "set it")
        m.max_model_len = min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    ctx = m.max_model_len
    if b.max_thinking is None:
        b.max_thinking = max(1, min(2048, ctx // 2))
    if b.max_solution is None:
        b.max_solution = max(1, min(1024, ctx // 4))
    if b.thinking is None:
        b.thinking = min(1024, b.max_thinking)
    if b.solution is None:
        b.solution = min(512, b.max_solution)


def _check_budgets(cfg: ServeConfig) -> None:
    b, m = cfg.budget, cfg.model
    if b.thinking > b.max_thinking:
        bad("budget.thinking", b.thinking, f"the default is above budget.max_thinking={b.max_thinking}")
    if b.solution > b.max_solution:
        bad("budget.solution", b.solution, f"the default is above budget.max_solution={b.max_solution}")
    if b.max_thinking + 1 + b.max_solution >= m.max_model_len:
        raise ConfigError(
            f"budget.max_thinking={b.max_thinking} + 1 (</think>) + budget.max_solution={b.max_solution} = "
            f"{b.max_thinking + 1 + b.max_solution} leaves no room for a prompt in "
            f"model.max_model_len={m.max_model_len}; lower the budgets or raise model.max_model_len")


def _check_model_dir(cfg: ServeConfig, path: Path) -> dict:
    """The checks that need the model's files (local directories only: weights and shards, EOS ids, tokenizer,
    ``model.think_end``, chat template; ``checkpoint_files.check_model_dir``); returns its config.json."""
    from .checkpoint_files import check_model_dir

    m = cfg.model
    return check_model_dir(path, think_end=m.think_end, chat_template=m.chat_template)


def config_warnings(cfg: ServeConfig) -> list[str]:
    """Settings that work but deserve a line on stderr (binding beyond loopback)."""
    host = cfg.http.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return []
    return [f"http.host={host!r}: the server has no authentication or TLS; anyone who can reach "
            f"{host}:{cfg.http.port} can use it. Keep it behind a firewall or an authenticating proxy."]


def base_url(cfg: ServeConfig) -> str:
    """The OpenAI ``base_url`` of a deployment: ``http://HOST:PORT{route_prefix}/v1``."""
    prefix = "" if cfg.http.route_prefix == "/" else cfg.http.route_prefix
    host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.http.port}{prefix}/v1"
