"""Presets train end to end for a few steps: real Ray, real vLLM, real MLflow (SQLite).

dapo runs with the KL as a reward penalty (the driver asks the learner for each sample's summed k1) and
dynamic sampling (its extra generation rounds counted); gspo with its sequence-level ratio and KL in the loss.
"""

from pathlib import Path

import pytest

from conftest import TINY
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]

PRESET_OVERRIDES = {
    "dapo": ["algorithm.name=dapo", "algorithm.kl_mode=reward", "algorithm.kl_estimator=k1",
             "algorithm.dynamic_sampling.max_tries=2"],
    "gspo": ["algorithm.name=gspo"],
}


@pytest.mark.parametrize("preset", list(PRESET_OVERRIDES))
def test_preset_trains(ray_session, tmp_path, preset):
    from mlflow import MlflowClient

    from orchestrator.trainer import train

    overrides = [f"model.path={tmp_path / 'tiny'}", "model.build_if_missing=tiny", "warmstart.steps=0",
                 "trainer.steps=2",
                 "trainer.prompts_per_step=4", "rollout.group_size=4", f"trainer.output_dir={tmp_path / 'out'}",
                 f"trainer.run_name={preset}", "trainer.state_every=0", "eval.num_prompts=4", "data.eval_size=4",
                 "data.train_size=64", "budgets=[6x4]", "eval.max_thinking=24", "budget.thinking=6",
                 "budget.solution=4", "learner.micro_batch_size=16", "learner.num_threads=1",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=algorithms",
                 "reward.num_workers=0", "rollout.num_workers=1", "rollout.cpus_per_worker=0.5",
                 "algorithm.kl_coef=0.05", *PRESET_OVERRIDES[preset]]
    overrides += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    result = train(cfg, log=lambda *_: None)
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.steps == 2
    assert run.data.params["algorithm.name"] == preset
    assert [m.step for m in client.get_metric_history(result.run_id, "learner/loss")] == [1, 2]
    m = run.data.metrics
    assert m["learner/sequences"] == 16  # every step trains on the batch size
    if preset == "dapo":
        assert run.data.params["algorithm.clip_high"] == "0.28"
        assert 1 <= m["train/dynamic_sampling/tries"] <= 2
        assert m["train/dynamic_sampling/kept_groups"] + m["train/dynamic_sampling/padded_groups"] == 4
        assert "train/kl_reward_mean" in m and m["learner/kl"] == 0.0  # the KL went into the reward
        assert "train/overlong_fraction" in m
    else:
        assert run.data.params["algorithm.policy_loss"] == "gspo"
        assert "train/dynamic_sampling/tries" not in m
        assert m["learner/kl"] >= 0.0
