"""`python -m orchestrator frontier`: fronts recomputed from any set of MLflow runs (no Ray, no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import tracking

ROOT = Path(__file__).resolve().parents[1]

# run name -> (per-budget (accuracy, mean_tokens), logged cost/total or None, status, tags)
RUNS = {
    "cheap": ({"8x8": (0.30, 10.0), "unconstrained": (0.50, 30.0)}, 0.01, "FINISHED", {}),
    "strong": ({"8x8": (0.60, 12.0), "unconstrained": (0.90, 50.0)}, 0.05, "FINISHED", {}),
    "worse": ({"8x8": (0.20, 14.0), "unconstrained": (0.40, 60.0)}, 0.06, "FINISHED", {}),
    "nocost": ({"8x8": (0.25, 9.0)}, None, "FINISHED", {}),
    "pruned": ({"8x8": (0.99, 1.0)}, 0.001, "FINISHED", {"budgetrl.pruned": "true"}),
    "crashed": ({"8x8": (0.99, 1.0)}, 0.001, "FAILED", {}),
}


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {}
    for name, (evals, cost, status, tags) in RUNS.items():
        params = {"rollout": {"num_workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0},
                  "learner": {"num_workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}}
        t = tracking.Tracker.start(uri, "fr", run_name=name, params=params,
                                   tags={"budgetrl.workload": "train", "budgetrl.study": "s1", **tags})
        for label, (acc, tok) in evals.items():
            t.log_metrics({f"eval/{label}/accuracy": acc, f"eval/{label}/mean_tokens": tok}, step=5)
            t.log_metrics({f"eval/{label}/accuracy": 0.0, f"eval/{label}/mean_tokens": 99.0}, step=0)
        t.log_metrics({"cost/wall_seconds": 3600.0}, step=5)
        if cost is not None:
            t.log_metrics({"cost/total": cost}, step=5)
        t.end(status)
        ids[name] = t.run_id
    # A sweep parent in the same study is never a point.
    parent = tracking.Tracker.start(uri, "fr", run_name="sweep-s1", tags={"budgetrl.workload": "sweep",
                                                                          "budgetrl.study": "s1"})
    parent.log_metrics({"eval/8x8/accuracy": 1.0}, step=0)
    parent.end()
    return uri, ids


def test_points_use_last_eval_and_skip_parents_pruned_and_failed(store):
    from mlflow import MlflowClient

    from orchestrator.frontier import run_points, select_runs

    uri, ids = store
    runs = select_runs(MlflowClient(uri), experiment="fr")
    assert {r.info.run_name for r in runs} == set(RUNS)  # sweep parent excluded
    pts = run_points(runs)
    assert set(pts["run_name"]) == {"cheap", "strong", "worse", "nocost"}
    row = pts[(pts.run_name == "strong") & (pts.budget_label == "8x8")].iloc[0]
    assert (row.accuracy, row.mean_tokens, row.cost) == (0.60, 12.0, 0.05)  # the last step, not step 0
    # No logged cost/total: CPU-hours (2 CPUs x 1 h) x the CPU price.
    nocost = pts[pts.run_name == "nocost"].iloc[0]
    assert nocost.cost == pytest.approx(2 * 0.05)
    assert set(run_points(runs, include_pruned=True, include_unfinished=True)["run_name"]) == set(RUNS)


def test_frontier_command_prints_writes_and_logs(store, tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.cli import main

    uri, ids = store
    rc = main(["frontier", "--experiment", "fr", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "accuracy vs mean_tokens" in out and "accuracy vs cost" in out
    table = pq.read_table(tmp_path / "out" / "accuracy_vs_tokens.parquet").to_pandas()
    front = set(zip(table[table.on_front].run_name, table[table.on_front].budget_label))
    # worse@* is dominated everywhere; nocost@8x8 (fewest tokens) is on the tokens front.
    assert ("worse", "8x8") not in front and ("worse", "unconstrained") not in front
    assert {("nocost", "8x8"), ("strong", "unconstrained"), ("strong", "8x8")} <= front
    cost_table = pq.read_table(tmp_path / "out" / "accuracy_vs_cost.parquet").to_pandas()
    assert set(cost_table[cost_table.on_front].run_name) == {"cheap", "strong"}
    assert (tmp_path / "out" / "accuracy_vs_tokens.png").stat().st_size > 1000
    client = MlflowClient(uri)
    logged = client.search_runs([client.get_experiment_by_name("fr").experiment_id],
                                filter_string="tags.`budgetrl.workload` = 'frontier'")
    assert len(logged) == 1
    m = logged[0].data.metrics
    assert m["frontier/hypervolume_tokens"] > 0 and m["frontier/hypervolume_cost"] > 0
    arts = {a.path for a in client.list_artifacts(logged[0].info.run_id, "frontier")}
    assert {"frontier/accuracy_vs_tokens.parquet", "frontier/accuracy_vs_cost.png", "frontier/summary.json"} <= arts


def test_frontier_selectors(store, capsys):
    from orchestrator.cli import main

    uri, ids = store
    assert main(["frontier", "--study", "s1", "--tracking-uri", uri, "--no-log", "--budget", "8x8"]) == 0
    out = capsys.readouterr().out
    assert "unconstrained" not in out and "strong" in out
    assert main(["frontier", "--run-ids", f"{ids['cheap']},{ids['worse']}", "--tracking-uri", uri, "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "cheap" in out and "strong" not in out
    assert main(["frontier", "--experiment", "nope", "--tracking-uri", uri, "--no-log"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_frontier_cli_needs_one_selector():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "frontier", "--experiment", "a", "--study", "b"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
