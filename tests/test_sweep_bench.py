"""benchmarks/sweep_search.py: the hypervolume comparison on synthetic fronts with known areas (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("sweep_search")


ACC, TOK = "accuracy_16x8", "mean_tokens_unconstrained"


def _trials(points, states=None) -> pd.DataFrame:
    df = pd.DataFrame(points, columns=[ACC, TOK])
    df["state"] = states or ["COMPLETE"] * len(df)
    return df


def test_front_hypervolume_known_areas(bench):
    ref = {ACC: 0.0, TOK: 10.0}
    # Front (4, 0.5), (6, 0.8); (7, 0.4) is dominated; the FAIL row would dominate everything if counted.
    a = _trials([(0.5, 4.0), (0.8, 6.0), (0.4, 7.0), (1.0, 1.0)], ["COMPLETE"] * 3 + ["FAIL"])
    b = _trials([(0.6, 5.0), (0.9, 12.0)])  # on the front, but beyond the reference: adds nothing
    size_a, hv_a = bench.front_hypervolume(a, [ACC], [TOK], ref)
    size_b, hv_b = bench.front_hypervolume(b, [ACC], [TOK], ref)
    assert size_a == 2 and hv_a == pytest.approx(2 * 0.5 + 4 * 0.8)  # 4.2: the staircase area
    assert size_b == 2 and hv_b == pytest.approx(5 * 0.6)
    assert bench.front_hypervolume(_trials([]), [ACC], [TOK], ref) == (0, 0.0)


def test_summarize_ratio_mean_and_spread(bench):
    rows = [{"searcher": "optuna", "repeat": 0, "hypervolume": 4.2}, {"searcher": "random", "repeat": 0,
                                                                     "hypervolume": 3.0},
            {"searcher": "optuna", "repeat": 1, "hypervolume": 2.0}, {"searcher": "random", "repeat": 1,
                                                                     "hypervolume": 2.5}]
    s = bench.summarize(rows)
    assert s["ratios"] == pytest.approx([1.4, 0.8])
    assert s["ratio_of_means"] == pytest.approx(3.1 / 2.75)
    assert s["optuna"]["mean"] == pytest.approx(3.1) and s["optuna"]["std"] == pytest.approx(math.sqrt(2 * 1.1 ** 2))
    zero = bench.summarize([{"searcher": "optuna", "repeat": 0, "hypervolume": 1.0},
                            {"searcher": "random", "repeat": 0, "hypervolume": 0.0}])
    assert zero["ratios"] == [math.inf] and math.isinf(zero["ratio_of_means"])
    none = bench.summarize([{"searcher": "optuna", "repeat": 0, "hypervolume": 0.0},
                            {"searcher": "random", "repeat": 0, "hypervolume": 0.0}])
    assert math.isnan(none["ratio_of_means"])  # no front beat the reference: no ratio, not inf


def test_common_reference_is_bounds_derived_and_shared(bench, tmp_path):
    from orchestrator.sweep import load_sweep

    (tmp_path / "model").mkdir()
    common = [f"base.model.path={tmp_path / 'model'}", f"storage=sqlite:///{tmp_path / 'o.db'}",
              f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    plan = load_sweep(ROOT / "configs" / "sweeps" / "quickstart.yaml", common)
    a, b = _trials([(0.3, 30.0)]), _trials([(0.1, 40.0)])
    # The quickstart objectives have natural bounds: accuracy 0, tokens at the unconstrained cap (64 + 8).
    assert bench.common_reference(plan, [a, b]) == {ACC: 0.0, TOK: 72.0}
    assert bench.common_reference(plan, [b]) == bench.common_reference(plan, [a])
    # An objective without a bound gets the worse-of-both nadir (1.1 x the largest cost over both sweeps).
    plan = load_sweep(ROOT / "configs" / "sweeps" / "quickstart.yaml",
                      [*common, "objectives=[{metric: accuracy, budget: 16x8}, {metric: cost}]"])
    a["cost"], b["cost"] = [2.0], [5.0]
    ref = bench.common_reference(plan, [a, b])
    assert ref[ACC] == 0.0 and ref["cost"] == pytest.approx(5.5)
