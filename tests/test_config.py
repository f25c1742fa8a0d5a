"""Config errors fail before Ray starts and name the key path and the bad value."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import Budget, ConfigError, EvalConfig, load_config, parse_budget


@pytest.mark.parametrize("override, expected", [
    ("model.foo=1", "model.foo"),
    ("rollout.group_size=abc", "rollout.group_size"),
    ("budget.thinking=-3", "budget.thinking=-3"),
    ("budget.solution=0", "budget.solution=0"),
    ("rollout.group_size=1", "rollout.group_size=1"),
    ("model.path=/no/such/model", "/no/such/model"),
    ("rollout.engine=tgi", "rollout.engine='tgi'"),
    ("rollout.vllm.max_num_seqs=-1", "rollout.vllm.max_num_seqs=-1"),
    ("trainer.off_policy_steps=2", "trainer.off_policy_steps=2"),
    ("budgets=[16x8,oops]", "'oops'"),
    ("learner.lr=0", "learner.lr=0"),
    ("learner.micro_batch_tokens=-1", "learner.micro_batch_tokens=-1"),
    ("algorithm.kl_estimator=k9", "k9"),
    # k1 as a loss term has zero expected gradient: refused, naming what to use instead
    ("algorithm.kl_estimator=k1", "algorithm.kl_estimator='k1': as a loss term"),
    ("algorithm.kl_estimator=k1", "use k2 or k3"),
    ("model.dtype=int8", "model.dtype='int8'"),
    ("rollout.vllm.enforce_eager=maybe", "rollout.vllm.enforce_eager='maybe'"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization=1.5"),
    ("rollout.vllm.gpu_memory_utilization=most", "rollout.vllm.gpu_memory_utilization='most'"),
    ("rollout.vllm.tensor_parallel_size=0", "rollout.vllm.tensor_parallel_size=0"),
    # sharding needs GPUs: on CPU (gpus_per_worker 0) any size > 1 is refused, naming both keys
    ("rollout.vllm.tensor_parallel_size=2", "rollout.gpus_per_worker=0"),
    ("tracking.system_metrics_interval_s=0", "tracking.system_metrics_interval_s=0.0: must be > 0"),
    ("tracking.system_metrics=maybe", "tracking.system_metrics"),
])
def test_bad_values_name_key_and_value(cfg_file, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, [override])
    assert expected in str(info.value)


def test_missing_model_path_is_reported(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("budget:\n  thinking: 16\n")
    with pytest.raises(ConfigError, match="model.path"):
        load_config(p)


def test_good_config_and_aliases(cfg_file, tmp_path):
    cfg = load_config(cfg_file, ["budgets=[16x8,unconstrained]", f"checkpoint={tmp_path / 'model'}",
                                 "rollout.group_size=4"])
    assert cfg.eval.budgets == ["16x8", "unconstrained"]
    assert cfg.model.path == str(tmp_path / "model")
    assert cfg.rollout.group_size == 4 and cfg.budget.thinking == 16


def test_parse_budget():
    e = EvalConfig(max_thinking=64, max_solution=12)
    assert parse_budget("16x8", e).thinking == 16
    assert parse_budget("unconstrained", e).solution == 12
    with pytest.raises(ConfigError):
        parse_budget("0x8", e)
    # One value for a budget: its label names it in the eval grid and does not make it a different budget.
    assert parse_budget("16x8", e) == Budget(16, 8) and Budget(16, 8).label == "16x8"
    assert parse_budget("unconstrained", e) == e.unconstrained == Budget(64, 12)
    assert (e.unconstrained.label, e.unconstrained.total) == ("unconstrained", 76)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such.yaml")


def test_cli_exits_2_with_one_line_before_ray(cfg_file):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(cfg_file), "budget.thinking=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "budget.thinking=-1" in proc.stderr
    assert "ray" not in proc.stderr.lower()


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = [f for f in sorted(root.glob("*.yaml")) if f.name != "serve.yaml" and not f.name.startswith("length_analysis")]
    assert files, "configs/ holds no YAML"
    for f in files:
        load_config(f)
    # Cluster configs name paths that exist only on the cluster: validate everything but those.
    gpu = sorted((root / "gpu").glob("*.yaml"))
    assert gpu
    for f in gpu:
        cfg = load_config(f, check_paths=False)
        assert cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus_per_worker > 0


# Cheap if a regression lets the command run: HF engine, 2 prompts, 1 budget, a 2-layer tiny model.
_CHEAP_EVAL = ["rollout.engine=hf", "budgets=[4x4]", "eval.num_prompts=2", "data.eval_size=2", "ray.num_cpus=1",
               "reward.num_workers=0", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
               "model.tiny.intermediate_size=64"]


@pytest.mark.parametrize("command", ["eval", "serve"])
@pytest.mark.parametrize("existing_dir", [False, True], ids=["typo", "not-a-checkpoint"])
def test_eval_and_serve_never_build_a_model(tmp_path, command, existing_dir):
    """configs/quickstart.yaml sets model.build_if_missing=tiny; a checkpoint path with a typo (or a folder
    that is no checkpoint) must still exit 2 with one line naming it, before Ray starts, building nothing."""
    from pathlib import Path

    ckpt = tmp_path / "outputs" / ("quickstart" if existing_dir else "quikstart") / "checkpoint"
    if existing_dir:
        ckpt.mkdir(parents=True)
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    args = ([command, quickstart, f"checkpoint={ckpt}", f"trainer.output_dir={tmp_path / 'out'}", *_CHEAP_EVAL]
            if command == "eval" else [command, str(ckpt)])
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.path=") and str(ckpt) in lines[0], lines
    # nothing written: no model, no mlflow.db, no out/
    assert sorted(p.name for p in tmp_path.iterdir()) == (["outputs"] if existing_dir else [])
    assert list(ckpt.iterdir()) == [] if existing_dir else not ckpt.exists()


# ---------------------------------------------------------------------------- auto values (devices.py)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
GPU_15B = Path(__file__).resolve().parents[1] / "configs" / "gpu" / "deepscaler-1.5b.yaml"


def test_cpu_config_resolves_to_todays_values():
    """The quickstart (CPU) gets the values it ran with before `auto` existed, except bf16 on a CPU with bf16
    instructions (issue 26), and no compiling for its 0.8M-parameter model."""
    from orchestrator.config import load_config_explained
    from orchestrator.devices import cpu_bf16_flags

    cfg, resolved = load_config_explained(QUICKSTART)
    v = cfg.rollout.vllm
    assert (cfg.model.dtype, v.enforce_eager, v.gpu_memory_utilization, v.tensor_parallel_size) == \
        ("bfloat16" if cpu_bf16_flags() else "float32", True, 0.5, 1)
    assert cfg.rollout.weight_sync.method == "object_store" and cfg.learner.compile is False
    assert cfg.rollout.colocate is False  # the vLLM engine keeps its own actor
    assert {r.key for r in resolved} == {"model.dtype", "rollout.vllm.enforce_eager", "learner.compile",
                                         "rollout.vllm.gpu_memory_utilization", "rollout.weight_sync.method",
                                         "rollout.colocate"}


def test_gpu_config_resolves_for_gpus():
    from orchestrator.config import load_config_explained
    from orchestrator.devices import cpu_bf16_flags

    cfg, resolved = load_config_explained(GPU_15B, check_paths=False)
    v = cfg.rollout.vllm
    assert (cfg.model.dtype, v.enforce_eager, v.gpu_memory_utilization) == ("bfloat16", False, 0.85)
    assert cfg.rollout.weight_sync.method == "collective"  # NCCL broadcast between the GPUs
    assert all(r.why for r in resolved)
    # explicit values win and are not reported as resolved
    cfg, resolved = load_config_explained(GPU_15B, ["model.dtype=float32", "rollout.vllm.enforce_eager=true",
                                                    "rollout.vllm.gpu_memory_utilization=0.6",
                                                    "rollout.weight_sync.method=object_store",
                                                    "learner.compile=false", "rollout.colocate=false"],
                                   check_paths=False)
    assert (cfg.model.dtype, cfg.rollout.vllm.enforce_eager, cfg.rollout.vllm.gpu_memory_utilization) == \
        ("float32", True, 0.6)
    assert resolved == []
    # a rollout worker sharing its GPU gets 0.85 of its share; a learner on CPUs without bf16 instructions makes
    # the dtype float32 (with them, both roles want bf16)
    cfg = load_config(GPU_15B, ["rollout.gpus_per_worker=0.5", "learner.gpus_per_worker=0"], check_paths=False)
    assert cfg.rollout.vllm.gpu_memory_utilization == 0.425
    assert cfg.model.dtype == ("bfloat16" if cpu_bf16_flags() else "float32")
    assert cfg.rollout.weight_sync.method == "collective"  # one end on CPUs (gloo), but vLLM in its own process
    cfg = load_config(GPU_15B, ["rollout.gpus_per_worker=0.5", "rollout.vllm.multiprocess=false"], check_paths=False)
    assert cfg.rollout.weight_sync.method == "object_store"  # a shared GPU: NCCL refuses two ranks on one
    cfg = load_config(GPU_15B, ["learner.gpus_per_worker=0", "rollout.vllm.multiprocess=false"], check_paths=False)
    assert cfg.rollout.weight_sync.method == "object_store"  # and an engine in the actor's process: as before
    cfg = load_config(QUICKSTART, ["rollout.vllm.multiprocess=true"])
    assert cfg.rollout.weight_sync.method == "collective"
    assert load_config(QUICKSTART, ["rollout.vllm.multiprocess=true", "rollout.engine=hf"]).rollout.weight_sync.method \
        == "object_store"


@pytest.mark.parametrize("override, message", [
    ("rollout.weight_sync.method=nccl", r"rollout\.weight_sync\.method='nccl': must be one of auto, object_store, collective"),
    ("rollout.weight_sync.bucket_mb=0", r"rollout\.weight_sync\.bucket_mb=0\.0: must be > 0"),
    ("rollout.weight_sync.timeout_s=-1", r"rollout\.weight_sync\.timeout_s=-1\.0: must be > 0"),
    ("rollout.weight_sync=collective", r"rollout\.weight_sync='collective': a section, not a value; set its keys "
                                       r"\(rollout\.weight_sync\.method"),
])
def test_bad_weight_sync_settings_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override], check_paths=False)


def test_tensor_parallel_size_fits_the_workers_gpus():
    cfg = load_config(GPU_15B, ["rollout.gpus_per_worker=2", "rollout.vllm.tensor_parallel_size=2"], check_paths=False)
    assert cfg.rollout.vllm.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match=r"rollout.vllm.tensor_parallel_size=4: .*rollout.gpus_per_worker=2"):
        load_config(GPU_15B, ["rollout.gpus_per_worker=2", "rollout.vllm.tensor_parallel_size=4"], check_paths=False)


def test_show_config_prints_what_auto_became():
    import yaml

    proc = subprocess.run([sys.executable, "-m", "orchestrator", "show-config", str(QUICKSTART),
                           "rollout.gpus_per_worker=1", "learner.gpus_per_worker=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)  # still one YAML document: the reasons are comments
    assert shown["model"]["dtype"] == "bfloat16" and shown["rollout"]["vllm"]["enforce_eager"] is False
    comments = [line for line in proc.stdout.splitlines() if line.startswith("#   ")]
    assert any(line.startswith('#   model.dtype: "bfloat16"  # CUDA GPU') for line in comments), comments
    assert any(line.startswith("#   rollout.vllm.gpu_memory_utilization: 0.85  #") for line in comments), comments
