"""Sweeps: config validation before anything starts, a real tiny sweep (Tune + Optuna + MLflow), resume.

- Bad sweep configs fail in load_sweep (no Ray, no study, no files) naming the key and the value.
- One real sweep, shared by the tests below (``swept``), logged to a real ``mlflow server`` on 127.0.0.1:
  two tiny training runs one at a time, a trial killed (retried) and then the driver killed and run again
  (the finished trial is kept, the interrupted one continues its own run from its last state, none runs
  twice); then a second invocation extends the study by two concurrent runs. What the MLflow UI reads is
  checked over its REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import yaml

from conftest import TINY, free_port, start_mlflow_server, stop_mlflow_server
from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _tiny_base_overrides(tmp: Path, model: str) -> list[str]:
    """A training run of a few seconds: tiny model, HF engine, 1 RL step, 4 eval prompts x 2 budgets."""
    return [f"model.path={model}", "model.build_if_missing=none", "warmstart.steps=0",
            "rollout.engine=hf", "rollout.group_size=2", "trainer.steps=1", "trainer.prompts_per_step=2",
            "trainer.eval_every=0",
            "trainer.log_samples_every=0", f"trainer.output_dir={tmp / 'out'}", "eval.num_prompts=4",
            "data.eval_size=4", "data.train_size=16", "eval.budgets=[6x4,unconstrained]", "eval.max_thinking=12",
            "eval.max_solution=4", "budget.thinking=6", "budget.solution=4", "learner.micro_batch_size=8",
            "learner.num_threads=1", "reward.num_workers=0",
            *[f"model.tiny.{k}={v}" for k, v in TINY.items()]]


def _write_sweep(tmp: Path, model: str, **extra) -> Path:
    doc = {
        "base_config": str(QUICKSTART),
        "base_overrides": _tiny_base_overrides(tmp, model),
        "study_name": "tiny",
        "num_trials": 2,
        "max_concurrency": 2,
        "storage": f"sqlite:///{tmp / 'study' / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "experiment": "sweep-test",
        "sampler": "random",
        "space": {
            "budget.thinking_fraction": {"type": "float", "low": 0.4, "high": 0.8},
            "learner.lr": {"type": "log_float", "low": 1e-5, "high": 1e-3},
            "algorithm.kl_coef": {"type": "categorical", "choices": [0.0, 0.01]},
        },
        "objectives": [{"metric": "accuracy", "budget": "6x4"}, {"metric": "mean_tokens", "budget": "unconstrained"}],
    }
    for k, v in extra.items():
        doc[k] = v
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Validation (fast, no Ray)


@pytest.fixture()
def model_dir(tmp_path) -> str:
    d = tmp_path / "model"  # validation only checks the path exists
    d.mkdir()
    return str(d)


BAD = [
    ({"space": {}}, "space={}: empty search space"),
    ({"space": {"learner.lr": {"type": "float", "low": 1e-3, "high": 1e-4}}},
     "space['learner.lr'].low=0.001: greater than high"),
    ({"space": {"learner.lr": {"type": "uniform", "low": 1e-5, "high": 1e-4}}},
     "space['learner.lr'].type='uniform': unknown parameter type"),
    ({"space": {"learner.lrr": {"type": "float", "low": 1e-5, "high": 1e-4}}},
     "space['learner.lrr']='learner.lrr': not a key of the training config schema"),
    ({"space": {"rollout.group_size": {"type": "float", "low": 2, "high": 8}}},
     "rollout.group_size is an int"),
    ({"space": {"budget.total": {"type": "int", "low": 8, "high": 4096}}},
     "gives an invalid training config: model.max_model_len=256"),
    ({"space": {"algorithm.kl_coef": {"type": "categorical", "choices": []}}},
     "space['algorithm.kl_coef'].choices=[]: empty"),
    ({"objectives": [{"metric": "speed"}]}, "objectives[0].metric='speed': unknown objective"),
    ({"objectives": [{"metric": "accuracy", "budget": "9x9"}]}, "objectives[0].budget='9x9': not in the base"),
    ({"objectives": [{"metric": "cost", "mode": "up"}]}, "objectives[0].mode='up': must be max or min"),
    ({"objectives": [{"metric": "hypervolume", "reference": {"accuracy": 0.0, "tokens": -5}}]},
     "objectives[0].reference.tokens=-5: must be a number of tokens > 0"),
    ({"objectives": [{"metric": "hypervolume", "reference": {"accuracy": 1.0}}]},
     "objectives[0].reference.accuracy=1.0: must be in [0, 1)"),
    ({"objectives": [{"metric": "hypervolume", "reference": {"acc": 0.0}}]},
     "objectives[0].reference.acc=0.0: unknown key"),
    ({"objectives": [{"metric": "hypervolume", "reference": {"tokens": "many"}}]},
     "objectives[0].reference.tokens='many': must be a number"),
    ({"objectives": [{"metric": "hypervolume", "budgets": ["6x4", "9x9"]}]}, "objectives[0].budgets='9x9': not in the base"),
    ({"objectives": [{"metric": "hypervolume", "tokens": "cost"}]}, "objectives[0].tokens='cost': the token axis"),
    ({"objectives": [{"metric": "hypervolume", "budget": "6x4"}]}, "objectives[0].budget='6x4': a hypervolume objective"),
    ({"objectives": [{"metric": "hypervolume", "mode": "min"}]}, "objectives[0].mode='min': a hypervolume is maximized"),
    ({"objectives": [{"metric": "accuracy", "budget": "6x4", "reference": {"accuracy": 0.0}}]},
     "objectives[0].reference={'accuracy': 0.0}: only a hypervolume objective takes reference"),
    ({"storage": "sqlite:///{tmp}/a-file/optuna.db"}, "/a-file/optuna.db': cannot create or write"),
    ({"storage": "postgresql://u:secret@127.0.0.1:9/optuna"}, "storage='postgresql://u:***@127.0.0.1:9/optuna'"),
    ({"storage": "not a url"}, "storage='not a url': not a SQLAlchemy database URL"),
    ({"max_concurrency": 0}, "max_concurrency=0: must be >= 1"),
    ({"study_name": "a b"}, "study_name='a b'"),
    ({"base_overrides": ["budget.thinking=-1"]}, "budget.thinking=-1: must be > 0"),
    ({"early_stopping": {"enabled": True}}, "early_stopping.enabled=True: needs intermediate evals"),
    ({"spcae": {}}, "spcae"),
    ({"sampler": "grid"}, "space['budget.thinking_fraction'].type='float': sampler 'grid' needs categorical"),
    ({"space": {"budget.schedule.thinking.values": {"type": "categorical", "choices": ["[4, 6]", "6"]}}},
     "space['budget.schedule.thinking.values'].choices='6': each choice of a list key is a YAML list"),
    ({"space": {"budget.schedule.thinking.values": {"type": "float", "low": 1, "high": 2}}},
     "space['budget.schedule.thinking.values'].type='float': a list key is searched as categorical"),
    ({"space": {"budget.schedule.kind": {"type": "categorical", "choices": ["fixed", "curriculum"]}}},
     "the point {budget.schedule.kind='curriculum'} gives an invalid training config: budget.schedule.ladder=[]"),
    ({"sampler": "grid", "num_trials": 3, "space": {"algorithm.kl_coef": {"type": "categorical", "choices": [0.0, 0.1]}}},
     "num_trials=3: the grid has 2 points"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_sweep_config_fails_before_anything_starts(tmp_path, model_dir, change, message):
    from orchestrator.sweep import load_sweep

    if "{tmp}" in change.get("storage", ""):  # a storage path below a regular file
        (tmp_path / "a-file").write_text("")
        change = {"storage": change["storage"].format(tmp=tmp_path)}
    path = _write_sweep(tmp_path, model_dir, **change)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert message in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no study, no mlflow.db, no outputs


def test_cli_bad_sweep_exits_2_with_one_line(tmp_path, model_dir):
    path = _write_sweep(tmp_path, model_dir, space={})
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(path), "num_trials=3"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["config error: space={}: empty search space; give at least one parameter"]
    assert not (tmp_path / "study").exists() and not (tmp_path / "mlflow.db").exists()


def test_sweep_overrides_and_derived_budgets(tmp_path, model_dir):
    from orchestrator.sweep import base_budget, derive_params, load_sweep

    plan = load_sweep(_write_sweep(tmp_path, model_dir), ["num_trials=5", "base.trainer.steps=3"])
    assert plan.sweep.num_trials == 5 and plan.base.trainer.steps == 3
    assert [o.name for o in plan.objectives] == ["accuracy_6x4", "mean_tokens_unconstrained"]
    assert plan.frontier_budget == "6x4"
    bb = base_budget(plan.base)
    assert (bb.thinking, bb.solution) == (6, 4)
    # Total from the base (6 + 4 = 10) when only the fraction is searched; both budgets >= 1.
    assert derive_params({"budget.thinking_fraction": 0.7}, bb) == {"budget.thinking": 7, "budget.solution": 3}
    assert derive_params({"budget.total": 32, "budget.thinking_fraction": 0.99}, bb) == {
        "budget.thinking": 31, "budget.solution": 1}
    assert derive_params({"budget.total": 20, "learner.lr": 1e-4}, bb) == {
        "budget.thinking": 12, "budget.solution": 8, "learner.lr": 1e-4}


def test_schedule_space_lists_and_texts_reach_the_trial_config(tmp_path, model_dir):
    """A list key is searched over whole lists (YAML text choices); a string key's value stays text even when
    it looks like YAML ("[think {thinking}] "); each trial's overrides give exactly those values."""
    from orchestrator.config import load_config
    from orchestrator.sweep import base_budget, load_sweep
    from orchestrator.sweep.config import param_overrides

    space = {"budget.schedule.thinking.values": {"type": "categorical", "choices": ["[4, 6]", "[2, 4, 6]"]},
             "budget.prompt_hint": {"type": "categorical", "choices": ["", "[think {thinking}] "]},
             "budget.schedule.kind": {"type": "categorical", "choices": ["fixed", "mixture"]}}
    path = _write_sweep(tmp_path, model_dir, space=space)
    plan = load_sweep(path)  # every choice probed against the base config
    params = {"budget.schedule.thinking.values": "[2, 4, 6]", "budget.prompt_hint": "[think {thinking}] ",
              "budget.schedule.kind": "mixture"}
    overrides = param_overrides(params, base_budget(plan.base))
    assert 'budget.prompt_hint="[think {thinking}] "' in overrides and "budget.schedule.thinking.values=[2, 4, 6]" in overrides
    cfg = load_config(QUICKSTART, [*_tiny_base_overrides(tmp_path, model_dir), *overrides], check_paths=False)
    assert cfg.budget.prompt_hint == "[think {thinking}] " and list(cfg.budget.schedule.thinking.values) == [2, 4, 6]
    assert cfg.budget.schedule.kind == "mixture"


def test_hypervolume_objective_resolves_its_defaults(tmp_path, model_dir, capsys):
    """A hypervolume objective: all eval budgets and accuracy 0 by default; the token reference is the
    largest limit on its axis (unconstrained: 12 + 4 tokens, 12 thinking); shown by --check."""
    from orchestrator.cli import main
    from orchestrator.sweep import StaircaseArea, load_sweep

    objectives = [{"metric": "hypervolume"}, {"metric": "hypervolume", "tokens": "mean_thinking_tokens",
                                              "budgets": ["6x4"], "reference": {"accuracy": 0.25}}]
    path = _write_sweep(tmp_path, model_dir, objectives=objectives)
    plan = load_sweep(path)
    assert [(o.name, o.mode, o.budget) for o in plan.objectives] == [
        ("hypervolume", "max", None), ("hypervolume_mean_thinking_tokens", "max", None)]
    assert plan.objectives[0].area == StaircaseArea("mean_tokens", ("6x4", "unconstrained"), 0.0, 16.0)
    assert plan.objectives[1].area == StaircaseArea("mean_thinking_tokens", ("6x4",), 0.25, 6.0)
    assert main(["sweep", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "objectives: max hypervolume, max hypervolume_mean_thinking_tokens" in out
    assert "hypervolume: area under accuracy vs mean_tokens over budgets ['6x4', 'unconstrained'], " \
           "reference accuracy 0, tokens 16" in out


def test_grid_sampler_runs_every_combination_once(tmp_path, model_dir):
    import optuna

    from orchestrator.sweep import load_sweep
    from orchestrator.sweep.study import distributions, make_sampler

    space = {"algorithm.name": {"type": "categorical", "choices": ["grpo", "rloo", "gspo"]},
             "rollout.seed": {"type": "categorical", "choices": [0, 1]}}
    plan = load_sweep(_write_sweep(tmp_path, model_dir, sampler="grid", num_trials=6, space=space))
    study = optuna.create_study(directions=["maximize"], sampler=make_sampler(plan.sweep, 0))
    dists = distributions(plan.sweep.space)
    seen = []
    for _ in range(6):
        trial = study.ask(dists)
        seen.append((trial.params["algorithm.name"], trial.params["rollout.seed"]))
        study.tell(trial, 0.5)  # the last point's tell must not raise (Optuna's grid calls study.stop())
    assert sorted(seen) == sorted((a, s) for a in ("grpo", "rloo", "gspo") for s in (0, 1))


def test_shipped_sweep_configs_validate():
    from orchestrator.sweep import load_sweep

    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        plan = load_sweep(f)
        assert plan.sweep.num_trials >= 1
    quick = load_sweep(ROOT / "configs" / "sweeps" / "quickstart.yaml")
    assert quick.sweep.num_trials >= 8 and quick.sweep.max_concurrency == 2


def test_pareto_median_stopping_rule():
    from orchestrator.sweep import Objective, dominated_share

    objs = [Objective("acc", "accuracy", "6x4", "max"), Objective("tok", "mean_tokens", "6x4", "min")]
    me = {"acc": 0.5, "tok": 10.0}
    peers = [{"acc": 0.6, "tok": 9.0}, {"acc": 0.5, "tok": 10.0}, {"acc": 0.9, "tok": 20.0},
             {"acc": float("nan"), "tok": 1.0}]
    assert dominated_share(me, peers, objs) == 0.25  # only the first dominates; ties and NaN do not
    assert dominated_share({"acc": float("nan"), "tok": 1.0}, peers, objs) == 0.0


# ---------------------------------------------------------------------------------------------
# A real sweep (Ray Tune + Optuna + MLflow + real tiny training runs)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the real sweep: what the MLflow UI reads, over REST."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


# The shared sweep's setup (two invocations, two faults, four training runs, two of them twice) runs inside the
# timeout of the first test that asks for it: pytest-timeout counts fixture setup. 600 s (pyproject.toml) is
# about twice what it takes on an idle 2-core machine with the other xdist worker busy; under heavier load it ran
# out, so these get 1,200 s.
SWEPT_TIMEOUT = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def swept(ray_session, tiny_model, tmp_path_factory, mlflow_server):
    """One study, three invocations, logged to a real ``mlflow server`` (what the UI reads). Invocation 001:
    ``python -m orchestrator sweep`` (its own local Ray; one trial at a time, retries 1, 4 steps a trial),
    trial 0's process SIGKILLed mid-run (Tune retries it), then the driver and its Ray SIGKILLed while trial 1
    trains; the same command again resumes it. Invocation 002 (in this process, ``run_sweep``) extends the
    study by two concurrent trials. The fault scenario and the records tests share these runs (one sweep's
    cost in the suite, not two)."""
    from orchestrator.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    steps = 4
    base = [o for o in _tiny_base_overrides(tmp, tiny_model) if not o.startswith("trainer.steps=")]
    base += [f"trainer.steps={steps}", "trainer.state_every=1", "tracking.system_metrics_interval_s=0.5"]
    path = _write_sweep(tmp, tiny_model, num_trials=2, max_concurrency=1, retries=1, base_overrides=base,
                        tracking_uri=mlflow_server, objectives=[
                            {"metric": "accuracy", "budget": "6x4"}, {"metric": "mean_tokens", "budget": "unconstrained"},
                            {"metric": "hypervolume"}])  # + each model's own accuracy-vs-tokens hypervolume
    command = [sys.executable, "-m", "orchestrator", "sweep", str(path), "resources.ray_num_cpus=4"]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    storage = f"sqlite:///{tmp / 'study' / 'optuna.db'}"
    dirs = [tmp / "out" / f"tiny-t000{i}" for i in (0, 1)]
    first_log = tmp / "first.log"
    t0 = time.perf_counter()
    with open(first_log, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            root = psutil.Process(proc.pid)
            _wait_for(lambda: _state_step(dirs[0]) >= 1, proc, 600, "trial 0's first state", first_log, storage)
            pids = _wait_for(lambda: _trial_pids(root), proc, 30, "trial 0's process", first_log, storage)
            os.kill(pids[0], signal.SIGKILL)  # the trial's process dies mid-run: Tune retries it
            killed_at = time.time()
            _wait_for(lambda: _state_step(dirs[1]) >= 1, proc, 600, "trial 1's first state", first_log, storage)
            os.killpg(proc.pid, signal.SIGKILL)  # then the driver and the local Ray runtime it started
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    states_after_kill = dict(_study_states(storage))
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    t1 = time.perf_counter()
    second = run_sweep(path, ["num_trials=2", "max_concurrency=2"], log=lambda *_: None)
    t2 = time.perf_counter()
    print(f"\nsweep wall: killed + resumed invocation {t1 - t0:.1f}s, second invocation {t2 - t1:.1f}s")
    return SimpleNamespace(tmp=tmp, path=path, second=second, uri=mlflow_server, storage=storage, base=base,
                           steps=steps, dirs=dirs, killed_at=killed_at, states_after_kill=states_after_kill,
                           rerun_stdout=rerun.stdout)


@SWEPT_TIMEOUT
def test_sweep_records_trials_in_study(swept):
    import optuna

    second, uri = swept.second, swept.uri
    assert second.finished and second.invocation == "002"
    study = optuna.load_study(study_name="tiny", storage=swept.storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.state, t.user_attrs.get("budgetrl.error"))
                                                               for t in trials]
    assert [t.user_attrs["budgetrl.invocation"] for t in trials] == ["001", "001", "002", "002"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    from orchestrator.frontier import model_hypervolume

    for t in trials:
        # The objectives are the run's final eval as logged: accuracy at 6x4, mean tokens unconstrained
        # (generated, so above 0, and at most eval.max_thinking 12 + max_solution 4), and the area of
        # the run's own eval table (reference: accuracy 0, tokens 16), which its run logs too.
        run_id = t.user_attrs["budgetrl.run_id"]
        m = client.get_run(run_id).data.metrics
        rows = json.loads(Path(client.download_artifacts(run_id, "eval/summary.json",
                                                         str(swept.tmp / run_id))).read_text())
        assert sorted(r["budget_label"] for r in rows["after"]) == ["6x4", "unconstrained"]
        hv = model_hypervolume(rows["after"], {"accuracy": 0.0, "tokens": 16.0})
        assert t.values == pytest.approx([m["eval/6x4/accuracy"], m["eval/unconstrained/mean_tokens"], hv])
        assert m["sweep/hypervolume"] == pytest.approx(hv) and 0.0 <= hv <= 16.0
        assert 0.0 <= t.values[0] <= 1.0 and 0.0 < t.values[1] <= 16.0
        assert set(t.params) == {"budget.thinking_fraction", "learner.lr", "algorithm.kl_coef"}
    invs = study.user_attrs["budgetrl.invocations"]
    assert [i["status"] for i in invs] == ["finished", "finished"]
    assert invs[1]["parent_run_id"] == second.parent_run_id
    # The study's front is what the parent run reports.
    assert sorted(second.front) == sorted(t.number for t in study.best_trials)


@SWEPT_TIMEOUT
def test_sweep_parent_and_child_runs(swept):
    from mlflow import MlflowClient

    import optuna

    second, uri = swept.second, swept.uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("budgetrl.workload") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    invs = optuna.load_study(study_name="tiny", storage=swept.storage).user_attrs["budgetrl.invocations"]
    first_parent = invs[0]["parent_run_id"]  # the killed driver's parent run, resumed by its rerun
    assert {p.info.run_id for p in parents} == {first_parent, second.parent_run_id}
    assert all(p.data.tags["budgetrl.study"] == "tiny" and p.info.status == "FINISHED" for p in parents)
    by_parent = {}
    for c in children:
        by_parent.setdefault(c.data.tags["mlflow.parentRunId"], []).append(c)
    assert len(by_parent[first_parent]) == 2 and len(by_parent[second.parent_run_id]) == 2
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["budgetrl.study"] == "tiny" and c.data.tags["budgetrl.trial"] in {"0", "1", "2", "3"}
        m = c.data.metrics
        for key in ("cost/total", "cost/cpu_hours", "cost/accelerator_hours", "cost/run_wall_seconds",
                    "cost/generated_tokens_total", "sweep/accuracy_6x4", "eval/6x4/accuracy"):
            assert key in m, key
        assert m["cost/accelerator_hours"] == 0.0 and m["cost/cpu_hours"] > 0 and m["cost/total"] > 0


@SWEPT_TIMEOUT
def test_sweep_frontier_artifacts(swept):
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    tmp, second, uri = swept.tmp, swept.second, swept.uri
    client = MlflowClient(uri)
    run = client.get_run(second.parent_run_id)
    arts = {a.path for a in client.list_artifacts(second.parent_run_id, "frontier")}
    for name in ("trials.parquet", "accuracy_vs_tokens.parquet", "accuracy_vs_tokens.png",
                 "accuracy_vs_cost.parquet", "accuracy_vs_cost.png", "summary.json", "configs"):
        assert f"frontier/{name}" in arts, (name, arts)
    assert "frontier/hypervolume" in run.data.metrics and run.data.metrics["frontier/complete_trials"] == 4
    local = Path(client.download_artifacts(second.parent_run_id, "frontier/trials.parquet", str(tmp)))
    table = pq.read_table(local).to_pandas()
    assert sorted(table["trial"]) == [0, 1, 2, 3]  # the second invocation's front uses the first's trials
    assert set(table[table["on_front"]]["trial"]) == set(second.front)
    configs = client.list_artifacts(second.parent_run_id, "frontier/configs")
    assert len(configs) == len(second.front) >= 1
    # Exported configs are ready to run: they load and validate, with the trial's values.
    for art in configs:
        f = Path(client.download_artifacts(second.parent_run_id, art.path, str(tmp / "dl")))
        cfg = load_config(f)
        n = int(f.stem.split("_")[1])
        trial_lr = second.trials.set_index("trial").loc[n, "param.learner.lr"]
        assert cfg.learner.lr == pytest.approx(trial_lr)
        assert cfg.budget.thinking + cfg.budget.solution == 10


@SWEPT_TIMEOUT
def test_frontier_command_from_mlflow_runs(swept, capsys):
    from orchestrator.cli import main

    tmp, second, uri = swept.tmp, swept.second, swept.uri
    rc = main(["frontier", "--study", "tiny", "--tracking-uri", uri, "--out", str(tmp / "fr")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "accuracy vs mean_tokens" in out and "accuracy vs cost" in out
    for name in ("accuracy_vs_tokens.parquet", "accuracy_vs_tokens.png", "accuracy_vs_cost.png"):
        assert (tmp / "fr" / name).is_file()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    logged = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("budgetrl.workload") == "frontier"]
    assert len(logged) == 1 and "frontier/hypervolume_tokens" in logged[0].data.metrics
    ids = ",".join(second.trials["run_id"])
    assert main(["frontier", "--run-ids", ids, "--tracking-uri", uri, "--budget", "6x4", "--no-log"]) == 0
    assert main(["frontier", "--experiment", "no-such", "--tracking-uri", uri, "--no-log"]) == 2


# ---------------------------------------------------------------------------------------------
# What the MLflow UI reads (docs/mlflow.md), over the server's REST API as the UI does


def _rest(uri: str, endpoint: str, **payload) -> dict:
    r = requests.post(f"{uri}/api/2.0/mlflow/{endpoint}", json=payload, timeout=30) if endpoint.endswith(
        ("search", "create")) else requests.get(f"{uri}/api/2.0/mlflow/{endpoint}", params=payload, timeout=30)
    assert r.ok, (endpoint, r.status_code, r.text)
    return r.json()


def _kv(items: list[dict] | None) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items or []}


def _kv_metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"]["metrics"]}


def _children(uri: str) -> list[dict]:
    exp = _rest(uri, "experiments/get-by-name", experiment_name="sweep-test")["experiment"]
    runs = _rest(uri, "runs/search", experiment_ids=[exp["experiment_id"]], max_results=100)["runs"]
    return [r for r in runs if "mlflow.parentRunId" in _kv(r["data"].get("tags"))]


@SWEPT_TIMEOUT
def test_ui_experiment_kind_is_model_training(swept):
    from orchestrator.tracking import Tracker

    uri = swept.uri
    kind = "mlflow.experimentKind"
    assert _kv(_rest(uri, "experiments/get-by-name", experiment_name="sweep-test")["experiment"]["tags"])[kind] \
        == "custom_model_development"  # the UI's model-training mode, not GenAI's "Evaluations"
    # An experiment created elsewhere without the tag gets it; one tagged otherwise is left alone.
    _rest(uri, "experiments/create", name="bare")
    _rest(uri, "experiments/create", name="genai", tags=[{"key": kind, "value": "genai_development"}])
    for name in ("bare", "genai"):
        Tracker.start(uri, name, run_name="r").end()
    kinds = {n: _kv(_rest(uri, "experiments/get-by-name", experiment_name=n)["experiment"]["tags"])[kind]
             for n in ("bare", "genai")}
    assert kinds == {"bare": "custom_model_development", "genai": "genai_development"}


@SWEPT_TIMEOUT
def test_ui_training_runs_have_dataset_inputs_and_system_metrics(swept):
    uri = swept.uri
    children = _children(uri)
    assert len(children) == 4  # each a quickstart-shaped training run
    for run in children:
        tags = _kv(run["data"]["tags"])
        inputs = {_kv(i["tags"])["mlflow.data.context"]: i["dataset"] for i in run["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"train", "eval"}
        assert inputs["train"]["digest"] == tags["budgetrl.dataset_digest"]  # the lineage tag stays
        assert (inputs["train"]["name"], inputs["eval"]["name"]) == ("addition-train", "addition-eval")
        assert inputs["train"]["source_type"] == "code" and '"task": "addition"' in inputs["train"]["source"]
        assert '"name": "prompt"' in inputs["train"]["schema"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert key in metrics, sorted(metrics)
        assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0
    # Each run's final checkpoint is an MLflow 3 logged model: from that run, an output of it at the last
    # step, READY, with the final eval's metrics attached (the UI's Models column and model page).
    exp = _rest(uri, "experiments/get-by-name", experiment_name="sweep-test")["experiment"]["experiment_id"]
    models = {m["info"]["source_run_id"]: m for m in _rest(uri, "logged-models/search", experiment_ids=[exp])["models"]
              if m["info"]["name"] == "checkpoint"}
    for run in children:
        model = models[run["info"]["run_id"]]
        assert model["info"]["status"].endswith("READY"), model["info"]
        assert model["info"]["model_id"] in {o["model_id"] for o in run["outputs"]["model_outputs"]}
        attached = {m["key"]: m["value"] for m in model["data"]["metrics"]}
        assert attached["eval/6x4/accuracy"] == pytest.approx(_kv_metrics(run)["eval/6x4/accuracy"])


@SWEPT_TIMEOUT
def test_ui_sweep_children_share_objective_and_param_keys(swept):
    second, uri = swept.second, swept.uri
    children = _children(uri)
    params = [{k for k in _kv(r["data"]["params"]) if k.startswith("sweep/")} for r in children]
    metrics = [{m["key"] for m in r["data"]["metrics"] if m["key"].startswith("sweep/")} for r in children]
    assert all(p == {"sweep/budget.thinking_fraction", "sweep/learner.lr", "sweep/algorithm.kl_coef"} for p in params)
    assert all(m == {"sweep/accuracy_6x4", "sweep/mean_tokens_unconstrained", "sweep/hypervolume"} for m in metrics)
    trials = second.trials.set_index("trial")
    for r in children:  # the trial's sampled value, as the study holds it
        lr = trials.loc[int(_kv(r["data"]["tags"])["budgetrl.trial"]), "param.learner.lr"]
        assert float(_kv(r["data"]["params"])["sweep/learner.lr"]) == pytest.approx(lr)
    note = _kv(_rest(uri, "runs/get", run_id=second.parent_run_id)["run"]["data"]["tags"])["mlflow.note.content"]
    assert "`sweep/accuracy_6x4` (max)" in note and "`sweep/learner.lr`" in note and "**Frontier**" in note
    front = second.trials[second.trials["trial"].isin(second.front)]
    assert len(front) >= 1 and all(f"`{rid}`" in note for rid in front["run_id"])


def test_system_metrics_nodes_of_a_placement():
    from orchestrator.system_metrics import other_nodes

    placement = {"rollout": [{"node_id": "aa"}, {"node_id": "bb"}], "learner": [{"node_id": "aa"}, {"node_id": None}]}
    assert other_nodes(placement, "aa") == ["bb"] and other_nodes(placement, "cc") == ["aa", "bb"]


# ---------------------------------------------------------------------------------------------
# Kill a trial, then the driver mid-sweep, run it again: the interrupted trial continues its own run


def _study_states(storage: str) -> list[tuple[int, str]]:
    import optuna

    try:
        # Never create the schema from here: racing the driver's create_all fails one of the two.
        rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        study = optuna.load_study(study_name="tiny", storage=rdb)
        return [(t.number, t.state.name) for t in study.get_trials()]
    except Exception:  # noqa: BLE001 - no study yet, or the driver is creating the schema right now
        return []


def _state_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "state" / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _trial_pids(root) -> list[int]:
    """Processes of Tune trials under the sweep driver (Ray names them after the trainable)."""
    pids = []
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except Exception:  # noqa: BLE001 - a process that just ended
            continue
        if cmd.startswith("ray::") and ("run_trial" in cmd or "ImplicitFunc" in cmd):
            pids.append(p.pid)
    return pids


def _wait_for(cond, proc, timeout: float, what: str, log: Path, storage: str):
    deadline = time.time() + timeout
    while time.time() < deadline:  # only files are polled: a trial finishes seconds after its first state
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the sweep exited while waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}: {_study_states(storage)}")


@SWEPT_TIMEOUT
def test_killed_trial_is_retried_then_killed_driver_resumes(swept):
    """Two faults of the shared sweep's first invocation (``swept``: retries 1, one trial at a time). Trial 0's
    process SIGKILLed mid-run: Tune retries it, the retry continues the trial's own run from its state, and its
    cost counts both attempts. Then the driver and its local Ray SIGKILLed while trial 1 trains; the same command
    again: the invocation resumes, trial 0 is not run again, trial 1 continues as the same Optuna trial under its
    own run name, from its run's last state, in the same run directory and MLflow run. Every step of every run
    logged once; both trials COMPLETE (no duplicate, none lost)."""
    import optuna
    from mlflow import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.cost import CostModel, run_cost
    from orchestrator.sweep.attempts import HEARTBEAT_S

    assert swept.states_after_kill == {0: "COMPLETE", 1: "RUNNING"}
    study = optuna.load_study(study_name="tiny", storage=swept.storage)
    trials = study.get_trials()[:2]  # the later two are the second invocation's
    assert [(t.number, t.state.name, t.user_attrs["budgetrl.invocation"]) for t in trials] == [
        (0, "COMPLETE", "001"), (1, "COMPLETE", "001")]  # resumed, not a new invocation
    assert trials[1].user_attrs["budgetrl.interruptions"] == 1 and "budgetrl.interruptions" not in trials[0].user_attrs
    assert [len(t.user_attrs["budgetrl.attempts"]) for t in trials] == [2, 2]  # trial 0 not run a third time
    assert "trial 1 was interrupted; it continues first" in swept.rerun_stdout

    client = MlflowClient(swept.uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
            if r.data.tags.get("budgetrl.workload") != "frontier"]  # the frontier command's test logs one too
    assert sorted(r.info.run_name for r in runs) == [
        "sweep-tiny-001", "sweep-tiny-002", "tiny-t0000", "tiny-t0001", "tiny-t0002", "tiny-t0003"]
    for trial, run_dir in zip(trials, swept.dirs):
        (run,) = [r for r in runs if r.info.run_name == run_dir.name]
        assert run.info.status == "FINISHED" and run.info.run_id == trial.user_attrs["budgetrl.run_id"]
        assert int(run.data.tags["budgetrl.resumed_from_step"]) >= 1 and run.data.tags["budgetrl.trial"] == str(trial.number)
        for key in ("train/reward", "learner/policy_version"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(
                range(1, swept.steps + 1))
        assert json.loads((run_dir / "result.json").read_text())["run_id"] == run.info.run_id
        # The trial's cost counts every attempt (the killed one up to its last heartbeat) and is the run's.
        attempts = trial.user_attrs["budgetrl.attempts"]
        wall = trial.user_attrs["budgetrl.metrics"]["wall_seconds"]
        assert wall == pytest.approx(sum(a["seconds"] for a in attempts))
        assert run.data.metrics["cost/run_wall_seconds"] == pytest.approx(wall)
        cost = run_cost(load_config(QUICKSTART, swept.base), wall, CostModel(), extra_cpus=0.1)
        assert run.data.metrics["cost/total"] == pytest.approx(cost["cost/total"]) and cost["cost/total"] > 0
    assert runs[[r.info.run_name for r in runs].index("tiny-t0001")].data.tags["budgetrl.interruptions"] == "1"
    first, second = trials[0].user_attrs["budgetrl.attempts"]
    assert first["start"] <= (swept.dirs[0] / "config.yaml").stat().st_mtime  # the first attempt wrote the config
    assert first["start"] + first["seconds"] >= swept.killed_at - HEARTBEAT_S - 1 and second["start"] >= swept.killed_at
    assert sorted(p.name for p in (swept.tmp / "out").iterdir() if p.name.startswith("tiny")) == [
        "tiny-t0000", "tiny-t0001", "tiny-t0002", "tiny-t0003"]  # no second run directory for a resumed trial


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping on a study alone (no Ray runtime, no training)


def test_interrupted_trials_are_continued_first_and_lease_guards_the_study(tmp_path, model_dir):
    import socket

    from optuna.trial import TrialState

    from orchestrator import sweep as sw
    from orchestrator.sweep.run import _interrupted
    from orchestrator.sweep.study import Lease

    plan = sw.load_sweep(_write_sweep(tmp_path, model_dir, num_trials=3))
    study = sw.open_study(plan, create=True)
    done, killed = study.ask(sw.distributions(plan.sweep.space)), study.ask(sw.distributions(plan.sweep.space))
    for t in (done, killed):
        t.set_user_attr("budgetrl.invocation", "001")
    study.tell(done.number, [0.5, 10.0])
    assert sw.invocation_done(study, "001") == 1

    # A live driver (this process, fresh heartbeat) holds the study: a second one is refused.
    study.set_user_attr("budgetrl.driver", {"token": "x", "host": socket.gethostname(), "pid": os.getpid(),
                                            "heartbeat": time.time()})
    with pytest.raises(sw.SweepBusy, match="is being run by pid"):
        Lease(study).acquire()
    # A dead driver on this host: taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study.set_user_attr("budgetrl.driver", {"token": "x", "host": socket.gethostname(), "pid": dead.pid,
                                            "heartbeat": time.time()})
    lease = Lease(study)
    lease.acquire()
    assert study.user_attrs["budgetrl.driver"]["pid"] == os.getpid()
    lease.release()
    assert study.user_attrs["budgetrl.driver"] == {}

    logs = []
    assert _interrupted(study, plan, "001", logs.append) == [killed.number]
    old = study.get_trials()[killed.number]
    assert old.state == TrialState.RUNNING and old.user_attrs["budgetrl.interruptions"] == 1
    assert sw.invocation_done(study, "001") == 1  # an interrupted trial is still owed
    searcher = sw.make_searcher(study, plan.sweep.space, "001", remaining=2, log=logs.append,
                                continued=[killed.number])
    first = searcher.suggest("tune-a")
    assert first == {"trial_number": killed.number, "params": killed.params}  # the same trial, first
    assert len(study.get_trials()) == 2  # nothing new was asked for it
    second = searcher.suggest("tune-b")
    assert second["trial_number"] == killed.number + 1
    assert searcher.suggest("tune-c") == "FINISHED"
    # A trial that Tune stopped (Ctrl-C) stays RUNNING, to be continued; one whose process failed is FAIL.
    searcher.on_trial_complete("tune-b", result={})
    assert study.get_trials()[second["trial_number"]].state == TrialState.RUNNING
    searcher.on_trial_complete("tune-a", error=True)
    assert study.get_trials()[killed.number].state == TrialState.FAIL


def test_study_frontier_logged_to_parent(tmp_path, model_dir):
    """The parent run's frontier from a study's trials: tables, plots, hypervolume, runnable configs."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from orchestrator import sweep as sw
    from orchestrator import tracking

    plan = sw.load_sweep(_write_sweep(tmp_path, model_dir))
    study = sw.open_study(plan, create=True)
    # (accuracy_6x4, mean_tokens_unconstrained): 1 and 2 are on the front, 0 is dominated by 1, 3 was pruned.
    points = [(0.2, 9.0), (0.4, 8.0), (0.6, 12.0), (0.9, 1.0)]
    for i, (acc, tok) in enumerate(points):
        t = study.ask(sw.distributions(plan.sweep.space))
        t.set_user_attr("budgetrl.metrics", {"accuracy_6x4": acc, "mean_tokens_6x4": tok - 1,
                                             "mean_tokens_unconstrained": tok, "cost": 0.01 * (i + 1)})
        t.set_user_attr("budgetrl.overrides", sw.param_overrides(t.params, sw.base_budget(plan.base)))
        t.set_user_attr("budgetrl.run_id", f"run{i}")
        if i == 3:
            study.tell(t.number, state=sw.finished_states()[1])
        else:
            study.tell(t.number, [acc, tok])
    parent = tracking.Tracker.start(plan.tracking_uri, plan.experiment, run_name="p")
    table, front, hv = sw.log_study_frontier(study, plan, parent, log=lambda *_: None)
    assert sorted(front) == [1, 2] and sorted(table["trial"]) == [0, 1, 2, 3]
    # Reference: accuracy 0, tokens at 'unconstrained' = max_thinking + max_solution = 16.
    assert hv == pytest.approx(0.4 * (16 - 8) + (0.6 - 0.4) * (16 - 12))
    client = MlflowClient(plan.tracking_uri)
    assert client.get_run(parent.run_id).data.metrics["frontier/hypervolume"] == pytest.approx(hv)
    local = Path(plan.sweep_dir) / "frontier"
    cost = pq.read_table(local / "accuracy_vs_cost.parquet").to_pandas()
    assert set(cost[cost.on_front].trial) == {0, 1, 2}  # cheaper trial 0 survives on the cost front
    assert (local / "accuracy_vs_tokens.png").stat().st_size > 1000
    for n in (1, 2):
        cfg = load_config(local / "configs" / f"trial_{n:04d}.yaml")
        params = study.get_trials()[n].params
        assert cfg.learner.lr == pytest.approx(params["learner.lr"])
        assert cfg.algorithm.kl_coef == params["algorithm.kl_coef"]
    assert {a.path for a in client.list_artifacts(parent.run_id, "frontier/configs")} == {
        "frontier/configs/trial_0001.yaml", "frontier/configs/trial_0002.yaml"}


def test_single_hypervolume_objective_study(tmp_path, model_dir):
    """configs/sweeps/elastic_schedules.yaml's shape: one objective, the trial's own hypervolume. The
    best trial is the front; the study refuses to continue under another reference (other numbers)."""
    from orchestrator import sweep as sw
    from orchestrator import tracking

    path = _write_sweep(tmp_path, model_dir, sampler="tpe", objectives=[{"metric": "hypervolume"}])
    plan = sw.load_sweep(path)
    study = sw.open_study(plan, create=True)
    for hv in (1.5, 3.75, 0.0):
        t = study.ask(sw.distributions(plan.sweep.space))
        t.set_user_attr("budgetrl.metrics", {"hypervolume": hv, "accuracy_6x4": 0.1, "mean_tokens_6x4": 5.0})
        t.set_user_attr("budgetrl.run_id", f"run{t.number}")
        study.tell(t.number, hv)
    parent = tracking.Tracker.start(plan.tracking_uri, plan.experiment, run_name="p")
    table, front, best = sw.log_study_frontier(study, plan, parent, log=lambda *_: None)
    assert front == [1] and best == pytest.approx(3.75)  # one objective: the best gain over reference 0
    assert table.set_index("trial")["hypervolume"].tolist() == [1.5, 3.75, 0.0]
    assert sw.open_study(sw.load_sweep(path), create=False) is not None
    moved = sw.load_sweep(path, ["objectives=[{metric: hypervolume, reference: {tokens: 20}}]"])
    with pytest.raises(ConfigError, match="hypervolume .* differs from"):
        sw.open_study(moved, create=False)


def test_pareto_median_stopping_prunes_dominated_trial(ray_session, tiny_model, tmp_path):
    """Early stopping through the trainer's own on_eval hook (the real trainer.train, a tiny run of 3
    steps with an eval after each): two finished trials of an earlier invocation dominate any point at
    step 1, so the trial is stopped by its step-1 eval, recorded PRUNED and kept off the front."""
    import optuna
    from mlflow import MlflowClient

    from orchestrator import sweep as sw

    base = [o for o in _tiny_base_overrides(tmp_path, tiny_model) if not o.startswith(("trainer.steps=",
                                                                                          "trainer.eval_every="))]
    path = _write_sweep(tmp_path, tiny_model, num_trials=1, max_concurrency=1,
                        base_overrides=[*base, "trainer.steps=3", "trainer.eval_every=1"],
                        early_stopping={"enabled": True, "min_step": 1, "min_peers": 2, "dominated_fraction": 0.5})
    plan = sw.load_sweep(path)
    study = sw.open_study(plan, create=True)
    best = {"accuracy_6x4": 1.0, "mean_tokens_unconstrained": 0.0}  # no real run reaches it
    for _ in range(2):
        peer = study.ask(sw.distributions(plan.sweep.space))
        peer.set_user_attr("budgetrl.evals", {str(s): best for s in range(4)})
        peer.set_user_attr("budgetrl.metrics", {**best, "mean_tokens_6x4": 0.0, "cost": 0.01})
        study.tell(peer.number, [1.0, 0.0])
    result = sw.run_sweep(path, plan=plan, log=lambda *_: None)
    trials = optuna.load_study(study_name="tiny", storage=result.storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = trials[2]
    assert pruned.user_attrs["budgetrl.pruned_at"] == 1
    # The trainer's evals before training and after step 1 reached the trial; none after the stop.
    evals = pruned.user_attrs["budgetrl.evals"]
    assert sorted(evals) == ["0", "1"] and 0.0 < evals["1"]["mean_tokens_unconstrained"] <= 16.0
    assert result.front == [0, 1] and set(result.trials["state"]) == {"COMPLETE", "PRUNED"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(pruned.user_attrs["budgetrl.run_id"])
    assert run.data.tags["budgetrl.pruned"] == "true" and run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert run.data.tags["budgetrl.stopped_at_step"] == "1"  # the trainer stopped where on_eval said
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/reward")] == [1]


def test_retried_trial_cost_counts_every_attempt(ray_session, tiny_model, tmp_path):
    """Tune retries a trial whose first attempt raised (retries: 1): the retry completes the trial, and
    its cost objective, wall seconds and its run's cost/* count both attempts, not only the last one.
    Its hypervolume objective is the area of the eval table its run logged (frontier.model_hypervolume)."""
    import optuna
    from mlflow import MlflowClient

    from orchestrator.cost import CostModel, run_cost
    from orchestrator.sweep import run_sweep

    first_s, second_s = 3.0, 0.5

    def flaky_train(cfg, log=print):
        from types import SimpleNamespace

        from orchestrator import tracking

        marker = Path(cfg.trainer.output_dir) / f"{cfg.trainer.run_name}.attempted"
        if not marker.exists():  # the first attempt works a while, then raises: Tune retries the trial
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            time.sleep(first_s)
            raise RuntimeError("first attempt fails")
        t = tracking.Tracker.start(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name=cfg.trainer.run_name,
                                   parent_run_id=cfg.tracking.parent_run_id, tags=cfg.tracking.tags)
        with t:
            time.sleep(second_s)
            rows = [{"budget_label": b, "accuracy": acc, "mean_tokens": tok, "mean_thinking_tokens": tok - 2,
                     "truncation_rate": 0.0} for b, acc, tok in (("6x4", 0.25, 5.0), ("unconstrained", 0.5, 12.0))]
            t.log_dict({"before": [], "after": rows}, "eval/summary.json")  # as trainer.train logs it
        return SimpleNamespace(run_id=t.run_id, eval_after=rows, steps=1)

    path = _write_sweep(tmp_path, tiny_model, num_trials=1, max_concurrency=1, retries=1,
                        objectives=[{"metric": "accuracy", "budget": "6x4"}, {"metric": "cost"},
                                    {"metric": "hypervolume"}])
    result = run_sweep(path, train_fn=flaky_train, log=lambda *_: None)
    study = optuna.load_study(study_name="tiny", storage=result.storage)
    (trial,) = study.get_trials()
    assert trial.state.name == "COMPLETE", trial.user_attrs.get("budgetrl.error")
    attempts = trial.user_attrs["budgetrl.attempts"]
    assert len(attempts) == 2 and attempts[0]["seconds"] >= first_s and attempts[1]["seconds"] >= second_s
    wall = trial.user_attrs["budgetrl.metrics"]["wall_seconds"]
    assert wall == pytest.approx(sum(a["seconds"] for a in attempts)) and wall >= first_s + second_s
    cfg = load_config(QUICKSTART, _tiny_base_overrides(tmp_path, tiny_model))
    cost = run_cost(cfg, wall, CostModel(), extra_cpus=0.1)["cost/total"]
    assert trial.values[1] == pytest.approx(cost) and cost > 0
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(trial.user_attrs["budgetrl.run_id"])
    assert run.data.metrics["cost/run_wall_seconds"] == pytest.approx(wall)
    assert run.data.metrics["cost/total"] == pytest.approx(cost) == run.data.metrics["sweep/cost"]
    # The hypervolume objective: the child run's eval table through the pure function, logged on the run.
    from orchestrator.frontier import model_hypervolume

    summary = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        run.info.run_id, "eval/summary.json", str(tmp_path / "dl"))
    rows = json.loads(Path(summary).read_text())["after"]
    # Reference: accuracy 0, tokens 16 (unconstrained: 12 + 4); 5..12 tokens at 0.25, 12..16 at 0.5.
    hv = model_hypervolume(rows, {"accuracy": 0.0, "tokens": 16.0})
    assert hv == pytest.approx(0.25 * 7 + 0.5 * 4)
    assert trial.values[2] == pytest.approx(hv) == run.data.metrics["sweep/hypervolume"]
    assert trial.user_attrs["budgetrl.metrics"]["hypervolume"] == pytest.approx(hv)
