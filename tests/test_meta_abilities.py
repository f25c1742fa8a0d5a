"""Meta-ability DAG recipe: the shipped config resolves to the paper's stage graph and rewards, bad
configs fail before any work, and the comparison table formats. (The DAG runner and a real tiny DAG
are tested in test_pipeline.py; the full tiny DAG's measured run is in docs/meta_abilities.md.)"""

from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.merge import effective_weights
from workloads.meta_abilities.recipe import (build_stages, comparison_table, format_table, load, model_stages,
                                             stage_configs)

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "meta_abilities" / "tiny.yaml"


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-long.yaml", "tiny-wide.yaml"])
def test_shipped_config_builds_the_paper_dag(name):
    cfg = load(str(CFG.parent / name))
    stages = {s.name: s for s in build_stages(cfg)}
    assert stages["deduction-L1"].deps == ("warmstart",) and stages["deduction-L2"].deps == ("deduction-L1",)
    assert set(stages["merge"].deps) == {"deduction-L2", "induction-L2", "abduction-L2"}
    assert stages["domain-from-merged"].deps == ("merge",) and stages["domain-from-base"].deps == ("warmstart",)
    assert {f"eval-{m}" for m in model_stages(cfg)} <= set(stages)
    assert set(model_stages(cfg)) == {"base", "deduction", "induction", "abduction", "merged", "domain-from-base",
                                      "domain-from-merged"}
    trains = stage_configs(cfg, check_paths=False)
    r = trains["abduction-L2"].reward
    assert (r.correct_reward, r.wrong_reward, r.format_weight) == (2.0, -1.5, 1.0)
    assert r.format_fn == "workloads.tasks.logic:meta_ability_format_prefilled"
    assert trains["abduction-L2"].data.difficulties == [2] and trains["abduction-L2"].data.task == "abduction"
    d = trains["domain-from-merged"].reward
    assert (d.correct_reward, d.wrong_reward, d.format_weight) == (1.0, 0.0, 0.0)
    assert trains["domain-from-merged"].data.task == "addition"
    assert effective_weights([cfg.merge.weights[a] for a in cfg.abilities], cfg.merge.normalize) == \
        pytest.approx([0.769, 0.154, 0.077], abs=1e-3)


def test_level_one_config_merges_by_task_arithmetic_and_samples_its_table():
    cfg = load(str(CFG.parent / "tiny-rl.yaml"))
    stages = {s.name: s for s in build_stages(cfg)}
    # task arithmetic adds each change to the warm start, so the merge reads it too
    assert set(stages["merge"].deps) == {"deduction-L1", "induction-L1", "abduction-L1", "warmstart"}
    assert "deduction-L2" not in stages
    assert cfg.merge.method == "task_arithmetic" and not cfg.merge.normalize
    assert effective_weights([cfg.merge.weights[a] for a in cfg.abilities], cfg.merge.normalize) == [1.0, 1.0, 1.0]
    assert (cfg.evaluation.temperature, cfg.evaluation.samples) == (0.7, 4)
    trains = stage_configs(cfg, check_paths=False)
    t = trains["induction-L1"]
    assert (t.trainer.steps, t.trainer.prompts_per_step, t.rollout.group_size, t.learner.lr) == (80, 8, 8, 4e-5)
    assert t.data.train_size >= t.trainer.steps * t.trainer.prompts_per_step  # each prompt seen once


@pytest.mark.parametrize("overrides, message", [
    (["abilities=[deduction,telepathy]"], "telepathy"),
    (["levels=[1,6]"], "levels"),
    (["merge.weights={deduction: 0.0, induction: 0.0, abduction: 0.0}"], "sum to 0"),
    (["max_concurrency=0"], "max_concurrency"),
    (["merge.method=ties"], "merge.method='ties'"),
    (["per_ability={telepathy: [trainer.steps=5]}"], "per_ability.telepathy"),
    (["per_ability={deduction: [rollout.group_size=0]}"], "rollout.group_size=0"),
    (["ability=[budget.solution=0]"], "budget.solution=0"),
    (["nonsense=1"], "nonsense"),
    (["evaluation.temperature=-0.5"], "evaluation.temperature=-0.5"),
    (["evaluation.samples=0"], "evaluation.samples=0"),
    (["evaluation.samples=4"], "evaluation.samples=4 with evaluation.temperature=0"),
])
def test_bad_configs_fail_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_stages(load(str(CFG), overrides))


def test_fewer_abilities_ignore_other_weights():
    cfg = load(str(CFG), ["abilities=[deduction,induction]"])
    assert {s.name for s in build_stages(cfg) if s.name.startswith("eval-")} == {
        "eval-base", "eval-deduction", "eval-induction", "eval-merged", "eval-domain-from-base",
        "eval-domain-from-merged"}


def test_per_ability_overrides_touch_only_that_ability():
    from orchestrator.pipeline import stage_key

    a = {s.name: s for s in build_stages(load(str(CFG)))}
    b = {s.name: s for s in build_stages(load(str(CFG), ["per_ability={deduction: [rollout.group_size=16]}"]))}
    trains = stage_configs(load(str(CFG), ["per_ability={deduction: [rollout.group_size=16]}"]))
    assert trains["deduction-L1"].rollout.group_size == trains["deduction-L2"].rollout.group_size == 16
    assert trains["induction-L1"].rollout.group_size == stage_configs(load(str(CFG)))["induction-L1"].rollout.group_size
    assert a["deduction-L1"].config != b["deduction-L1"].config
    for name in ("induction-L1", "abduction-L2", "domain-from-base", "warmstart"):
        assert stage_key(a[name], {}) == stage_key(b[name], {}), name


def test_task_arithmetic_merge_reads_the_warm_start_too():
    cfg = load(str(CFG), ["merge.method=task_arithmetic", "merge.normalize=false",
                          "merge.weights={deduction: 1.0, induction: 1.0, abduction: 1.0}"])
    stages = {s.name: s for s in build_stages(cfg)}
    assert set(stages["merge"].deps) == {"deduction-L2", "induction-L2", "abduction-L2", "warmstart"}
    assert stages["merge"].config["method"] == "task_arithmetic"


def test_changing_one_stage_changes_only_its_key_and_downstream():
    from orchestrator.pipeline import stage_key

    a = {s.name: s for s in build_stages(load(str(CFG)))}
    b = {s.name: s for s in build_stages(load(str(CFG), ["merge.weights={deduction: 1.0, induction: 0.5, "
                                                         "abduction: 0.1}"]))}
    assert a["deduction-L2"].config == b["deduction-L2"].config
    assert a["merge"].config != b["merge"].config
    assert stage_key(a["warmstart"], {}) == stage_key(b["warmstart"], {})


def test_comparison_table_format():
    rows = {"base": [{"task": "deduction", "level": 1, "accuracy": 0.25}],
            "merged": [{"task": "deduction", "level": 1, "accuracy": 0.5}]}
    text = format_table(comparison_table(rows))
    assert "| model | deduction L1 |" in text and "| merged | 0.500 |" in text


def test_sampled_evaluation_reruns_only_the_eval_stages():
    from orchestrator.pipeline import stage_key

    a = {s.name: s for s in build_stages(load(str(CFG)))}
    b = {s.name: s for s in build_stages(load(str(CFG), ["evaluation.temperature=0.7", "evaluation.samples=4"]))}
    for name in a:
        same = stage_key(a[name], {}) == stage_key(b[name], {})
        assert same == (not name.startswith("eval-")), name
    assert all(s["temperature"] == 0.7 and s["samples"] == 4 for s in b["eval-merged"].config["suites"])
    assert all("temperature" not in s for s in a["eval-merged"].config["suites"])  # greedy keys unchanged


def test_evaluate_suites_goes_through_evaluate_checkpoint_per_task_and_level(ray_session, tiny_model, tmp_path):
    """One rollout group for every suite; each suite's own prompts, verifier, budget and sampling (four
    samples at temperature 0.8 here): one row per task and level, records written per task."""
    from conftest import TINY
    from orchestrator.config import load_config
    from workloads.meta_abilities.recipe import evaluate_suites

    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"model.path={tiny_model}", "rollout.cpus_per_worker=0.5", "reward.num_workers=1"]
                      + [f"model.tiny.{k}={v}" for k, v in TINY.items()])
    suites = [{"task": "addition", "difficulties": [1, 2], "num": 4, "max_thinking": 12, "max_solution": 4,
               "temperature": 0.8, "samples": 4}]
    rows = evaluate_suites(cfg, tiny_model, suites, seed=3, out_dir=tmp_path)
    assert [(r["task"], r["level"], r["samples"]) for r in rows] == [("addition", 1, 8), ("addition", 2, 8)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0 <= r["mean_tokens"] <= 12 + 4 for r in rows)  # within the budget
    assert (tmp_path / "eval" / "addition.parquet").is_file()
