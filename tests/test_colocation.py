"""Colocation (``rollout.colocate``): the HF engine inside learner rank 0's process.

What ``auto`` becomes and why, the refusal of an explicit ``true`` that cannot be honoured (naming the
key), and one real run on the shared Ray runtime: one actor holds both roles and every sync reaches the
engine in memory (its sampled logprobs after training are the final checkpoint's)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import TINY
from orchestrator.config import ConfigError, load_config, load_config_explained

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _resolved(*overrides):
    cfg, res = load_config_explained(QUICKSTART, list(overrides), check_paths=False)
    why = {r.key: r.why for r in res}
    return cfg.rollout.colocate, why.get("rollout.colocate", "")


def test_auto_colocates_one_hf_engine_with_one_learner_rank_on_cpus():
    assert _resolved("rollout.engine=hf") == (True, _resolved("rollout.engine=hf")[1])
    assert "learner's process" in _resolved("rollout.engine=hf")[1]
    for overrides, reason in [
        ((), "rollout.engine=vllm"),  # the quickstart's engine
        (("rollout.engine=hf", "rollout.num_workers=2"), "rollout.num_workers=2"),
        (("rollout.engine=hf", "learner.num_workers=2"), "learner.num_workers=2"),
        (("rollout.engine=hf", "trainer.off_policy_steps=1"), "trainer.off_policy_steps=1"),
        (("rollout.engine=hf", "rollout.weight_sync.method=collective"), "rollout.weight_sync.method=collective"),
        (("rollout.engine=hf", "rollout.gpus_per_worker=1"), "GPUs"),
        (("rollout.engine=hf", "rollout.resources={rollout_gpu: 1}"), "custom resources"),
    ]:
        value, why = _resolved(*overrides)
        assert value is False and reason in why, (overrides, value, why)
    assert _resolved("rollout.engine=hf", "rollout.colocate=false") == (False, "")  # not auto: nothing resolved


@pytest.mark.parametrize("change, message", [
    ("rollout.num_workers=2", "rollout.num_workers=2"),
    ("learner.num_workers=2", "learner.num_workers=2"),
    ("trainer.off_policy_steps=1", "trainer.off_policy_steps=1"),
    ("rollout.weight_sync.method=collective", "rollout.weight_sync.method=collective"),
])
def test_explicit_colocation_that_cannot_hold_names_the_key(change, message):
    with pytest.raises(ConfigError, match=rf"rollout\.colocate=true: .*{message.replace('.', '[.]')}"):
        load_config(QUICKSTART, ["rollout.engine=hf", "rollout.colocate=true", change], check_paths=False)
    with pytest.raises(ConfigError, match=r"rollout\.colocate=true: .*rollout\.engine=vllm"):
        load_config(QUICKSTART, ["rollout.colocate=true"], check_paths=False)
    with pytest.raises(ConfigError, match=r"rollout\.colocate='sometimes': must be true, false or auto"):
        load_config(QUICKSTART, ["rollout.colocate=sometimes"], check_paths=False)


def test_colocated_run_keeps_one_actor_syncs_in_memory_and_survives_its_loss(ray_session, tiny_model, tmp_path):
    """The colocated actor killed after step 2's state: the trainer rebuilds it (learner and engine) from
    that state and goes on; every step once, and the engine's sampled logprobs at the end are the final
    checkpoint's (the syncs after the rebuild reached it too)."""
    from mlflow import MlflowClient

    from conftest import hf_logprobs, kill_actors_when, state_step
    from orchestrator.trainer import train

    steps = 4
    overrides = [f"model.path={tiny_model}", "model.build_if_missing=none", "warmstart.steps=0",
                 "rollout.engine=hf", f"trainer.steps={steps}", "trainer.state_every=1", "trainer.prompts_per_step=4",
                 "rollout.group_size=4",
                 f"trainer.output_dir={tmp_path / 'out'}", "trainer.run_name=co", "eval.num_prompts=8",
                 "data.eval_size=8", "data.train_size=32", "budgets=[6x4,unconstrained]", "eval.max_thinking=16",
                 "budget.thinking=6", "budget.solution=4", "learner.micro_batch_size=8", "reward.num_workers=0",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=co",
                 # a signal a random tiny model has (lengths vary within a group) and a large step: the weights move
                 "reward.length_penalty=0.5", "learner.lr=1e-3", "rollout.temperature=1.0", "model.dtype=float32",
                 *[f"model.tiny.{k}={v}" for k, v in TINY.items()]]
    cfg = load_config(QUICKSTART, overrides)
    assert cfg.rollout.colocate is True
    out = tmp_path / "out" / "co"
    killer, killed = kill_actors_when(lambda: state_step(out) >= 2, "ColocatedLearner")
    result = train(cfg, log=lambda *_: None)
    killer.join(30)
    assert len(killed) == 1 and result.restarts == 1, (killed, result.restarts)

    place = json.loads((out / "result.json").read_text())["placement"]
    assert len(place["rollout"]) == len(place["learner"]) == 1
    assert place["rollout"][0]["node_id"] == place["learner"][0]["node_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.metrics["rollout/worker_0/colocated"] == 1.0
    assert run.data.metrics["rollout/worker_0/policy_version"] == steps
    assert run.data.tags["budgetrl.rollout.weight_sync"] == "in_process"
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result.run_id, "train/reward")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))

    # The engine sampled the final eval with the learner's final weights (copied in memory at each sync).
    rows = pq.read_table(out / "eval" / f"step_{steps:04d}.parquet").to_pylist()
    assert {r["policy_version"] for r in rows} == {steps}
    final, start = hf_logprobs(str(out / "checkpoint"), rows), hf_logprobs(tiny_model, rows)
    own = [(np.array([x if x is not None else np.nan for x in r["response_logprobs"]]), np.array(r["injected"]))
           for r in rows]
    diff_final = max(np.nanmax(np.abs(lp[~inj] - f[~inj])) for (lp, inj), f in zip(own, final))
    diff_start = max(np.nanmax(np.abs(lp[~inj] - s[~inj])) for (lp, inj), s in zip(own, start))
    assert diff_final < 2e-3, diff_final
    assert diff_start > 10 * max(diff_final, 1e-4), (diff_start, diff_final)
