"""Supervised fine-tuning on Ray Train: ``TorchTrainer`` workers run the shared SFT loop (``sft.sft_loop``).

Data parallel: ``num_workers`` ranks (gloo on CPU, NCCL with ``use_gpu``), the model wrapped in DDP by
``ray.train.torch.prepare_model``; every rank takes its share of the same global batch, so the
optimisation matches single-process SFT at the same ``batch_size``. Rank 0 writes the result as a
Hugging Face ``save_pretrained`` directory (safetensors, tokenizer) and reports it as a Ray Train
checkpoint, which Ray persists under ``storage_path``; the driver copies it to ``out_dir``. Rank 0 keeps its
loss curve (every ``log_every`` steps) in the checkpoint's metrics; the driver, alone, logs it to an MLflow
run (a ``tracking.Tracker``): no Ray Train worker talks to the tracking store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .sft import METRICS_FILE, _validate

HISTORY = "history"  # the metrics file's key for rank 0's curve: [{"step": s, "loss": ..., ...}, ...]
SFT_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "schedule", "weight_decay", "seed", "dtype", "log_every")


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sft import save_checkpoint, sft_loop

    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sft = config["sft"]
    torch.manual_seed(sft["seed"])
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32)
    device = ray.train.torch.get_device()
    model.to(device)
    forward = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    history: list[dict] = []  # rank 0's curve, returned to the driver in the checkpoint's metrics

    def on_log(step: int, metrics: dict) -> None:
        if rank == 0:
            history.append({"step": step, **metrics})
            print(f"sft: step {step}/{sft['steps']} loss {metrics['loss']:.4f}", flush=True)

    result = sft_loop(model, tokenizer, config["examples"], device=str(device), forward=forward, rank=rank,
                      world_size=world, progress=False, on_log=on_log, **sft)
    result["num_workers"] = world
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, tokenizer, tmp, {"source": config["model_dir"], "num_workers": world, **sft},
                            {**result, HISTORY: history})
            ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(result)


def sft_train_ray(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    log_every: int = 10,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    num_threads: int | None = None,
    storage_path: str | os.PathLike | None = None,
    name: str = "sft",
    tracker=None,
) -> dict:
    """Fine-tune ``model_dir`` on (prompt, target) pairs with a ``TorchTrainer``; the checkpoint lands in
    ``out_dir``. Returns rank 0's metrics (``loss``, ``initial_loss``, ``steps``, ``seconds``, ..., and
    ``history``: its curve), which this driver logs to ``tracker`` (``sft/<name>`` at each logged step)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    examples = [(str(p), str(t)) for p, t in examples]
    # Ray Train workers run in their own working directory: a relative local path must not reach them.
    if Path(model_dir).exists():
        model_dir = Path(model_dir).resolve()
    _validate(examples, steps, batch_size, lr, warmup_steps, schedule, weight_decay, dtype, log_every, num_threads)
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    if batch_size < num_workers:
        raise ValueError(f"batch_size={batch_size} must be at least num_workers={num_workers}")
    sft = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, schedule=schedule,
               weight_decay=weight_decay, seed=seed, dtype=dtype, log_every=log_every)
    out = Path(out_dir).resolve()
    storage = Path(storage_path) if storage_path else out.parent / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"model_dir": str(model_dir), "examples": examples, "sft": sft,
                           "num_threads": num_threads},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"{name}-{os.getpid()}-{abs(hash(str(out))) % 10**8}",
                             storage_path=str(storage.resolve())),
    )
    if not ray.is_initialized():
        raise RuntimeError("sft_train_ray needs a running Ray (ray.init or orchestrator.runtime.init_ray)")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train SFT reported no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # the directory appears complete or not at all
    metrics = json.loads((out / METRICS_FILE).read_text())["metrics"]
    if tracker is not None:
        for point in metrics.get(HISTORY, []):
            tracker.log_metrics({f"sft/{k}": v for k, v in point.items() if k != "step"}, step=point["step"])
    return metrics
