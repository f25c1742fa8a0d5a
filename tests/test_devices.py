"""orchestrator/devices.py: an actor's torch device from Ray's GPU assignment, and the per-device rules
that resolve ``auto`` settings. No GPU here: the device facts are passed in, and the torch call a
learner rank makes (``torch.cuda.set_device``) is checked through the index parser it calls."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.cuda._utils import _get_device_index  # what torch.cuda.set_device calls first

from orchestrator.devices import (
    COMPILE_MIN_PARAMS,
    RULES,
    DeviceFacts,
    cpu_bf16_flags,
    Rule,
    actor_device,
    cuda_index,
    describe,
    dtype_error,
    dtype_warning,
    model_parameters,
    parse_cpu_bf16_flags,
    resolve,
    resolve_shared,
)

# ---------------------------------------------------------------------------------- the actor's device


@pytest.mark.parametrize("gpu_ids, visible, index", [
    (["3"], "3", 0),  # Ray's default: CUDA_VISIBLE_DEVICES is the actor's GPU, torch calls it cuda:0
    ([3], "3", 0),  # ids as ints (no CUDA_VISIBLE_DEVICES when the raylet started)
    (["2", "5"], "5,2", 0),  # a 2-GPU actor: its first device is the first one listed
    (["GPU-b"], "GPU-a,GPU-b", 1),  # narrowed by a runtime_env, by UUID
    ([3], None, 3),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id is the index
    ([], None, 0),  # no Ray assignment (a plain process): the first visible GPU
    ([], "4,5", 0),
])
def test_cuda_index_follows_rays_assignment(gpu_ids, visible, index):
    assert cuda_index(gpu_ids, visible) == index
    # the index torch.cuda.set_device gets from the device we build (it refuses a bare "cuda")
    assert _get_device_index(torch.device("cuda", cuda_index(gpu_ids, visible))) == index


def test_bare_cuda_device_is_what_set_device_refuses():
    """The crash of a multi-rank GPU run (issue 25, 1a): set_device(torch.device("cuda")) raises."""
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        _get_device_index(torch.device("cuda"))


def test_cuda_index_mismatch_names_both():
    with pytest.raises(RuntimeError, match=r"\['7'\].*CUDA_VISIBLE_DEVICES='0,1'"):
        cuda_index(["7"], "0,1")
    with pytest.raises(RuntimeError, match="not set"):
        cuda_index(["GPU-a"], None)


def test_actor_device_on_this_cpu():
    assert actor_device() == torch.device("cpu")
    assert actor_device("cpu") == torch.device("cpu")
    assert actor_device("cuda:1") == torch.device("cuda", 1)  # explicit: as given
    with pytest.raises(RuntimeError, match="no CUDA device"):
        actor_device("cuda")


def test_process_group_refuses_a_device_without_index():
    from orchestrator.learner.distributed import init_process_group

    with pytest.raises(ValueError, match="needs its GPU's index"):
        init_process_group("tcp://127.0.0.1:1", 0, 2, torch.device("cuda"))


_RAY_ACTORS = textwrap.dedent("""
    import json, os, ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from orchestrator.devices import cuda_index

    ray.init(address="local", num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def probe():
        ids, visible = ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
        return {"ids": [str(i) for i in ids], "visible": visible, "index": cuda_index(ids, visible)}

    pg = placement_group([{"CPU": 0.5, "GPU": 1}, {"CPU": 0.5, "GPU": 2}], strategy="PACK")
    ray.get(pg.ready())
    out = [ray.get(probe.options(num_cpus=0.5, num_gpus=g, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=i)).remote()) for i, g in ((0, 1), (1, 2))]
    print(json.dumps(out))
""")


def test_cuda_index_under_real_ray():
    """Ray (with 3 logical GPUs, none real) sets CUDA_VISIBLE_DEVICES in GPU workers of placement-group
    bundles, as the runtime places learner ranks: each worker's first GPU is its cuda:0."""
    proc = subprocess.run([sys.executable, "-c", _RAY_ACTORS], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(one["ids"]) == 1 and one["visible"] == one["ids"][0] and one["index"] == 0
    assert len(two["ids"]) == 2 and sorted(two["visible"].split(",")) == sorted(two["ids"]) and two["index"] == 0
    assert not set(one["ids"]) & set(two["ids"])  # distinct physical GPUs, both cuda:0 to their process


# ------------------------------------------------------------------------------------- auto resolution

CPU = DeviceFacts.of(0)
GPU = DeviceFacts.of(1)
GPU_NO_BF16 = DeviceFacts("cuda", 1, bf16=False)
HALF_GPU = DeviceFacts.of(0.5)


@pytest.mark.parametrize("setting, facts, value", [
    ("dtype", CPU, "float32"),
    ("dtype", GPU, "bfloat16"),
    ("dtype", DeviceFacts("cuda", 1, bf16=True), "bfloat16"),
    ("dtype", GPU_NO_BF16, "float32"),
    ("enforce_eager", CPU, True),
    ("enforce_eager", GPU, False),
    ("enforce_eager", HALF_GPU, False),
    ("gpu_memory_utilization", CPU, 0.5),
    ("gpu_memory_utilization", GPU, 0.85),
    ("gpu_memory_utilization", DeviceFacts.of(2), 0.85),
    ("gpu_memory_utilization", HALF_GPU, 0.425),
])
def test_rules_per_device(setting, facts, value):
    res = resolve(setting, facts, key=f"x.{setting}")
    assert res.value == value and type(res.value) is type(value)
    assert res.key == f"x.{setting}" and res.why


def test_cpu_rules_are_todays_values():
    """The CPU must keep the values it had before `auto`: the quickstart reproduces bit for bit."""
    assert [resolve(s, CPU).value for s in ("dtype", "enforce_eager", "gpu_memory_utilization")] == \
        ["float32", True, 0.5]
    assert "as before" in resolve("dtype", CPU).why


def test_shared_dtype_when_roles_disagree():
    both = resolve_shared("dtype", {"rollout": GPU, "learner": GPU}, "model.dtype")
    assert both.value == "bfloat16" and "CUDA" in both.why
    mixed = resolve_shared("dtype", {"rollout": GPU, "learner": CPU}, "model.dtype")
    assert mixed.value == "float32"
    assert "rollout on cuda wants bfloat16" in mixed.why and "learner on cpu wants float32" in mixed.why


ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


@pytest.mark.parametrize("cpuinfo, flags", [
    (ZEN3, ()), (ZEN4, ("avx512_bf16",)), (SAPPHIRE, ("avx512_bf16", "amx_bf16")), (GRAVITON3, ("bf16",)), ("", ()),
])
def test_cpu_bf16_flags_from_cpuinfo(cpuinfo, flags):
    assert parse_cpu_bf16_flags(cpuinfo) == flags


def test_cpu_dtype_row_names_the_flags():
    """A CPU with bf16 instructions computes in bf16 (the reason names the flags: issue 26 showed it learns as
    well); without them the reason says why bf16 would be slow."""
    with_bf16 = resolve("dtype", DeviceFacts.of(0, ("avx512_bf16",)), "model.dtype")
    without = resolve("dtype", DeviceFacts.of(0, ()), "model.dtype")
    assert (with_bf16.value, without.value) == ("bfloat16", "float32")
    assert "avx512_bf16" in with_bf16.why and "learned as well" in with_bf16.why
    assert "without bf16 instructions" in without.why and "emulated" in without.why


def test_explicit_bf16_on_an_emulating_cpu_warns():
    assert "~50x slower" in dtype_warning("bfloat16", [0, 0], ())
    assert dtype_warning("bfloat16", [0, 0], ("avx512_bf16",)) is None  # the CPU runs it
    assert dtype_warning("bfloat16", [1, 1], ()) is None  # both roles on GPUs
    assert "model.dtype" in dtype_warning("bfloat16", [1, 0], ())  # the learner on the CPU
    assert dtype_warning("float32", [0, 0], ()) is None


def test_a_rule_table_extends_by_one_row():
    """A later rule is one row above the last, with a new fact (here, made up: bf16 for huge models on any CPU)."""
    huge = DeviceFacts.of(0, (), params=10**10)
    rules = dict(RULES, dtype=(*RULES["dtype"][:-1],
                               Rule(lambda f: (f.params or 0) > 10**9, "bfloat16", "a huge model on a CPU"),
                               RULES["dtype"][-1]))
    assert resolve("dtype", huge, rules=rules).value == "bfloat16"
    assert resolve("dtype", CPU, rules=rules).value == "float32"  # other CPUs unchanged
    assert resolve("dtype", GPU, rules=rules).value == "bfloat16"


@pytest.mark.parametrize("facts, value, said", [
    (DeviceFacts.of(0, params=800_000), False, "0.8M parameters < "),
    (DeviceFacts.of(0, params=COMPILE_MIN_PARAMS), True, "parameters >= "),
    (DeviceFacts.of(0, params=None), False, "unknown"),
    (DeviceFacts.of(1, params=10**9), False, "GPU: off until measured"),
])
def test_learner_compile_rule_by_model_size(facts, value, said):
    res = resolve("compile", facts, "learner.compile")
    assert res.value is value and said in res.why


def test_learner_compile_auto_in_a_config(tmp_path):
    """The quickstart's tiny model (0.8M, built later) resolves to off, so the suite never compiles; a
    config.json of a larger model to on; an explicit value is kept; a bad one is named."""
    from orchestrator.config import ConfigError, load_config_explained
    from orchestrator.plan import ModelShape

    cfg, resolved = load_config_explained("configs/quickstart.yaml", ["model.path=" + str(tmp_path / "none")])
    assert cfg.learner.compile is False
    assert model_parameters(cfg.model) == ModelShape(128, 3, 4, 4, 512, 128, True).params()
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
        vocab_size=128, tie_word_embeddings=True)))
    cfg, resolved = load_config_explained("configs/quickstart.yaml", ["model.path=" + str(tmp_path)])
    assert cfg.learner.compile is True and any(r.key == "learner.compile" for r in resolved)
    cfg, _ = load_config_explained("configs/quickstart.yaml", ["model.path=" + str(tmp_path), "learner.compile=false"])
    assert cfg.learner.compile is False
    with pytest.raises(ConfigError, match="learner.compile='sometimes'"):
        load_config_explained("configs/quickstart.yaml", ["learner.compile=sometimes"])


def test_describe_is_yaml_comments():
    text = describe([resolve("enforce_eager", GPU, "rollout.vllm.enforce_eager")])
    assert all(line.startswith("#") for line in text.splitlines())
    assert "rollout.vllm.enforce_eager: false  # GPU" in text
    assert describe([]) == ""


def test_dtype_checked_on_the_worker():
    assert "model.dtype='bfloat16'" in dtype_error("bfloat16", "cuda", bf16_supported=False)
    assert dtype_error("bfloat16", "cuda", bf16_supported=True) is None
    assert dtype_error("float32", "cuda", bf16_supported=False) is None
    assert dtype_error("bfloat16", "cpu", bf16_supported=False) is None  # CPUs run bf16 (slowly or not)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's check is x86's")
def test_host_flags_agree_with_torchs_check():
    """This host's reading agrees with torch's own (what vLLM's CPU platform asks before its bf16 kernels)."""
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bool(cpu_bf16_flags()) == has, (cpu_bf16_flags(), has)
