"""Figures for the length analysis; every plot overlays the labels (checkpoints/runs) in one color each.

Bare Agg ``Figure`` objects (no pyplot, no global figure registry): safe in threads and Ray actors.
Save with ``fig.savefig`` or ``Tracker.log_figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import ALL, level_order

MAX_COLS = 4


def _colors(labels: Sequence[str]) -> dict[str, str]:
    return {lab: f"C{i % 10}" for i, lab in enumerate(labels)}


def _grid(n_panels: int, nrows_fixed: int | None = None, w: float = 3.4, h: float = 2.8):
    ncols = min(MAX_COLS, max(n_panels, 1))
    nrows = nrows_fixed or math.ceil(max(n_panels, 1) / ncols)
    fig = Figure(figsize=(w * ncols + 0.6, h * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes, ncols


def _err(mid, lo, hi) -> np.ndarray:
    """Asymmetric error-bar lengths, never negative (NaN bounds draw no bar)."""
    mid, lo, hi = (np.asarray(v, dtype=float) for v in (mid, lo, hi))
    return np.nan_to_num(np.clip(np.vstack([mid - lo, hi - mid]), 0, None))


def _hide_unused(axes, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _labels(df: pd.DataFrame, labels: Sequence[str] | None) -> list[str]:
    return list(labels) if labels is not None else list(pd.unique(df["label"]))


def _title(difficulty: str, domain: str | None = None) -> str:
    text = "all difficulties" if difficulty == ALL else f"difficulty {difficulty}"
    if domain is not None and domain != ALL:
        text += f" | {domain}"
    return text


def _empty(message: str) -> Figure:
    fig = Figure(figsize=(5, 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def plot_accuracy_by_bin(table: pd.DataFrame, labels: Sequence[str] | None = None) -> Figure:
    """Accuracy (with CI) against the mean tokens of each bin, one panel per domain x difficulty."""
    if len(table) == 0:
        return _empty("no rows")
    labels = _labels(table, labels)
    colors = _colors(labels)
    domains = level_order(table["domain"])
    panels = [(dom, d) for dom in domains for d in level_order(table.loc[table["domain"] == dom, "difficulty"])]
    fig, axes, _ = _grid(len(panels))
    for ax, (dom, d) in zip(axes.flat, panels):
        sub = table[(table["domain"] == dom) & (table["difficulty"] == d)]
        for lab in labels:
            s = sub[sub["label"] == lab].sort_values("bin")
            if s.empty:
                continue
            yerr = _err(s["accuracy"], s["ci_lo"], s["ci_hi"])
            ax.errorbar(s["mean_tokens"], s["accuracy"], yerr=yerr, marker="o", ms=4, capsize=2, lw=1.4,
                        color=colors[lab], label=lab)
        ax.set_title(_title(d, dom if len(domains) > 1 else None), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("reasoning tokens (bin mean)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(panels))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Accuracy by reasoning-length bin (95% CI)", fontsize=10)
    return fig


def plot_conditional_error(table: pd.DataFrame, labels: Sequence[str] | None = None) -> Figure:
    """P(wrong | T > B) against B, pooled and per difficulty, with CI bands."""
    if len(table) == 0:
        return _empty("no rows")
    labels = _labels(table, labels)
    colors = _colors(labels)
    scopes = level_order(table["difficulty"])
    fig, axes, _ = _grid(len(scopes))
    for ax, scope in zip(axes.flat, scopes):
        sub = table[(table["difficulty"] == scope) & (table["n_above"] > 0)]
        for lab in labels:
            s = sub[sub["label"] == lab].sort_values("threshold")
            if s.empty:
                continue
            ax.plot(s["threshold"], s["p_wrong"], marker="o", ms=3, lw=1.4, color=colors[lab], label=lab)
            ax.fill_between(s["threshold"], s["ci_lo"], s["ci_hi"], color=colors[lab], alpha=0.15, lw=0)
        ax.set_title(_title(scope), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("threshold B (tokens)", fontsize=8)
        ax.set_ylabel("P(wrong | T > B)", fontsize=8)
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(scopes))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Conditional error: P(wrong | reasoning tokens > B)", fontsize=10)
    return fig


def plot_marginal_gain(table: pd.DataFrame, labels: Sequence[str] | None = None) -> Figure:
    """Top: accuracy against thinking budget. Bottom: accuracy gained per ``per_tokens`` of extra budget."""
    if len(table) == 0:
        return _empty("no budget grid")
    labels = _labels(table, labels)
    colors = _colors(labels)
    scopes = level_order(table["difficulty"])
    per = float(table["per_tokens"].iloc[0])
    sol = "budget_solution" in table and table["budget_solution"].nunique() > 1
    # Two stacked axes (accuracy, gain) per difficulty panel.
    fig = Figure(figsize=(3.6 * min(len(scopes), MAX_COLS) + 0.6, 5.6 * math.ceil(len(scopes) / MAX_COLS) + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    nrows = math.ceil(len(scopes) / MAX_COLS)
    ncols = min(len(scopes), MAX_COLS)
    axes = fig.subplots(2 * nrows, ncols, squeeze=False)
    series_keys = []
    for lab in labels:
        sols = sorted(table.loc[table["label"] == lab, "budget_solution"].unique()) if sol else [None]
        series_keys += [(lab, s) for s in sols]
    for i, scope in enumerate(scopes):
        r, c = divmod(i, ncols)
        ax_acc, ax_gain = axes[2 * r, c], axes[2 * r + 1, c]
        sub = table[table["difficulty"] == scope]
        width = 0.8 / max(len(series_keys), 1)
        steps = sorted({(p, b) for p, b in zip(sub["prev_budget"], sub["budget"]) if not pd.isna(p)})
        for j, (lab, s) in enumerate(series_keys):
            part = sub[sub["label"] == lab]
            if s is not None:
                part = part[part["budget_solution"] == s]
            part = part.sort_values("budget")
            if part.empty:
                continue
            name = lab if s is None else f"{lab} (s={s:g})"
            ls = "-" if s is None else ["-", "--", ":", "-."][j % 4]
            yerr = _err(part["accuracy"], part["ci_lo"], part["ci_hi"])
            ax_acc.errorbar(part["budget"], part["accuracy"], yerr=yerr, marker="o", ms=4, capsize=2,
                            color=colors[lab], ls=ls, label=name)
            g = part[part["prev_budget"].notna()]
            xs = [steps.index((p, b)) + (j - (len(series_keys) - 1) / 2) * width
                  for p, b in zip(g["prev_budget"], g["budget"])]
            scale = per / g["delta_budget"]
            err = _err(g["delta_accuracy"] * scale, g["delta_ci_lo"] * scale, g["delta_ci_hi"] * scale)
            ax_gain.bar(xs, g["gain_per_budget"], width=width, color=colors[lab], alpha=0.8,
                        yerr=err, capsize=2, label=name)
        ax_acc.set_title(_title(scope), fontsize=9)
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.set_xlabel("thinking budget (tokens)", fontsize=8)
        ax_acc.set_ylabel("accuracy", fontsize=8)
        ax_acc.grid(alpha=0.3)
        ax_gain.axhline(0, color="k", lw=0.8)
        ax_gain.set_xticks(range(len(steps)))
        ax_gain.set_xticklabels([f"{p:g}->{b:g}" for p, b in steps], fontsize=7)
        ax_gain.set_xlabel("budget step", fontsize=8)
        ax_gain.set_ylabel(f"accuracy gain per {per:g} budget tokens", fontsize=8)
        ax_gain.grid(alpha=0.3, axis="y")
    for k in range(len(scopes), nrows * ncols):
        r, c = divmod(k, ncols)
        axes[2 * r, c].set_visible(False)
        axes[2 * r + 1, c].set_visible(False)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Marginal gain of thinking budget (95% CI)", fontsize=10)
    return fig


def plot_token_effect(table: pd.DataFrame, labels: Sequence[str] | None = None) -> Figure:
    """Forest plot: average marginal effect of tokens on accuracy (pp per unit) with CI, per label and scope.

    Scope "all" pools the tiers with difficulty as a control; other scopes are fits within one tier.
    """
    labels = _labels(table, labels) if len(table) else []
    colors = _colors(labels)
    scopes = level_order(table["difficulty"]) if "difficulty" in table and len(table) else [ALL]
    rows = [(sc, lab) for sc in scopes for lab in labels
            if len(table) and ((table["label"] == lab) & (table.get("difficulty", ALL) == sc)).any()]
    fig = Figure(figsize=(7, 0.35 * max(len(rows), 1) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    unit = table["unit"].iloc[0] if len(table) else ""
    seen = set()
    for i, (sc, lab) in enumerate(rows):
        row = table[(table["label"] == lab) & (table.get("difficulty", ALL) == sc)].iloc[0]
        y = len(rows) - 1 - i
        if row["status"] in ("ok", "firth") and np.isfinite(row["ame"]):
            err = _err([100 * row["ame"]], [100 * row["ame_ci_lo"]], [100 * row["ame_ci_hi"]])
            ax.errorbar([100 * row["ame"]], [y], xerr=err, marker="o", capsize=3, color=colors[lab],
                        label=None if lab in seen else lab)
            seen.add(lab)
            note = f"  OR {row['odds_ratio']:.3g}" + (" (Firth)" if row["status"] == "firth" else "")
            ax.annotate(note, (100 * row["ame_ci_hi"], y), fontsize=7, va="center")
        else:
            ax.annotate(f"  {lab}: no estimate ({row['status']})", (0, y), fontsize=7, va="center")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{_title(sc)} | {lab}" for sc, lab in reversed(rows)], fontsize=7)
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax.set_xlabel(f"accuracy change (percentage points) {unit}; pooled row controls for difficulty and domain",
                  fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    if seen:
        ax.legend(fontsize=7)
    ax.set_title("Token effect (average marginal effect, 95% CI)", fontsize=10)
    return fig


def plot_token_distribution(df: pd.DataFrame, labels: Sequence[str] | None = None, bins: int = 30) -> Figure:
    """Histogram (density) of reasoning tokens per difficulty, one outline per label."""
    if len(df) == 0:
        return _empty("no rows")
    labels = _labels(df, labels)
    colors = _colors(labels)
    scopes = level_order(df["difficulty"])
    fig, axes, _ = _grid(len(scopes))
    for ax, scope in zip(axes.flat, scopes):
        sub = df[df["difficulty"] == scope]
        lo, hi = float(sub["tokens"].min()), float(sub["tokens"].max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        for lab in labels:
            t = sub.loc[sub["label"] == lab, "tokens"]
            if t.empty:
                continue
            ax.hist(t, bins=edges, density=True, histtype="step", lw=1.5, color=colors[lab],
                    label=f"{lab} (mean {t.mean():.3g})")
        ax.set_title(_title(scope), fontsize=9)
        ax.set_xlabel("reasoning tokens", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=6)
    _hide_unused(axes, len(scopes))
    fig.suptitle("Reasoning-token distribution", fontsize=10)
    return fig
