"""Devices: the torch device an actor computes on, and what ``auto`` config values mean on each kind.

Two uses of the same facts, kept together so they cannot drift apart:

- ``actor_device`` (on the worker): under Ray a GPU actor sees its GPU(s) through ``CUDA_VISIBLE_DEVICES``
  renumbered from 0, so its device is ``cuda:0``, not the bare ``cuda`` that ``torch.cuda.set_device``
  refuses. ``check_dtype`` (also on the worker) refuses a dtype the device cannot run.
- ``resolve`` (in the driver, before any actor starts): each ``auto`` setting has a rule table, one row
  per device kind, first match wins; every resolution carries the reason shown by ``show-config``.
  The driver knows a role's devices only from the config: a GPU count > 0 means CUDA. Whether that GPU
  has bf16 is known only on the worker, so the CUDA row assumes it (every data-center GPU since Ampere,
  compute capability 8.0, has it), the run gets one dtype that MLflow, the config hash and a resume see,
  and ``check_dtype`` fails a worker at start, naming ``model.dtype``, on a GPU without it. Resolving on
  each worker instead could give the learner and the engines different dtypes and hide the value from
  the run's record.

CPUs: whether the CPU has bf16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``) is read from the
driver host's ``/proc/cpuinfo`` (``cpu_bf16_flags``); workers are assumed to run on CPUs like it (set
``model.dtype`` on a cluster whose nodes differ). Without them torch emulates bf16 through fp32 and pays for the
conversions: a 256x512 @ 512x512 matmul took 110 ms in bf16 against 2.0 ms in fp32 on a 2-core Zen 3 (AVX2),
so there ``auto`` is fp32 and an explicit bf16 gets a warning (``dtype_warning``). With them ``auto`` is bf16: the
learner's forward+backward ran 1.6-2.4x faster and vLLM generated 1.17x faster (issue 26, Zen 4 with AVX-512 BF16),
and the quickstart learned as well as in fp32 (docs/performance.md, section 9).

Adding a rule: add the fact to ``DeviceFacts`` and a row above the last row of its table.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from functools import lru_cache
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
# Of a GPU's memory, what vLLM may take for weights, activations and KV cache; the rest is for CUDA
# graphs, NCCL buffers and fragmentation (vLLM's own default is 0.9 with nothing else on the GPU).
GPU_MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class DeviceFacts:
    """What is known about the devices of one role (rollout workers or learner ranks)."""

    kind: str  # "cuda" | "cpu"
    gpus: float = 0.0  # GPUs per actor (Ray's num_gpus; a fraction shares one GPU)
    bf16: bool | None = None  # None: unknown here (the driver cannot see a worker's GPU)
    cpu_flags: str = ""  # CPUs: the bf16 flags found, for the reason shown ("" when none)
    params: int | None = None  # the model's parameter count, for rules by size (learner.compile); None: unknown

    @classmethod
    def of(cls, gpus_per_worker: float, cpu_flags: Sequence[str] = (), params: int | None = None) -> DeviceFacts:
        """The driver's view: a GPU count > 0 means CUDA; a CPU has bf16 when ``cpu_flags`` (what
        ``cpu_bf16_flags`` found on this host) names any."""
        if gpus_per_worker > 0:
            return cls("cuda", float(gpus_per_worker), params=params)
        return cls("cpu", 0.0, bf16=bool(cpu_flags), cpu_flags=" ".join(cpu_flags), params=params)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm (FEAT_BF16)


def parse_cpu_bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The bf16 flags of the first CPU in a ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            have = set(value.split())
            return tuple(f for f in CPU_BF16_FLAGS if f in have)
    return ()


@lru_cache(maxsize=1)
def cpu_bf16_flags(path: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """This host's bf16 CPU flags; () where the file is missing (macOS) or names none."""
    try:
        with open(path) as f:
            return parse_cpu_bf16_flags(f.read())
    except OSError:
        return ()


@dataclass(frozen=True)
class Rule:
    when: Callable[[DeviceFacts], bool]
    value: Any  # or a function of the facts
    why: str  # formatted with the facts' fields: {kind}, {gpus}


@dataclass(frozen=True)
class Resolution:
    key: str
    value: Any
    why: str


def _cuda(f: DeviceFacts) -> bool:
    return f.kind == "cuda"


def _any(f: DeviceFacts) -> bool:
    return True


# learner.compile=auto compiles on CPUs from this many parameters (benchmarks/learner_compile.py, docs/performance.md
# section 10: the compiled step is 15-25% faster at every size, but below it the first step's compile, ~30 s cold,
# outweighs what a few hundred steps save).
COMPILE_MIN_PARAMS = 3_000_000


RULES: dict[str, tuple[Rule, ...]] = {
    "dtype": (
        Rule(lambda f: _cuda(f) and f.bf16 is not False, "bfloat16",
             "CUDA GPU: bf16 (assumed in the driver: every GPU since Ampere, compute capability 8.0, has it; "
             "a worker on a GPU without it fails at start)"),
        Rule(_cuda, "float32", "CUDA GPU without bf16: float32 (the learner does not train in float16, "
                               "which needs loss scaling)"),
        Rule(lambda f: f.kind == "cpu" and bool(f.bf16), "bfloat16",
             "CPU with bf16 instructions ({cpu_flags}): bf16 (the quickstart learned as well in bf16 as in fp32, "
             "3 runs each, and ran 1.15x faster: docs/performance.md, section 9)"),
        Rule(_any, "float32", "CPU without bf16 instructions (no avx512_bf16, amx_bf16 or bf16 flag): float32, "
                              "as before (bf16 would be emulated: ~50x slower matmuls)"),
    ),
    "compile": (  # the learner's forward (learner.compile)
        Rule(_cuda, False, "GPU: off until measured there (benchmarks/learner_compile.py); learner.compile=true "
                           "compiles the forward"),
        Rule(lambda f: f.params is None, False, "model size unknown here (no readable config.json): off"),
        Rule(lambda f: f.params >= COMPILE_MIN_PARAMS, True,
             "CPU, {params_m} parameters >= " + f"{COMPILE_MIN_PARAMS / 1e6:g}M" + ": the compiled step is 15-25% "
             "faster and the first step's compile pays off within a few hundred steps (docs/performance.md, section 10)"),
        Rule(_any, False, "CPU, {params_m} parameters < " + f"{COMPILE_MIN_PARAMS / 1e6:g}M" + ": compiling costs "
                          "more than a few hundred steps save at this size (docs/performance.md, section 10)"),
    ),
    "enforce_eager": (
        Rule(_cuda, False, "GPU: CUDA graphs and compilation on (eager decode is bound by kernel launches)"),
        Rule(_any, True, "CPU: eager, as before (compiling costs more start-up than it saves, "
                         "notes/vllm-on-cpu.md)"),
    ),
    "gpu_memory_utilization": (
        Rule(lambda f: _cuda(f) and f.gpus >= 1, GPU_MEMORY_SHARE,
             "rollout has its own GPU(s): 0.85 of each for the engine, the rest for CUDA graphs and NCCL"),
        Rule(_cuda, lambda f: round(GPU_MEMORY_SHARE * f.gpus, 3),
             "rollout shares a GPU ({gpus} of one): 0.85 x its share (vLLM's fraction is per engine)"),
        Rule(_any, 0.5, "CPU: ignored (rollout.vllm.kv_cache_gib sizes the KV cache); 0.5 as before"),
    ),
    "weight_sync": (  # facts of the sync's two ends: CUDA when learner and rollout both have GPUs
        Rule(lambda f: _cuda(f) and f.gpus >= 1, "collective",
             "learner and rollout on GPUs of their own: NCCL broadcast from learner rank 0 into each engine, in "
             "the engine's dtype (docs/performance.md, section 5)"),
        Rule(_cuda, "object_store", "a fraction of a GPU ({gpus}): learner and engine may share one, and NCCL "
                                    "refuses two ranks on one GPU"),
        Rule(_any, "object_store", "CPUs, an in-process engine: the object store, as before (2.3-2.5x faster "
                                   "than gloo on one node at fp32: docs/performance.md, section 5)"),
    ),
}

ENGINE_PROCESS_SYNC = ("vLLM's engine in its own process (rollout.vllm.multiprocess): the object store's payload "
                       "would cross into it again as safetensors bytes, the broadcast goes straight in (3-9x "
                       "faster on CPUs: docs/performance.md, section 5)")


def resolve_weight_sync(ends: DeviceFacts, engine_own_process: bool, key: str) -> Resolution:
    """``rollout.weight_sync.method``: the rule for the sync's two ends (``ends``: CUDA when both have
    GPUs), except that an engine in its own process takes the collective on any device."""
    res = resolve("weight_sync", ends, key)
    if res.value == "object_store" and engine_own_process:
        return Resolution(key, "collective", ENGINE_PROCESS_SYNC)
    return res


def resolve(setting: str, facts: DeviceFacts, key: str | None = None,
            rules: Mapping[str, Sequence[Rule]] = RULES) -> Resolution:
    """The first rule of ``rules[setting]`` that matches ``facts``."""
    for rule in rules[setting]:
        if rule.when(facts):
            value = rule.value(facts) if callable(rule.value) else rule.value
            params_m = "?" if facts.params is None else f"{facts.params / 1e6:.1f}M"
            why = rule.why.format(kind=facts.kind, gpus=f"{facts.gpus:g}", cpu_flags=facts.cpu_flags,
                                  params_m=params_m)
            return Resolution(key or setting, value, why)
    raise LookupError(f"{setting}: no rule matches {facts}")


def resolve_shared(setting: str, roles: Mapping[str, DeviceFacts], key: str,
                   rules: Mapping[str, Sequence[Rule]] = RULES) -> Resolution:
    """One value for several roles (the model dtype: weights move between learner and engines).
    Roles that disagree get float32, which every device runs."""
    picks = {role: resolve(setting, facts, key, rules) for role, facts in roles.items()}
    if len({r.value for r in picks.values()}) == 1:
        return next(iter(picks.values()))
    each = ", ".join(f"{role} on {roles[role].kind} wants {r.value}" for role, r in picks.items())
    return Resolution(key, "float32", f"roles disagree ({each}): float32, which both run; set {key} to choose")


def resolve_vllm(vllm_cfg, facts: DeviceFacts, prefix: str) -> list[Resolution]:
    """Replace the ``auto`` fields of a ``VllmConfig`` for an engine on ``facts``; what was resolved."""
    out = []
    for name in ("enforce_eager", "gpu_memory_utilization"):
        if getattr(vllm_cfg, name) == AUTO:
            res = resolve(name, facts, f"{prefix}.{name}")
            setattr(vllm_cfg, name, res.value)
            out.append(res)
    return out


def resolve_auto(cfg) -> list[Resolution]:
    """Replace a training config's ``auto`` values by their meaning on the devices it names (a GPU count
    > 0 means CUDA), in the driver before any actor starts; on CPUs they are the values used before
    ``auto`` existed. Returns what each became, with the reason."""
    flags = cpu_bf16_flags()
    rollout = DeviceFacts.of(cfg.rollout.gpus_per_worker, flags)
    out = []
    if cfg.model.dtype == AUTO:  # one dtype: weights move between the learner and the engines
        roles = {"rollout": rollout, "learner": DeviceFacts.of(cfg.learner.gpus_per_worker, flags)}
        out.append(resolve_shared("dtype", roles, "model.dtype"))
        cfg.model.dtype = out[-1].value
    elif (msg := dtype_warning(cfg.model.dtype, [cfg.rollout.gpus_per_worker, cfg.learner.gpus_per_worker], flags)):
        warnings.warn(msg, stacklevel=2)
    out += resolve_vllm(cfg.rollout.vllm, rollout, "rollout.vllm")
    if cfg.learner.compile == AUTO:
        facts = DeviceFacts.of(cfg.learner.gpus_per_worker, flags, params=model_parameters(cfg.model))
        out.append(resolve("compile", facts, "learner.compile"))
        cfg.learner.compile = out[-1].value
    r = cfg.rollout
    if r.weight_sync.method == AUTO:  # CUDA only when both ends of the sync have GPUs
        ends = DeviceFacts.of(min(r.gpus_per_worker, cfg.learner.gpus_per_worker))
        own_process = r.engine == "vllm" and bool(r.vllm.multiprocess)
        out.append(resolve_weight_sync(ends, own_process, "rollout.weight_sync.method"))
        r.weight_sync.method = out[-1].value
    if r.colocate == AUTO:  # after the sync method: a collective one keeps the actors apart
        from . import colocation

        r.colocate, why = colocation.resolve(cfg)
        out.append(Resolution("rollout.colocate", r.colocate, why))
    return out


def model_parameters(model_cfg) -> int | None:
    """The parameter count of ``model.path`` from its ``config.json`` (``plan.ModelShape``: decoder LMs of the
    Llama/Qwen kind); the embedded tiny model's shape when it is still to be built; None when neither is known."""
    from .plan import ModelShape, shape_from_config_json

    try:
        return shape_from_config_json(model_cfg.path).params()
    except (OSError, KeyError, TypeError, ValueError):
        pass
    if model_cfg.build_if_missing == "tiny":
        from .tiny_model import padded_vocab_size

        t = model_cfg.tiny
        return ModelShape(hidden=t.hidden_size, layers=t.num_layers, heads=t.num_heads, kv_heads=t.num_heads,
                          intermediate=t.intermediate_size, vocab=padded_vocab_size(), tied=True).params()
    return None


def dtype_warning(dtype: str, gpus_per_role: Sequence[float], cpu_flags: Sequence[str]) -> str | None:
    """Why an explicit bf16 will be slow here (a CPU role on a host without bf16 instructions), or None."""
    if dtype != "bfloat16" or cpu_flags or all(g > 0 for g in gpus_per_role):
        return None
    return ("model.dtype='bfloat16' on a CPU without bf16 instructions (no avx512_bf16, amx_bf16 or bf16 flag in "
            "/proc/cpuinfo): torch emulates it, ~50x slower matmuls than float32; model.dtype=auto picks float32 here")


def describe(resolutions: Sequence[Resolution]) -> str:
    """YAML comment lines: what each ``auto`` became and why (``show-config`` appends them)."""
    if not resolutions:
        return ""
    lines = ["# auto values, resolved for the devices the config names (orchestrator/devices.py):"]
    lines += [f"#   {r.key}: {json.dumps(r.value)}  # {r.why}" for r in resolutions]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ worker side


def cuda_index(gpu_ids: Sequence[int | str], visible_devices: str | None) -> int:
    """The torch index of an actor's first GPU.

    ``gpu_ids``: what ``ray.get_gpu_ids()`` returns (ids in the node's numbering; empty outside a GPU
    actor). Ray sets ``CUDA_VISIBLE_DEVICES`` to them, so torch numbers them from 0 in that order; with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it leaves the variable alone and the id is the index.
    """
    if not gpu_ids:
        return 0  # no Ray assignment: the first visible GPU, what a bare "cuda" meant
    ids = [str(i) for i in gpu_ids]
    if not visible_devices:
        try:
            return min(int(i) for i in ids)
        except ValueError:
            raise RuntimeError(f"Ray assigned GPUs {ids} but CUDA_VISIBLE_DEVICES is not set") from None
    visible = [v.strip() for v in visible_devices.split(",")]
    positions = [visible.index(i) for i in ids if i in visible]
    if not positions:
        raise RuntimeError(f"Ray assigned GPUs {ids}, which CUDA_VISIBLE_DEVICES={visible_devices!r} does not list")
    return min(positions)


def actor_device(requested: str = AUTO):
    """The torch device of this process: ``cuda:N`` from Ray's assignment when CUDA is available
    (``auto``, or a bare ``cuda``), else the CPU; an explicit ``cuda:N`` or ``cpu`` as given."""
    import torch

    requested = str(requested)
    if requested not in (AUTO, "cuda"):
        return torch.device(requested)
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        return torch.device("cpu")
    ray = sys.modules.get("ray")  # a Ray worker has it imported; a bare process (learner_mfu.py) may lack Ray
    gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    return torch.device("cuda", cuda_index(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))


def dtype_error(dtype: str, device_kind: str, bf16_supported: bool) -> str | None:
    """Why ``dtype`` cannot run on this device, or None."""
    if device_kind == "cuda" and dtype == "bfloat16" and not bf16_supported:
        return ("model.dtype='bfloat16': this GPU has no bf16 (compute capability < 8.0); "
                "set model.dtype=float32")
    return None


def check_dtype(dtype: str, device) -> None:
    """On the worker, before loading a model: refuse a dtype its GPU cannot run (see the module doc)."""
    if device.type != "cuda":
        return
    import torch

    with torch.cuda.device(device):
        err = dtype_error(dtype, "cuda", torch.cuda.is_bf16_supported(including_emulation=False))
    if err:
        raise ValueError(err)
