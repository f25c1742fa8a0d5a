"""The length-analysis job: read the inputs, compute every table and plot, write them, log ONE MLflow run.

``run_analysis(cfg)`` returns a dict with the tables (DataFrames), the file paths, the MLflow run id
and a short text summary (also printed). ``main(config, overrides)`` is the ``budgetrl.workloads``
entry point (``python -m orchestrator workload length_analysis CONFIG``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import tracking
from orchestrator.config import ConfigError

from . import plots
from .config import AnalysisConfig, label_of, load_config, to_dict, to_yaml
from .data import ALL, read_input
from .regression import OK_STATUSES, compare_token_effects, token_effects
from .stats import (
    accuracy_by_bin,
    accuracy_by_tier,
    conditional_error,
    marginal_gain,
    select_budget,
)

WORKLOAD = "length_analysis"
TABLES = ("rows", "accuracy_by_tier", "accuracy_by_bin", "conditional_error", "token_effect", "token_effect_diff",
          "marginal_gain")


def fresh_dir(root: str | Path, name: str) -> Path:
    """``root/name``, or ``root/name-<timestamp>`` when that is taken: never overwrite an earlier analysis."""
    out = Path(root) / name
    if out.exists() and any(out.iterdir()):
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base, n = f"{name}-{stamp}", 1
        out = Path(root) / base
        while out.exists():
            out, n = Path(root) / f"{base}-{n}", n + 1
    return out


def load_inputs(cfg: AnalysisConfig) -> tuple[pd.DataFrame, list[str]]:
    """Every configured input as one canonical frame (``label`` tells them apart) plus notes."""
    frames, notes = [], []
    for spec in cfg.inputs:
        frame, n = read_input(spec, cfg.columns)
        frames.append(frame)
        notes += n
    return pd.concat(frames, ignore_index=True), notes


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", text.strip().replace(" ", "_"))


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pp(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}"


def compute(df: pd.DataFrame, cfg: AnalysisConfig) -> dict[str, Any]:
    """All tables from a canonical frame (pure: no files, no tracking)."""
    notes: list[str] = []
    rows, rows_desc = select_budget(df, cfg.budget_filter)
    b = cfg.bins
    out: dict[str, Any] = {"rows_description": rows_desc}
    out["accuracy_by_tier"] = accuracy_by_tier(rows, cfg.ci, cfg.confidence)
    out["accuracy_by_bin"] = accuracy_by_bin(rows, b.method, b.n, b.width, b.edges, cfg.ci, cfg.confidence)
    ce = conditional_error(rows, cfg.thresholds, cfg.n_thresholds, cfg.ci, cfg.confidence)
    out["conditional_error"] = ce
    out["thresholds"] = sorted(ce.loc[ce["difficulty"] == ALL, "threshold"].unique().tolist())
    cluster = "prompt_id" if "prompt_id" in rows else None
    effects_df, effects = token_effects(rows, cfg.per_tokens, ("difficulty", "domain"), cluster, cfg.confidence,
                                        by_difficulty=cfg.per_tier_effects)
    out["token_effect"] = effects_df
    out["effects"] = effects
    out["token_effect_diff"] = compare_token_effects(effects, cfg.confidence)
    gain = None
    if "budget" in df and df["budget"].notna().any():
        with_budget = df[df["budget"].notna()]
        if with_budget.groupby("label")["budget"].nunique().max() > 1:
            gain = marginal_gain(with_budget, cfg.per_tokens, cfg.ci, cfg.confidence)
        else:
            notes.append("marginal gain skipped: each input has a single thinking budget")
    else:
        notes.append("marginal gain skipped: no budget column (columns.budget)")
    out["marginal_gain"] = gain
    out["rows"] = rows
    out["notes"] = notes
    return out


def figures(result: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    figs = {
        "accuracy_by_bin": plots.plot_accuracy_by_bin(result["accuracy_by_bin"], labels),
        "conditional_error": plots.plot_conditional_error(result["conditional_error"], labels),
        "token_effect": plots.plot_token_effect(result["token_effect"], labels),
        "token_distribution": plots.plot_token_distribution(result["rows"], labels),
    }
    if result["marginal_gain"] is not None:
        figs["marginal_gain"] = plots.plot_marginal_gain(result["marginal_gain"], labels)
    return figs


def summarize(result: dict[str, Any], cfg: AnalysisConfig, labels: list[str]) -> str:
    """A short plain-text report of the headline numbers."""
    unit = f"per {cfg.per_tokens:g} tokens"
    lines = [f"Length analysis of {len(labels)} input(s); rows used for the length analyses: "
             f"{result['rows_description']}", ""]
    tiers = result["accuracy_by_tier"]
    pooled = tiers[(tiers["difficulty"] == ALL) & (tiers["domain"] == ALL)]
    if pooled.empty:
        pooled = tiers
    effects = result["token_effect"]
    eff = effects[effects["difficulty"] == ALL].set_index("label")
    width = max(len(x) for x in labels + ["label"])
    lines.append(f"{'label':<{width}}  {'rows':>6}  {'acc':>5}  {'tokens':>7}  "
                 f"token effect, pp {unit} [95% CI]   odds ratio [95% CI]")
    for lab in labels:
        p = pooled[pooled["label"] == lab].iloc[0]
        e = eff.loc[lab]
        if e["status"] in OK_STATUSES:
            effect = f"{_pp(e['ame'])} [{_pp(e['ame_ci_lo'])}, {_pp(e['ame_ci_hi'])}]"
            odds = f"{e['odds_ratio']:.3f} [{e['or_ci_lo']:.3f}, {e['or_ci_hi']:.3f}]"
            if e["status"] == "firth":
                odds += " (Firth)"
        else:
            effect, odds = f"no estimate ({e['status']})", ""
        lines.append(f"{lab:<{width}}  {int(p['n']):>6}  {p['accuracy']:>5.3f}  {p['mean_tokens']:>7.1f}  "
                     f"{effect:<34} {odds}")
    lines.append(f"(token effect = average marginal effect of {cfg.per_tokens:g} more reasoning tokens on "
                 f"P(correct), holding difficulty and domain fixed)")
    for lab in labels:
        e = eff.loc[lab]
        if e["message"]:
            lines.append(f"  {lab}: {e['message']}")
    tiers_eff = effects[effects["difficulty"] != ALL]
    if len(tiers_eff):
        lines.append(f"within each difficulty tier (pp {unit} [95% CI]):")
        for lab in labels:
            parts = []
            for _, e in tiers_eff[tiers_eff["label"] == lab].iterrows():
                value = (f"{_pp(e['ame'])} [{_pp(e['ame_ci_lo'])}, {_pp(e['ame_ci_hi'])}]"
                         + (" Firth" if e["status"] == "firth" else "")
                         if e["status"] in OK_STATUSES else e["status"])
                parts.append(f"{e['difficulty']}: {value}")
            lines.append(f"  {lab:<{width}}  " + "; ".join(parts))
    diff = result["token_effect_diff"]
    if len(diff):
        lines.append("")
        for _, d in diff.iterrows():
            if d["difficulty"] != ALL:
                continue
            if not math.isfinite(d["diff_ame"]):
                lines.append(f"{d['label']} vs {d['reference']}: {d['message']}")
                continue
            lines.append(f"{d['label']} minus {d['reference']}: {_pp(d['diff_ame'])} pp {unit} "
                         f"[{_pp(d['diff_ci_lo'])}, {_pp(d['diff_ci_hi'])}], p={d['p_value']:.3g} ({d['se_method']})")
            lines.append("  => " + verdict(eff.loc[d["reference"]], eff.loc[d["label"]], d, d["reference"],
                                          d["label"], unit))
        per_tier = diff[(diff["difficulty"] != ALL) & diff["diff_ame"].notna()]
        if len(per_tier):
            lines.append("  within tiers: " + "; ".join(
                f"{d['difficulty']}: {_pp(d['diff_ame'])} [{_pp(d['diff_ci_lo'])}, {_pp(d['diff_ci_hi'])}]"
                + (f" ({d['label']})" if len(labels) > 2 else "") for _, d in per_tier.iterrows()))
    ce = result["conditional_error"]
    pooled_ce = ce[(ce["difficulty"] == ALL) & (ce["n_above"] > 0)]
    if len(pooled_ce):
        grid = sorted(pooled_ce["threshold"].unique())
        pick = sorted({grid[0], grid[len(grid) // 2], grid[-1]})
        lines.append("")
        lines.append("P(wrong | T > B), all difficulties: " + "; ".join(
            f"B={b:g}: " + ", ".join(
                f"{r['label']} {_fmt(r['p_wrong'], 2)} (n={int(r['n_above'])})"
                for _, r in pooled_ce[pooled_ce["threshold"] == b].iterrows())
            for b in pick))
    gain = result["marginal_gain"]
    if gain is not None:
        g = gain[(gain["difficulty"] == ALL) & gain["prev_budget"].notna()]
        lines.append("")
        lines.append(f"Marginal gain, all difficulties (accuracy pp per {cfg.per_tokens:g} extra budget tokens):")
        for lab in labels:
            part = g[g["label"] == lab]
            acc = gain[(gain["difficulty"] == ALL) & (gain["label"] == lab)]
            if part.empty:
                continue
            steps = ", ".join(f"{r['prev_budget']:g}->{r['budget']:g}: {100 * r['gain_per_budget']:+.1f}"
                              for _, r in part.iterrows())
            curve = ", ".join(f"{r['budget']:g}: {r['accuracy']:.3f}" for _, r in acc.iterrows())
            lines.append(f"  {lab}: accuracy at budget {curve}")
            lines.append(f"  {' ' * len(lab)}  gain {steps}")
    if result["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def verdict(ref: pd.Series, cur: pd.Series, d: pd.Series, ref_label: str, label: str, unit: str) -> str:
    """One sentence: does ``label`` lose less accuracy per token than ``ref_label``?"""
    excludes_zero = d["diff_ci_lo"] > 0 or d["diff_ci_hi"] < 0
    if not excludes_zero:
        return (f"no detectable difference in the token effect between {label} and {ref_label} "
                f"(95% CI of the difference includes 0)")
    if ref["ame"] < 0 and cur["ame"] < 0:
        word = "less" if d["diff_ame"] > 0 else "more"
        return f"{label} loses {word} accuracy {unit} than {ref_label} (95% CI of the difference excludes 0)"
    word = "higher" if d["diff_ame"] > 0 else "lower"
    return (f"{label}'s token effect is {word} than {ref_label}'s "
            f"({_pp(cur['ame'])} vs {_pp(ref['ame'])} pp {unit}; 95% CI of the difference excludes 0)")


def _arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


def _metrics(result: dict[str, Any], labels: list[str]) -> dict[str, float]:
    m: dict[str, float] = {}
    tiers = result["accuracy_by_tier"]
    effects = result["token_effect"]
    eff = effects[effects["difficulty"] == ALL].set_index("label")
    for lab in labels:
        key = _metric_key(lab)
        pooled = tiers[(tiers["label"] == lab) & (tiers["difficulty"] == ALL) & (tiers["domain"] == ALL)]
        if pooled.empty:
            pooled = tiers[tiers["label"] == lab]
        m[f"{key}/accuracy"] = float(pooled["accuracy"].iloc[0])
        m[f"{key}/mean_tokens"] = float(pooled["mean_tokens"].iloc[0])
        m[f"{key}/rows"] = float(pooled["n"].iloc[0])
        e = eff.loc[lab]
        for name in ("ame_pp", "coef", "odds_ratio"):
            m[f"{key}/{name}"] = float(e[name])
        m[f"{key}/ame_ci_lo_pp"] = 100 * float(e["ame_ci_lo"])
        m[f"{key}/ame_ci_hi_pp"] = 100 * float(e["ame_ci_hi"])
        for _, t in effects[(effects["label"] == lab) & (effects["difficulty"] != ALL)].iterrows():
            m[f"{key}/difficulty_{_metric_key(t['difficulty'])}/ame_pp"] = float(t["ame_pp"])
    for _, d in result["token_effect_diff"].iterrows():
        key = f"diff/{_metric_key(d['label'])}_minus_{_metric_key(d['reference'])}"
        if d["difficulty"] != ALL:
            key += f"/difficulty_{_metric_key(d['difficulty'])}"
        m[f"{key}/ame_pp"] = float(d["diff_pp"])
        m[f"{key}/ci_lo_pp"] = 100 * float(d["diff_ci_lo"])
        m[f"{key}/ci_hi_pp"] = 100 * float(d["diff_ci_hi"])
    return {k: v for k, v in m.items() if v is not None and math.isfinite(v)}


def run_analysis(cfg: AnalysisConfig, log=print) -> dict[str, Any]:
    """Read, compute, write Parquet + PNG to a fresh output dir, log one MLflow run, print the summary."""
    df, notes = load_inputs(cfg)
    labels = [label_of(s) for s in cfg.inputs]
    result = compute(df, cfg)
    result["notes"] = notes + result["notes"]
    run_name = cfg.tracking.run_name or "length-analysis"
    out_dir = fresh_dir(cfg.output_dir, run_name)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)

    tables = {name: result[name] for name in TABLES if result.get(name) is not None}
    files: dict[str, str] = {}
    arrow_tables = {}
    for name, frame in tables.items():
        arrow_tables[name] = _arrow(frame)
        path = out_dir / "tables" / f"{name}.parquet"
        pq.write_table(arrow_tables[name], path)
        files[f"tables/{name}.parquet"] = str(path)
    figs = figures(result, labels)
    for name, fig in figs.items():
        path = out_dir / "plots" / f"{name}.png"
        fig.savefig(path, dpi=110)
        files[f"plots/{name}.png"] = str(path)
    summary = summarize(result, cfg, labels)
    effects = [e.row() for e in result["effects"]]
    report = _clean({"rows": result["rows_description"], "per_tokens": cfg.per_tokens,
                     "thresholds": result["thresholds"], "token_effect": effects,
                     "token_effect_diff": result["token_effect_diff"].to_dict("records"), "notes": result["notes"]})
    (out_dir / "summary.txt").write_text(summary + "\n")
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out_dir / "config.yaml").write_text(to_yaml(cfg))

    run_id = None
    if cfg.tracking.enabled:
        config = to_dict(cfg)
        tags = tracking.lineage_tags(config, workload=WORKLOAD, stage="analysis",
                                     dataset_digest=tracking.dataset_digest(_arrow(df)))
        tags.update(cfg.tracking.tags)
        tracker = tracking.Tracker.start(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name=run_name,
                                         params=config, tags=tags, parent_run_id=cfg.tracking.parent_run_id)
        with tracker:
            for name, table in arrow_tables.items():
                tracker.log_table(table, f"tables/{name}.parquet")
            for name, fig in figs.items():
                tracker.log_figure(fig, f"plots/{name}.png")
            tracker.log_metrics(_metrics(result, labels), step=0)
            tracker.log_dict(report, "summary.json")
            tracker.log_dict(config, "config.yaml")
            tracker.client.log_text(tracker.run_id, summary + "\n", "summary.txt")
        run_id = tracker.run_id
    footer = f"outputs: {out_dir}" + (f"; MLflow run {run_id}" if run_id else "")
    log(summary + "\n\n" + footer)
    return {"run_id": run_id, "output_dir": str(out_dir), "summary": summary, "files": files,
            "tables": tables, "effects": result["effects"], "notes": result["notes"]}


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def main(config: str, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Entry point of the ``budgetrl.workloads`` group: load the config, run, print the summary."""
    cfg = load_config(config, list(overrides))
    try:
        run_analysis(cfg)
    except tracking.TrackingError as exc:
        print(f"tracking error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ConfigError", "compute", "load_inputs", "main", "run_analysis", "summarize"]
