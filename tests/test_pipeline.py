"""DAG runner: concurrency of independent stages, skip on re-run, re-run on a changed config, failures,
and the lineage of a real tiny DAG's final checkpoint read back from MLflow alone."""

import json
import re
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY
from orchestrator import tracking
from orchestrator.pipeline import PipelineError, Stage, StageOutput, check_graph, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _parent(tmp_path, name="p"):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tracking.Tracker.start(uri, "pipeline-test", run_name=name)


def _children(uri, parent_id):
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_independent_stages_run_concurrently(tmp_path):
    spans, lock = {}, threading.Lock()

    def work(ctx):
        t0 = time.perf_counter()
        time.sleep(1.0)
        with lock:
            spans[ctx.name] = (t0, time.perf_counter(), threading.current_thread())
        return StageOutput(outputs={"inputs": sorted(ctx.inputs)}, metrics={"stage/inputs": len(ctx.inputs)})

    stages = [Stage("a", work), Stage("b", work), Stage("c", work, ("a", "b"))]
    uri, parent = _parent(tmp_path)
    with parent:
        res = run_pipeline(stages, parent=parent, root=tmp_path / "out", workload="t", max_concurrency=2,
                           log=lambda *_: None)
    (a0, a1, _), (b0, b1, _), (c0, _, _) = spans["a"], spans["b"], spans["c"]
    assert max(a0, b0) < min(a1, b1), "a and b must overlap"
    assert c0 >= max(a1, b1), "c starts only after its inputs"
    assert res["c"].outputs == {"inputs": ["a", "b"]}
    children = {c.data.tags["budgetrl.stage"]: c for c in _children(uri, parent.run_id)}
    assert set(children) == {"a", "b", "c"}
    assert set(children["c"].data.tags["budgetrl.source_runs"].split(",")) == {res["a"].run_id, res["b"].run_id}
    # the metrics a stage returned were logged by the runner on its run
    assert {n: c.data.metrics["stage/inputs"] for n, c in children.items()} == {"a": 0, "b": 0, "c": 2}

    spans.clear()
    uri, parent = _parent(tmp_path, "serial")
    with parent:
        run_pipeline(stages, parent=parent, root=tmp_path / "out2", workload="t", max_concurrency=1,
                     log=lambda *_: None)
    (a0, a1, ta), (b0, b1, tb) = spans["a"], spans["b"]
    assert a1 <= b0 or b1 <= a0, "max_concurrency=1 runs one stage at a time"
    assert ta is tb is threading.main_thread()  # ... in the calling thread (Ray Train's fit, signal handlers)


def test_rerun_skips_done_stages_and_reruns_changed_ones(tmp_path):
    calls = []

    def make(value):
        def fn(ctx):
            calls.append(ctx.name)
            ckpt = ctx.out_dir / "ckpt"
            ckpt.mkdir()
            (ckpt / "v").write_text(f"{value}:{[i.checkpoint for i in ctx.inputs.values()]}")
            return StageOutput(checkpoint=str(ckpt), dataset_digest=f"d-{ctx.name}")
        return fn

    def stages(a_cfg, b_cfg):
        return [Stage("a", make(a_cfg), (), {"lr": a_cfg}), Stage("b", make(b_cfg), ("a",), {"lr": b_cfg})]

    lines = []

    def go(a_cfg, b_cfg):
        lines.clear()
        uri, parent = _parent(tmp_path, f"{a_cfg}-{b_cfg}")
        with parent:
            return uri, parent.run_id, run_pipeline(stages(a_cfg, b_cfg), parent=parent, root=tmp_path / "out",
                                                    workload="t", log=lines.append)

    _, _, first = go(1, 1)
    assert calls == ["a", "b"] and not first["a"].skipped
    # Progress after each stage, with the time left at the pace of the stages that ran.
    progress = [line for line in lines if " stages done" in line]
    assert re.fullmatch(r"pipeline: 1 of 2 stages done, about \d+ s to go", progress[0]), lines
    assert progress[1:] == ["pipeline: 2 of 2 stages done"], lines
    uri, pid, again = go(1, 1)
    assert calls == ["a", "b"], "same configs: nothing runs again"
    assert again["a"].skipped and again["b"].skipped
    assert again["b"].run_id == first["b"].run_id and again["b"].checkpoint == first["b"].checkpoint
    reused = {c.data.tags["budgetrl.stage"]: c.data.tags for c in _children(uri, pid)}
    assert reused["b"]["budgetrl.reused_run"] == first["b"].run_id
    assert reused["b"]["budgetrl.skipped"] == "true"
    assert not any(k.startswith("budgetrl.stage_run.") for k in reused["b"]), "no parent bookkeeping on children"
    parent_tags = MlflowClient(uri).get_run(pid).data.tags
    assert parent_tags["budgetrl.stage_skipped.a"] == "true"
    assert parent_tags["budgetrl.stage_run.b"] == first["b"].run_id

    go(1, 2)  # only b's config changed
    assert calls == ["a", "b", "b"]
    assert [line for line in lines if " stages done" in line] == [  # a reused: no pace to go by yet
        "pipeline: 1 of 2 stages done", "pipeline: 2 of 2 stages done"], lines
    go(3, 2)  # a changed: b's input changed, so b runs again too
    assert calls == ["a", "b", "b", "a", "b"]
    _, _, last = go(3, 2)
    assert calls == ["a", "b", "b", "a", "b"] and last["b"].skipped

    # A marker whose checkpoint is gone does not count as done.
    import shutil
    shutil.rmtree(last["b"].checkpoint)
    go(3, 2)
    assert calls[-1] == "b" and len(calls) == 6


def test_failure_names_the_stage_and_stops_dependents(tmp_path):
    ran = []

    def ok(ctx):
        ran.append(ctx.name)

    def boom(ctx):
        raise RuntimeError("no good")

    uri, parent = _parent(tmp_path)
    with pytest.raises(PipelineError, match="stage 'bad' failed: RuntimeError: no good") as err:
        with parent:
            run_pipeline([Stage("first", ok), Stage("bad", boom), Stage("after", ok, ("bad",))], parent=parent,
                         root=tmp_path, workload="t", log=lambda *_: None)
    assert list(err.value.results) == ["first"]  # what finished before it, for the workload to report
    assert ran == ["first"]  # "after" never started
    assert MlflowClient(uri).get_run(parent.run_id).info.status == "FAILED"
    with pytest.raises(PipelineError, match="cycle: x -> y -> x"):
        check_graph([Stage("x", ok, ("y",)), Stage("y", ok, ("x",))])
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        check_graph([Stage("x", ok, ("nope",))])
    with pytest.raises(PipelineError, match="defined twice"):
        check_graph([Stage("x", ok), Stage("x", ok)])


def test_tiny_dag_lineage_from_mlflow_alone(ray_session, tiny_model, tmp_path):
    """base -> deduction RL (real train(): Ray, HF rollouts, MLflow) -> merge(deduction RL, base); then the merged
    checkpoint's lineage, read from MLflow alone; a re-run skips every stage and still resolves."""
    from workloads.meta_abilities.recipe import MetaConfig, _merge_stage, _train_stage, stage_configs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"model.path={tiny_model}", "trainer.steps=1", "trainer.prompts_per_step=2", "rollout.group_size=2",
                 "data.train_size=8", "data.eval_size=2", "eval.num_prompts=2", "eval.budgets=[unconstrained]",
                 "eval.max_thinking=16", "eval.max_solution=16", "budget.thinking=16", "budget.solution=16",
                 "learner.micro_batch_size=4", "learner.num_threads=1", f"tracking.tracking_uri={uri}",
                 "tracking.experiment=lineage-test", "rollout.engine=hf"] + [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = MetaConfig(base=str(ROOT / "configs" / "quickstart.yaml"), abilities=["deduction", "induction"],
                     levels=[1], overrides=overrides, run_domain_from_base=False)
    cfg.merge.weights = {"deduction": 1.0, "induction": 0.2}
    trains = stage_configs(cfg)

    def base(ctx):
        return StageOutput(checkpoint=tiny_model, dataset_digest="none")

    stages = [Stage("base", base, (), {"model": tiny_model}),
              Stage("deduction-L1", _train_stage(trains["deduction-L1"], "base"), ("base",), "d1"),
              # the base plays the second specialist: one real RL run keeps the test short
              Stage("merge", _merge_stage(cfg, {"deduction": "deduction-L1", "induction": "base"}),
                    ("deduction-L1", "base"), {"w": [1.0, 0.2]})]

    def go():
        parent = tracking.Tracker.start(uri, "lineage-test", run_name="dag")
        with parent:
            return run_pipeline(stages, parent=parent, root=tmp_path / "stages", workload="meta_abilities",
                                max_concurrency=2, log=lambda *_: None)

    res = go()
    merged = res["merge"].checkpoint
    graph = tracking.lineage_graph(uri, checkpoint=merged)  # MLflow alone: no result objects used below
    nodes = graph["nodes"]
    by_stage = {n["stage"]: (rid, n) for rid, n in nodes.items()}
    assert set(by_stage) == {"merge", "deduction-L1", "base"}
    m_id, m = by_stage["merge"]
    b_id, d_id = by_stage["base"][0], by_stage["deduction-L1"][0]
    assert graph["root"] == m_id and m["checkpoint"] == merged
    assert set(graph["edges"]) == {(d_id, m_id), (b_id, m_id), (b_id, d_id)}
    rid, n = by_stage["deduction-L1"]
    assert n["inputs"] == [b_id] and n["source_checkpoint"] == tiny_model
    assert n["dataset_digest"] and n["checkpoint"] and Path(n["checkpoint"]).is_dir()
    assert n["parent_run_id"] == m["parent_run_id"] and n["config_hash"]
    tags = MlflowClient(uri).get_run(m_id).data.tags
    assert set(json.loads(tags["budgetrl.source_checkpoints"])) == {res["deduction-L1"].checkpoint, tiny_model}
    inputs = {i["stage"]: i for i in json.loads(tags["budgetrl.inputs"])}
    assert inputs["deduction-L1"]["dataset_digest"] == n["dataset_digest"]

    again = go()  # same configs: every stage is skipped, and the lineage still resolves to the producing runs
    assert all(r.skipped for r in again.values())
    assert tracking.lineage_graph(uri, checkpoint=again["merge"].checkpoint)["root"] == m_id
