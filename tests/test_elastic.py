"""Elastic Reasoning recipe: config checks before any work, and a tiny real run's MLflow structure."""

from dataclasses import replace
from pathlib import Path

import pytest

from conftest import TINY
from orchestrator.config import ConfigError, load_config
from workloads.elastic.recipe import ElasticConfig, _stage_configs, comparison_table, format_table, load

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "elastic" / "tiny.yaml"


def test_shipped_config_validates():
    cfg = load(str(CFG))
    stages = _stage_configs(cfg)
    gpu = _stage_configs(load(str(ROOT / "configs" / "elastic" / "deepscaler-1.5b.yaml")), check_paths=False)
    assert gpu["budgeted"].budget.thinking == 1024 and gpu["baseline"].budget.thinking == 8192
    assert stages["budgeted"].budget.thinking < stages["baseline"].budget.thinking
    assert stages["budgeted"].trainer.steps == stages["baseline"].trainer.steps


@pytest.mark.parametrize("name", ["schedules.yaml", "length.yaml", "kimi.yaml"])
def test_shipped_arm_configs_validate(name):
    """Every arm x seed of the issue-23 comparisons loads and validates (what ``workload elastic`` checks before
    training), and each arm's overrides reach its stage: a typo in an arm would otherwise surface an hour in."""
    cfg = load(str(ROOT / "configs" / "elastic" / name))
    stages = _stage_configs(cfg, check_paths=False)
    assert set(stages) == {f"{arm}-s{seed}" for arm in cfg.arms for seed in cfg.seeds}
    for stage in stages.values():
        assert stage.model.dtype == "float32"  # the hinted warm start learns the told budget worse in bf16
    hinted = [n for n, s in stages.items() if s.budget.prompt_hint]
    assert hinted and all(stages[n].budget.schedule.kind == "mixture" for n in hinted)
    priced = [s for s in stages.values() if s.reward.length_penalty > 0]
    assert all(s.reward.length_penalty_on == "correct" for s in priced)  # "all" collapses the policy
    shortened = [s for s in stages.values() if s.algorithm.length_reward > 0]
    assert priced or shortened
    assert all(s.algorithm.length_reward_on == "correct" for s in shortened)  # Kimi's "all" collapses it too
    if "mixture-hint-len-loose-s0" in stages:
        assert stages["mixture-hint-len-loose-s0"].budget.schedule.thinking.weights == [1.0, 1.0, 1.0, 3.0]
    if "mixture-hint-kimi-s1" in stages:  # the goal's arm is the shipped training config, seed aside
        every = load_config(ROOT / "configs" / "elastic" / "every-budget.yaml", check_paths=False)
        arm = stages["mixture-hint-kimi-s1"]
        assert replace(arm, trainer=replace(arm.trainer, run_name=every.trainer.run_name, output_dir=every.trainer.output_dir),
                       rollout=replace(arm.rollout, seed=every.rollout.seed)) == every


@pytest.mark.parametrize("overrides, message", [
    (["baseline=[budget.thinking=8]"], "must exceed"),
    (["baseline=[budget.thinking=64,trainer.steps=3]"], "trainer.steps"),
    (["budgeted=[budget.solution=0]"], "budget.solution=0"),
    (["nonsense=1"], "nonsense"),
])
def test_bad_configs_fail_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _stage_configs(load(str(CFG), overrides))


def test_comparison_table_format():
    rows = [{"budget_label": "16x8", "budget_thinking": 16, "budget_solution": 8, "accuracy": 0.5,
             "mean_tokens": 20.0, "mean_thinking_tokens": 15.0, "truncation_rate": 0.5, "samples": 10}]
    t = comparison_table({"start": rows, "budgeted": rows})
    assert t.num_rows == 2 and set(t.column("model").to_pylist()) == {"start", "budgeted"}
    assert "| 16x8 | 0.500 | 20.0 | 0.500 | 20.0 |" in format_table(t)


def test_stopped_invocation_logs_the_arms_it_finished(tmp_path):
    """A stage failed or stopped: the parent run still gets the table of every arm whose seeds all finished
    (an arm with a seed missing has no mean) and of each finished run."""
    from mlflow import MlflowClient

    from orchestrator import tracking
    from orchestrator.pipeline import StageResult
    from workloads.elastic.recipe import _log_comparison

    def rows(acc, tokens):
        return [{"budget_label": b, "budget_thinking": t, "budget_solution": 8, "accuracy": acc, "mean_tokens": tokens,
                 "mean_thinking_tokens": tokens - 4, "truncation_rate": 0.0, "samples": 8}
                for b, t in (("16x8", 16), ("unconstrained", 64))]

    def done(name, acc):
        return StageResult(name, "k", f"run-{name}", None, None, {"eval_before": rows(0.1, 30.0),
                                                                 "eval_after": rows(acc, 20.0)}, str(tmp_path))

    cfg = replace(load(str(ROOT / "configs" / "elastic" / "schedules.yaml")), seeds=[0, 1])
    finished = {"single-s0": done("single-s0", 0.3), "single-s1": done("single-s1", 0.5),
                "mixture-hint-s0": done("mixture-hint-s0", 0.9)}  # its seed 1 never ran
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = []
    with tracking.Tracker.start(uri, "elastic-partial", run_name="p") as parent:
        out = _log_comparison(cfg, parent, finished, 72.0, lines.append, partial=True)
    means = out["mean_table"].to_pylist()
    assert {r["model"] for r in means} == {"start", "single"}
    assert [r["accuracy"] for r in means if r["model"] == "single"] == pytest.approx([0.4, 0.4])
    assert set(out["table"].column("model").to_pylist()) == {"start", "single-s0", "single-s1", "mixture-hint-s0"}
    assert lines[0].startswith("elastic: comparison of the stages finished so far"), lines
    arts = {a.path for a in MlflowClient(uri).list_artifacts(parent.run_id, "elastic")}
    assert {"elastic/comparison.parquet", "elastic/comparison_mean.parquet", "elastic/comparison.png"} <= arts


def test_tiny_run_nests_stages_under_parent(ray_session, tmp_path):
    from mlflow import MlflowClient

    from workloads.elastic.recipe import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"model.path={tmp_path / 'tiny'}", "warmstart.steps=2", "warmstart.train_size=64",
              "warmstart.batch_size=16", "trainer.steps=1", "trainer.prompts_per_step=2", "rollout.group_size=2",
              f"trainer.output_dir={tmp_path / 'out'}", "eval.num_prompts=6", "data.eval_size=6",
              "data.train_size=32", "eval.budgets=[4x4]", "eval.max_thinking=12", "learner.micro_batch_size=4",
              "learner.num_threads=1", f"tracking.tracking_uri={uri}", "tracking.experiment=elastic-test",
              "rollout.engine=hf"]  # starts faster than vLLM (two runs); test_train_e2e covers vLLM
    common += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = ElasticConfig(base=str(ROOT / "configs" / "quickstart.yaml"), overrides=common,
                        budgeted=["budget.thinking=4"], baseline=["budget.thinking=12"], name="el")
    out = run(cfg, log=lambda *_: None)
    client = MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["budgetrl.workload"] == "elastic"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert {c.data.tags["budgetrl.stage"] for c in children} == {"budgeted", "baseline"}
    assert {c.info.run_id for c in children} == set(out["runs"].values())
    assert {c.data.params["budget.thinking"] for c in children} == {"4", "12"}
    arts = {a.path for a in client.list_artifacts(out["parent_run_id"], "elastic")}
    assert {"elastic/comparison.parquet", "elastic/comparison.png"} <= arts
    assert set(out["table"].column("model").to_pylist()) == {"start", "baseline", "budgeted"}
    # The stage runner: a re-run with the same config reuses both trained stages (a short child run each,
    # tagged with the run that produced it) and rebuilds the same table from their stored evaluations.
    again = run(cfg, log=lambda *_: None)
    assert again["runs"] == out["runs"] and again["table"].equals(out["table"])
    reused = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{again['parent_run_id']}'")
    assert {c.data.tags["budgetrl.stage"]: c.data.tags["budgetrl.reused_run"] for c in reused} == out["runs"]
