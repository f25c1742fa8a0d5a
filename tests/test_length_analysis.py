"""Length analysis: statistics checked against synthetic tables with known answers; the job end to end.

No Ray, no engines: plain pandas/Arrow tables, a SQLite MLflow store in tmp_path.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from orchestrator.config import ConfigError
from workloads.length_analysis import (
    InputError,
    accuracy_by_bin,
    canonical,
    conditional_error,
    make_config,
    marginal_gain,
    proportion_ci,
    run_analysis,
    select_budget,
    token_effect,
)
from workloads.length_analysis.job import compute, fresh_dir, load_inputs
from workloads.length_analysis.regression import compare_token_effects, token_effects

DIFF_EFFECT = {"1": 1.5, "2": 0.5, "3": -0.5, "4": -1.5}
DOMAIN_EFFECT = {"algebra": 0.0, "geometry": -0.4, "number": 0.3}


def simulate(beta_per_1000: float, n: int = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Correctness from a logistic model: tokens grow with difficulty (the confounder the controls remove)."""
    rng = np.random.default_rng(seed)
    diff = rng.choice(list(DIFF_EFFECT), n)
    dom = rng.choice(list(DOMAIN_EFFECT), n)
    tokens = rng.gamma(4.0, 300.0 * diff.astype(float))
    eta = (np.vectorize(DIFF_EFFECT.get)(diff) + np.vectorize(DOMAIN_EFFECT.get)(dom)
           + beta_per_1000 * tokens / 1000)
    p = 1 / (1 + np.exp(-eta))
    correct = rng.random(n) < p
    df = pd.DataFrame({"label": "sim", "correct": correct.astype(int), "tokens": tokens,
                       "difficulty": diff, "domain": dom})
    return df, p


# ---------------------------------------------------------------------------------------------
# Proportions


def test_wilson_and_jeffreys_intervals():
    lo, hi = proportion_ci(5, 10, "wilson")
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = proportion_ci([0, 10], [10, 10], "wilson")
    assert lo[0] == 0.0 and hi[1] == 1.0 and hi[0] == pytest.approx(0.2775, abs=1e-4)
    lo, hi = proportion_ci(3, 20, "jeffreys")
    assert lo == pytest.approx(sps.beta.ppf(0.025, 3.5, 17.5)) and hi == pytest.approx(sps.beta.ppf(0.975, 3.5, 17.5))
    lo, hi = proportion_ci(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


# ---------------------------------------------------------------------------------------------
# Regression


def test_logistic_recovers_a_known_token_effect():
    beta = -0.25  # log-odds per 1000 tokens
    df, p = simulate(beta, seed=0)
    eff = token_effect(df, per_tokens=1000)
    assert eff.status == "ok", eff.message
    assert eff.controls == "difficulty (4 levels), domain (3 levels)"
    assert eff.unit == "per 1000 tokens"
    assert eff.coef_ci_lo < beta < eff.coef_ci_hi
    assert eff.or_ci_lo < math.exp(beta) < eff.or_ci_hi
    true_ame = float(np.mean(beta * p * (1 - p)))  # the AME estimand at the sample's covariates
    assert eff.ame_ci_lo < true_ame < eff.ame_ci_hi
    assert abs(eff.coef - beta) < 3 * eff.se and eff.ame_pp == pytest.approx(100 * eff.ame)
    # Without the difficulty control the confounded slope is far more negative: the control matters.
    naive = token_effect(df.assign(difficulty="all"), per_tokens=1000)
    assert naive.coef < eff.coef_ci_lo


def test_confidence_intervals_have_nominal_coverage():
    """Over 40 independent simulated tables the 95% CIs cover the true slope and AME about 95% of the time."""
    beta, hits_coef, hits_ame = -0.4, 0, 0
    for seed in range(100, 140):
        df, p = simulate(beta, n=2000, seed=seed)
        eff = token_effect(df, per_tokens=1000)
        true_ame = float(np.mean(beta * p * (1 - p)))
        hits_coef += eff.coef_ci_lo < beta < eff.coef_ci_hi
        hits_ame += eff.ame_ci_lo < true_ame < eff.ame_ci_hi
    assert hits_coef >= 34 and hits_ame >= 34  # P(<= 33 of 40 | 95% coverage) = 0.3%


def test_null_effect_gives_a_ci_containing_zero_and_units_rescale():
    df, _ = simulate(0.0, seed=2)
    eff = token_effect(df, per_tokens=1000)
    assert eff.status == "ok"
    assert eff.coef_ci_lo < 0 < eff.coef_ci_hi and eff.ame_ci_lo < 0 < eff.ame_ci_hi
    assert eff.or_ci_lo < 1 < eff.or_ci_hi
    small = token_effect(df, per_tokens=10)
    assert small.unit == "per 10 tokens"
    assert small.coef == pytest.approx(eff.coef / 100, rel=1e-6)
    assert small.ame == pytest.approx(eff.ame / 100, rel=1e-6)
    assert small.p_value == pytest.approx(eff.p_value, rel=1e-6)


def test_repeated_samples_per_prompt_get_cluster_robust_errors():
    """Four identical samples per prompt carry no more information than one: clustering by prompt knows."""
    df, _ = simulate(-0.3, n=3000, seed=5)
    df["prompt_id"] = [f"p{i}" for i in range(len(df))]
    once = token_effect(df)
    four = token_effect(pd.concat([df] * 4, ignore_index=True))
    assert once.cov_type == "model" and four.cov_type.startswith("cluster(prompt_id, G=3000")
    assert four.coef == pytest.approx(once.coef, rel=1e-6)
    assert four.se == pytest.approx(once.se, rel=0.15)  # not once.se / 2, as independent rows would give
    assert token_effect(pd.concat([df] * 4, ignore_index=True), cluster=None).se == pytest.approx(once.se / 2, rel=0.01)


def test_degenerate_tables_give_messages_not_crashes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 3000, 400).astype(float)
    base = pd.DataFrame({"tokens": tokens, "difficulty": rng.choice(["1", "2"], 400), "domain": "math"})

    e = token_effect(base.assign(correct=1))
    assert e.status == "all_correct" and "all 400 rows are correct" in e.message and math.isnan(e.ame)
    assert token_effect(base.assign(correct=0)).status == "all_wrong"
    e = token_effect(base.assign(correct=rng.integers(0, 2, 400), tokens=7.0))
    assert e.status == "no_token_variation"

    # Single difficulty level and single domain: fitted, not controlled, and said so.
    e = token_effect(base.assign(correct=rng.integers(0, 2, 400), difficulty="3"))
    assert e.status == "ok" and e.controls == "none"
    assert "difficulty has one level ('3')" in e.message and "domain has one level ('math')" in e.message

    # Perfect separation on tokens: no ML estimate; Firth's estimate, negative, finite, flagged.
    e = token_effect(base.assign(correct=(tokens < 1500).astype(int)))
    assert e.status == "firth" and "perfect separation" in e.message
    assert np.isfinite(e.coef) and e.coef < 0 and e.ame < 0

    # A tier that is all wrong has an infinite effect: its rows are dropped and named.
    y = np.where(base["difficulty"] == "2", 0, rng.integers(0, 2, 400))
    e = token_effect(base.assign(correct=y))
    assert e.status == "ok" and e.n_used == int((base["difficulty"] == "1").sum())
    assert "difficulty=2" in e.dropped and "all wrong" in e.dropped

    # Tokens fixed by the tier: cannot be separated from the control.
    e = token_effect(base.assign(correct=rng.integers(0, 2, 400),
                                 tokens=np.where(base["difficulty"] == "1", 10.0, 20.0)))
    assert e.status == "tokens_explained_by_controls"


def test_paired_comparison_of_two_checkpoints():
    a, _ = simulate(-0.6, n=6000, seed=2)
    b, _ = simulate(0.0, n=6000, seed=3)
    a = a.assign(label="steep", prompt_id=[f"p{i}" for i in range(len(a))])
    b = b.assign(label="flat", prompt_id=[f"p{i}" for i in range(len(b))])
    table, effects = token_effects(pd.concat([a, b]), per_tokens=1000)
    diff = compare_token_effects(effects)
    row = diff.iloc[0]
    assert row["label"] == "flat" and row["reference"] == "steep"
    assert row["se_method"].startswith("paired") and row["diff_ci_lo"] > 0  # flat loses less per token
    assert row["diff_ame"] == pytest.approx(effects[1].ame - effects[0].ame)


# ---------------------------------------------------------------------------------------------
# Descriptive tables


def test_conditional_error_on_a_hand_table():
    df = pd.DataFrame({"label": "x", "tokens": [1, 2, 3, 4, 5, 6], "correct": [1, 1, 0, 1, 0, 0]})
    out = conditional_error(df, thresholds=[0, 3, 6]).set_index("threshold")
    assert out.loc[0, "n_above"] == 6 and out.loc[0, "p_wrong"] == pytest.approx(0.5)
    assert out.loc[3, "n_above"] == 3 and out.loc[3, "wrong_above"] == 2
    assert out.loc[3, "p_wrong"] == pytest.approx(2 / 3) and out.loc[3, "p_wrong_below"] == pytest.approx(1 / 3)
    lo, hi = proportion_ci(2, 3)
    assert out.loc[3, "ci_lo"] == pytest.approx(lo) and out.loc[3, "ci_hi"] == pytest.approx(hi)
    assert out.loc[6, "n_above"] == 0 and math.isnan(out.loc[6, "p_wrong"])


def test_accuracy_by_bin_fixed_width_and_quantiles():
    df = pd.DataFrame({"label": "x", "difficulty": "1", "domain": "d",
                       "tokens": [0, 5, 9, 10, 15, 19, 20], "correct": [1, 1, 1, 1, 0, 0, 0]})
    out = accuracy_by_bin(df, method="fixed", width=10)
    assert out["bin_label"].tolist() == ["[0, 10)", "[10, 20)", "[20, 30]"]
    assert out["n"].tolist() == [3, 3, 1] and out["accuracy"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    q = accuracy_by_bin(df, method="quantile", n=2)
    assert q["n"].sum() == 7 and len(q) == 2


def test_marginal_gain_on_a_hand_table():
    rows = []
    # 4 prompts at budgets 8, 16, 32: correct counts 1, 3, 4 (paired by prompt).
    outcome = {8: [1, 0, 0, 0], 16: [1, 1, 1, 0], 32: [1, 1, 1, 1]}
    used = {8: 8.0, 16: 12.0, 32: 14.0}
    for b, ys in outcome.items():
        for i, y in enumerate(ys):
            rows.append({"label": "m", "prompt_id": f"p{i}", "budget": float(b), "tokens": used[b], "correct": y})
    out = marginal_gain(pd.DataFrame(rows), per_tokens=10).set_index("budget")
    assert out.loc[8, "accuracy"] == 0.25 and math.isnan(out.loc[8, "delta_accuracy"])
    assert out.loc[16, "delta_accuracy"] == pytest.approx(0.5)
    assert out.loc[16, "gain_per_budget"] == pytest.approx(0.5 / 8 * 10)
    assert out.loc[16, "gain_per_token_spent"] == pytest.approx(0.5 / 4 * 10)
    assert out.loc[32, "gain_per_budget"] == pytest.approx(0.25 / 16 * 10)
    assert out.loc[16, "delta_ci_method"] == "paired"
    d = np.array([0, 1, 1, 0])  # per-prompt change 8 -> 16
    se = d.std(ddof=1) / 2
    assert out.loc[16, "delta_ci_hi"] - out.loc[16, "delta_accuracy"] == pytest.approx(1.959964 * se, rel=1e-5)


def test_select_budget_uses_each_inputs_largest_budget():
    df = pd.DataFrame({"label": ["a", "a", "b", "b"], "budget": [8.0, 64.0, 8.0, 32.0], "tokens": 1.0,
                       "correct": 1})
    rows, desc = select_budget(df, "max")
    assert rows["budget"].tolist() == [64.0, 32.0] and "a: budget 64" in desc
    with pytest.raises(ValueError, match="has no rows at that budget"):
        select_budget(df, "16")


# ---------------------------------------------------------------------------------------------
# Inputs and config


def test_bad_inputs_name_the_column(tmp_path):
    table = pa.table({"correct": [True, False], "thinking_tokens": [3, 4]})
    with pytest.raises(InputError, match=r"column 'reasoning_tokens' \(columns.tokens\) not found"):
        canonical(table, make_config(inputs=[{"path": "x"}], columns={"tokens": "reasoning_tokens"}).columns)
    with pytest.raises(InputError, match=r"'tier' \(columns.difficulty\) not found.*columns.difficulty=null"):
        canonical(table, make_config(inputs=[{"path": "x"}], columns={"difficulty": "tier"}).columns)
    with pytest.raises(InputError, match="no rows"):
        canonical(table.slice(0, 0))
    with pytest.raises(InputError, match=r"'correct' \(columns.correct\) must be 0/1"):
        canonical(pa.table({"correct": [0, 2], "thinking_tokens": [3, 4]}))
    path = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), path)
    cfg = make_config(inputs=[{"path": str(path), "label": "e"}], tracking={"enabled": False},
                      output_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"input 'e'.*empty"):
        run_analysis(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="per_tokens=0"):
        make_config(inputs=[{"path": "x"}], per_tokens=0)
    with pytest.raises(ConfigError, match="bins.width"):
        make_config(inputs=[{"path": "x"}], bins={"method": "fixed"})


def test_csv_with_custom_columns(tmp_path):
    df, _ = simulate(-0.3, n=3000, seed=4)
    df = df.rename(columns={"tokens": "reasoning_tokens", "difficulty": "tier", "correct": "is_correct"})
    df["is_correct"] = df["is_correct"].map({1: "true", 0: "false"})
    df.drop(columns=["label"]).to_csv(tmp_path / "mine.csv", index=False)
    cfg = make_config(inputs=[{"path": str(tmp_path / "mine.csv")}],
                      columns={"correct": "is_correct", "tokens": "reasoning_tokens", "difficulty": "tier"},
                      tracking={"enabled": False}, output_dir=str(tmp_path / "out"))
    frame, notes = load_inputs(cfg)
    assert frame["label"].unique().tolist() == ["mine"] and "budget" not in frame and not notes
    result = compute(frame, cfg)
    eff = result["token_effect"].iloc[0]
    assert eff["label"] == "mine" and eff["status"] == "ok" and eff["controls"].startswith("difficulty (4")
    assert eff["coef_ci_lo"] < -0.3 < eff["coef_ci_hi"]
    assert result["marginal_gain"] is None and any("no budget column" in n for n in result["notes"])


# ---------------------------------------------------------------------------------------------
# The job end to end


def _budget_grid_table(seed: int, slope: float) -> pa.Table:
    """A rollout-schema-like eval table: 150 prompts x budgets 8/16/32, tokens capped by the budget."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(150):
        diff = int(rng.integers(1, 4))
        need = rng.normal(6 * diff, 2)
        for b in (8, 16, 32):
            t = int(min(b, max(1, round(need + rng.normal(0, 2)))))
            p = 1 / (1 + math.exp(-(2.0 - 0.5 * diff + slope * t / 10))) if t >= need else 0.05
            rows.append({"prompt_id": f"p{i}", "sample_index": 0, "difficulty": diff, "domain": "arith",
                         "thinking_tokens": t, "solution_tokens": 3, "budget_thinking": b, "budget_solution": 8,
                         "correct": bool(rng.random() < p)})
    return pa.Table.from_pylist(rows)


def test_job_end_to_end_logs_one_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from workloads.length_analysis import main

    for name, seed, slope in (("a", 0, -0.3), ("b", 1, 0.0)):
        (tmp_path / name / "eval").mkdir(parents=True)
        pq.write_table(_budget_grid_table(seed, slope), tmp_path / name / "eval" / "step_0000.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "analysis.yaml"
    config.write_text(
        f"inputs:\n  - {{path: {tmp_path}/a/eval/step_0000.parquet, label: warm start}}\n"
        f"  - {{path: {tmp_path}/b/eval, label: after RL}}\n"
        f"per_tokens: 10\nbins: {{method: fixed, width: 5}}\noutput_dir: {tmp_path}/out\n"
        f"tracking: {{tracking_uri: '{uri}', experiment: la-test, run_name: la}}\n")
    assert main(str(config), ["n_thresholds=5"]) == 0
    out = tmp_path / "out" / "la"
    for name in ("accuracy_by_tier", "accuracy_by_bin", "conditional_error", "token_effect", "token_effect_diff",
                 "marginal_gain"):
        assert (out / "tables" / f"{name}.parquet").is_file()
    for name in ("accuracy_by_bin", "conditional_error", "marginal_gain", "token_effect", "token_distribution"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    summary = (out / "summary.txt").read_text()
    assert "after RL minus warm start" in summary and "per 10 tokens" in summary

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("la-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["budgetrl.workload"] == "length_analysis"
    assert run.data.tags["budgetrl.stage"] == "analysis" and "budgetrl.dataset_digest" in run.data.tags
    assert run.data.params["per_tokens"] == "10.0"
    assert "warm_start/ame_pp" in run.data.metrics and "after_RL/accuracy" in run.data.metrics
    logged = {f.path for d in ("tables", "plots") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"tables/marginal_gain.parquet", "plots/conditional_error.png", "plots/token_effect.png"} <= logged
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.txt", "summary.json", "config.yaml"} <= top

    gain = pq.read_table(out / "tables" / "marginal_gain.parquet").to_pandas()
    assert set(gain["budget"]) == {8.0, 16.0, 32.0} and (gain["delta_ci_method"].dropna() == "paired").all()
    effects = pq.read_table(out / "tables" / "token_effect.parquet").to_pandas()
    pooled = effects[effects["difficulty"] == "all"]
    assert pooled["label"].tolist() == ["warm start", "after RL"] and pooled["n"].tolist() == [150, 150]

    # Never overwrite an earlier analysis: the same run name now gets a fresh directory.
    again = fresh_dir(tmp_path / "out", "la")
    assert not again.exists() and again.name.startswith("la-")


def test_analyze_cli_dispatch(tmp_path):
    """`python -m orchestrator analyze` reaches the workload through the entry-point registry."""
    from pathlib import Path

    from orchestrator.cli import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "length_analysis.yaml"
    assert main(["analyze", str(cfg), "per_tokens=0"]) == 2
    assert main(["workload", "no-such-workload", str(cfg)]) == 2
