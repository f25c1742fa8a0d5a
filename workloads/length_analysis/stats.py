"""Descriptive statistics of accuracy vs reasoning length, on the canonical frame (see ``data``).

- ``accuracy_by_tier``: accuracy and token use per label x domain x difficulty (and pooled).
- ``accuracy_by_bin``: accuracy per token bin within each difficulty tier and domain.
- ``conditional_error``: P(wrong | T > B) over a grid of thresholds B, pooled and per tier.
- ``marginal_gain``: accuracy at each thinking budget of a budget-grid eval, and what each extra
  block of budget buys (delta accuracy per ``per_tokens`` of budget and of tokens actually spent).

Every proportion carries its count and a Wilson (default) or Jeffreys interval. Inputs are pandas
DataFrames (or Arrow tables) with the canonical columns; outputs are DataFrames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats as sps

from .data import ALL, level_order


def _frame(df: pd.DataFrame | pa.Table) -> pd.DataFrame:
    df = df.to_pandas() if isinstance(df, pa.Table) else df
    missing = [c for c in ("correct", "tokens") if c not in df.columns]
    if missing:
        raise ValueError(f"canonical frame lacks column {missing[0]!r} (map your table with data.canonical)")
    if len(df) == 0:
        raise ValueError("empty table: nothing to analyze")
    df = df.copy()
    for col, default in (("label", "input"), ("difficulty", ALL), ("domain", ALL)):
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].astype(str)
    return df


def _z(confidence: float) -> float:
    return float(sps.norm.ppf(0.5 + confidence / 2))


def proportion_ci(k, n, method: str = "wilson", confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided CI for a binomial proportion k/n (arrays allowed); NaN where n == 0.

    Wilson: the score interval. Jeffreys: Beta(k + 1/2, n - k + 1/2) quantiles, with the bound set to
    0 (k == 0) or 1 (k == n) as Brown, Cai & DasGupta (2001) recommend.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    alpha = 1 - confidence
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "wilson":
            z = _z(confidence)
            p = k / n
            denom = 1 + z**2 / n
            center = (p + z**2 / (2 * n)) / denom
            half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
            lo, hi = center - half, center + half
        elif method == "jeffreys":
            lo = sps.beta.ppf(alpha / 2, k + 0.5, n - k + 0.5)
            hi = sps.beta.ppf(1 - alpha / 2, k + 0.5, n - k + 0.5)
        else:
            raise ValueError(f"ci method {method!r}: use 'wilson' or 'jeffreys'")
        lo = np.where(k == 0, 0.0, lo)  # exact for Wilson, the Brown-Cai-DasGupta rule for Jeffreys
        hi = np.where(k == n, 1.0, hi)
    empty = n <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(empty, 0.0, k / np.where(empty, 1.0, n))
    lo = np.where(empty, np.nan, np.clip(np.minimum(lo, p), 0.0, 1.0))  # rounding never puts p outside
    hi = np.where(empty, np.nan, np.clip(np.maximum(hi, p), 0.0, 1.0))
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Bins


def token_edges(tokens, method: str = "quantile", n: int = 5, width: float | None = None,
                edges: Sequence[float] | None = None) -> np.ndarray:
    """Bin edges for ``tokens``. Bins are [lo, hi) except the last, which includes its upper edge.

    quantile: ``n`` equal-count bins (ties merge edges, so fewer bins come out on discrete data);
    fixed: ``[k*width, (k+1)*width)`` covering the data; edges: as given, widened with -inf/+inf
    when the data fall outside.
    """
    t = np.asarray(tokens, dtype=float)
    t = t[np.isfinite(t)]
    if len(t) == 0:
        raise ValueError("no finite token values to bin")
    if method == "quantile":
        q = np.unique(np.quantile(t, np.linspace(0, 1, n + 1)))
        return q if len(q) > 1 else np.array([q[0], q[0]])
    if method == "fixed":
        if width is None or not width > 0:
            raise ValueError("fixed bins need width > 0")
        lo = np.floor(t.min() / width) * width
        hi = (np.floor(t.max() / width) + 1) * width
        return np.arange(round((hi - lo) / width) + 1) * width + lo
    if method == "edges":
        e = np.asarray(list(edges or []), dtype=float)
        if len(e) < 2 or np.any(np.diff(e) <= 0):
            raise ValueError(f"bin edges {list(e)} must be at least two strictly increasing values")
        if t.min() < e[0]:
            e = np.concatenate([[-np.inf], e])
        if t.max() > e[-1]:
            e = np.concatenate([e, [np.inf]])
        return e
    raise ValueError(f"bin method {method!r}: use quantile, fixed or edges")


def assign_bins(tokens, edges: np.ndarray) -> np.ndarray:
    """Index of each value's bin under ``token_edges`` conventions (last bin closed on the right)."""
    nbins = max(len(edges) - 1, 1)
    idx = np.searchsorted(edges, np.asarray(tokens, dtype=float), side="right") - 1
    return np.clip(idx, 0, nbins - 1)


def _bin_label(lo: float, hi: float, last: bool) -> str:
    if lo == hi:
        return f"{lo:g}"
    return f"[{lo:g}, {hi:g}{']' if last else ')'}"


def _ordered(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Sort rows by domain, difficulty (natural order), label (input order)."""
    keys = {}
    if "domain" in df:
        keys["domain"] = {v: i for i, v in enumerate(level_order(df["domain"]))}
    if "difficulty" in df:
        keys["difficulty"] = {v: i for i, v in enumerate(level_order(df["difficulty"]))}
    keys["label"] = {v: i for i, v in enumerate(labels)}
    sort = pd.DataFrame({k: df[k].map(m) for k, m in keys.items()}, index=df.index)
    rest = [c for c in ("budget_solution", "threshold", "budget", "bin") if c in df]
    order = pd.concat([sort, df[rest]], axis=1).sort_values(list(sort.columns) + rest, kind="stable").index
    return df.loc[order].reset_index(drop=True)


def accuracy_by_tier(df, ci: str = "wilson", confidence: float = 0.95) -> pd.DataFrame:
    """Per label x domain x difficulty, plus pooled rows (``"all"``): n, accuracy (CI), token stats."""
    df = _frame(df)
    labels = list(pd.unique(df["label"]))
    parts = [df]
    if df["difficulty"].nunique() > 1 or df["domain"].nunique() > 1:
        parts.append(df.assign(difficulty=ALL, domain=ALL))
    if df["difficulty"].nunique() > 1 and df["domain"].nunique() > 1:
        parts.append(df.assign(difficulty=ALL))
        parts.append(df.assign(domain=ALL))
    g = pd.concat(parts).groupby(["label", "domain", "difficulty"], sort=False)
    out = g.agg(n=("correct", "size"), n_correct=("correct", "sum"), mean_tokens=("tokens", "mean"),
                median_tokens=("tokens", "median")).reset_index()
    out["accuracy"] = out["n_correct"] / out["n"]
    out["ci_lo"], out["ci_hi"] = proportion_ci(out["n_correct"], out["n"], ci, confidence)
    out["n_correct"] = out["n_correct"].astype("int64")
    cols = ["label", "domain", "difficulty", "n", "n_correct", "accuracy", "ci_lo", "ci_hi",
            "mean_tokens", "median_tokens"]
    return _ordered(out[cols], labels)


def accuracy_by_bin(df, method: str = "quantile", n: int = 5, width: float | None = None,
                    edges: Sequence[float] | None = None, ci: str = "wilson",
                    confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy per token bin within each domain x difficulty tier, for every label.

    Edges are shared by all labels of a tier (quantile edges come from the pooled tokens of that tier;
    fixed and explicit edges are global), so labels can be compared bin by bin.
    """
    df = _frame(df)
    labels = list(pd.unique(df["label"]))
    rows = []
    for (domain, difficulty), tier in df.groupby(["domain", "difficulty"], sort=False):
        e = token_edges(tier["tokens"], method, n, width, edges)
        nb = max(len(e) - 1, 1)
        b = assign_bins(tier["tokens"], e)
        tier = tier.assign(bin=b)
        g = tier.groupby(["label", "bin"], sort=False).agg(
            n=("correct", "size"), n_correct=("correct", "sum"), mean_tokens=("tokens", "mean")
        ).reset_index()
        g["domain"], g["difficulty"] = domain, difficulty
        g["bin_lo"] = e[g["bin"]]
        g["bin_hi"] = e[np.minimum(g["bin"] + 1, len(e) - 1)]
        g["bin_label"] = [_bin_label(lo, hi, i == nb - 1) for lo, hi, i in zip(g["bin_lo"], g["bin_hi"], g["bin"])]
        rows.append(g)
    out = pd.concat(rows, ignore_index=True)
    out["accuracy"] = out["n_correct"] / out["n"]
    out["ci_lo"], out["ci_hi"] = proportion_ci(out["n_correct"], out["n"], ci, confidence)
    out["n_correct"] = out["n_correct"].astype("int64")
    out["bin"] = out["bin"].astype("int64")
    cols = ["label", "domain", "difficulty", "bin", "bin_lo", "bin_hi", "bin_label", "n", "n_correct",
            "accuracy", "ci_lo", "ci_hi", "mean_tokens"]
    return _ordered(out[cols], labels)


# ---------------------------------------------------------------------------------------------
# P(wrong | T > B)


def default_thresholds(tokens, n: int = 10) -> list[float]:
    """Token quantiles at 0, 1/n, ..., (n-1)/n (distinct values): every B leaves some rows above it."""
    t = np.asarray(tokens, dtype=float)
    qs = np.unique(np.quantile(t[np.isfinite(t)], np.arange(n) / n))
    return [float(x) for x in qs]


def conditional_error(df, thresholds: Sequence[float] | None = None, n_thresholds: int = 10,
                      ci: str = "wilson", confidence: float = 0.95) -> pd.DataFrame:
    """P(wrong | T > B) for each label and threshold B, pooled (difficulty ``"all"``) and per tier.

    Columns: ``n_above`` rows with T > B, ``wrong_above`` of them wrong, ``p_wrong`` with CI, the
    share of rows above B, and the error rate at or below B for contrast. B with no row above it
    gives n_above = 0 and NaN rates. ``thresholds=None``: each scope's token quantiles, pooled over the
    labels (so labels share B within a scope).
    """
    df = _frame(df)
    labels = list(pd.unique(df["label"]))
    scopes = [(ALL, df)]
    if df["difficulty"].nunique() > 1:
        scopes += [(d, df[df["difficulty"] == d]) for d in level_order(df["difficulty"])]
    rows = []
    for scope, sub in scopes:
        grid = np.asarray(sorted(set(thresholds)) if thresholds is not None
                          else default_thresholds(sub["tokens"], n_thresholds), dtype=float)
        for label, part in sub.groupby("label", sort=False):
            t = part["tokens"].to_numpy()
            wrong = 1 - part["correct"].to_numpy()
            above = t[None, :] > grid[:, None]
            n_above = above.sum(1)
            w_above = (above * wrong[None, :]).sum(1)
            n_below = len(t) - n_above
            w_below = wrong.sum() - w_above
            for i, b in enumerate(grid):
                rows.append((label, scope, float(b), len(t), int(n_above[i]), int(w_above[i]),
                             int(n_below[i]), int(w_below[i])))
    out = pd.DataFrame(rows, columns=["label", "difficulty", "threshold", "n", "n_above", "wrong_above",
                                      "n_below", "wrong_below"])
    with np.errstate(divide="ignore", invalid="ignore"):
        out["share_above"] = out["n_above"] / out["n"]
        out["p_wrong"] = out["wrong_above"] / out["n_above"].where(out["n_above"] > 0)
        out["p_wrong_below"] = out["wrong_below"] / out["n_below"].where(out["n_below"] > 0)
    out["ci_lo"], out["ci_hi"] = proportion_ci(out["wrong_above"], out["n_above"], ci, confidence)
    cols = ["label", "difficulty", "threshold", "n", "n_above", "share_above", "wrong_above", "p_wrong",
            "ci_lo", "ci_hi", "n_below", "wrong_below", "p_wrong_below"]
    return _ordered(out[cols], labels)


# ---------------------------------------------------------------------------------------------
# Budget grid: marginal gain


def _pair_key(df: pd.DataFrame) -> pd.Series | None:
    if "prompt_id" not in df:
        return None
    key = df["prompt_id"].astype(str)
    if "sample_index" in df:
        key = key + "#" + df["sample_index"].astype("Int64").astype(str)
    return key


def _delta_se(prev: pd.DataFrame, cur: pd.DataFrame) -> tuple[float, str]:
    """SE of acc(cur) - acc(prev): paired by prompt (and sample) when both hold the same unique keys."""
    kp, kc = _pair_key(prev), _pair_key(cur)
    if kp is not None and kp.is_unique and kc.is_unique and set(kp) == set(kc) and len(kp) > 1:
        a = pd.Series(prev["correct"].to_numpy(float), index=kp.to_numpy())
        b = pd.Series(cur["correct"].to_numpy(float), index=kc.to_numpy())
        d = (b - a.reindex(b.index)).to_numpy()
        return float(np.std(d, ddof=1) / np.sqrt(len(d))), "paired"
    p1, n1 = prev["correct"].mean(), len(prev)
    p2, n2 = cur["correct"].mean(), len(cur)
    return float(np.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)), "unpaired"


def marginal_gain(df, per_tokens: float = 1000.0, ci: str = "wilson", confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy at each thinking budget, and the gain between consecutive budgets, per difficulty.

    Needs a ``budget`` column (the row's thinking budget); groups by ``budget_solution`` too when
    present. For each budget after the first: ``delta_accuracy`` (Wald CI; paired by prompt_id and
    sample_index when the two budgets hold the same prompts), ``gain_per_budget`` = delta accuracy per
    ``per_tokens`` of extra budget, ``gain_per_token_spent`` = per ``per_tokens`` of extra tokens
    actually used (NaN when the mean barely moves).
    """
    df = _frame(df)
    if "budget" not in df:
        raise ValueError("marginal gain needs a budget column (columns.budget, e.g. budget_thinking)")
    df = df[df["budget"].notna()]
    if len(df) == 0:
        raise ValueError("marginal gain: no row has a budget value")
    labels = list(pd.unique(df["label"]))
    z = _z(confidence)
    group_cols = ["label"] + (["budget_solution"] if "budget_solution" in df else [])
    scopes = [(ALL, df)]
    if df["difficulty"].nunique() > 1:
        scopes += [(d, df[df["difficulty"] == d]) for d in level_order(df["difficulty"])]
    rows = []
    for scope, sub in scopes:
        for key, grp in sub.groupby(group_cols, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            prev = None
            for budget, at in sorted(grp.groupby("budget"), key=lambda kv: kv[0]):
                row = dict(zip(group_cols, key))
                row.update(difficulty=scope, budget=float(budget), n=len(at), n_correct=int(at["correct"].sum()),
                           accuracy=float(at["correct"].mean()), mean_tokens=float(at["tokens"].mean()))
                if prev is not None:
                    pb, pat = prev
                    d_acc = row["accuracy"] - float(pat["correct"].mean())
                    se, how = _delta_se(pat, at)
                    d_tok = row["mean_tokens"] - float(pat["tokens"].mean())
                    row.update(prev_budget=float(pb), delta_budget=float(budget - pb), delta_accuracy=d_acc,
                               delta_ci_lo=d_acc - z * se, delta_ci_hi=d_acc + z * se, delta_ci_method=how,
                               delta_tokens=d_tok, gain_per_budget=d_acc / (budget - pb) * per_tokens,
                               gain_per_token_spent=(d_acc / d_tok * per_tokens) if abs(d_tok) > 1e-9 else np.nan)
                rows.append(row)
                prev = (budget, at)
    out = pd.DataFrame(rows)
    for col in ("prev_budget", "delta_budget", "delta_accuracy", "delta_ci_lo", "delta_ci_hi", "delta_tokens",
                "gain_per_budget", "gain_per_token_spent"):
        if col not in out:
            out[col] = np.nan
        out[col] = out[col].astype(float)
    if "delta_ci_method" not in out:
        out["delta_ci_method"] = None
    out["ci_lo"], out["ci_hi"] = proportion_ci(out["n_correct"], out["n"], ci, confidence)
    out["per_tokens"] = float(per_tokens)
    cols = group_cols + ["difficulty", "budget", "n", "n_correct", "accuracy", "ci_lo", "ci_hi", "mean_tokens",
                         "prev_budget", "delta_budget", "delta_accuracy", "delta_ci_lo", "delta_ci_hi",
                         "delta_ci_method", "delta_tokens", "gain_per_budget", "gain_per_token_spent", "per_tokens"]
    return _ordered(out[cols], labels)


def select_budget(df, budget_filter: str = "max") -> tuple[pd.DataFrame, str]:
    """Rows for the length analyses: each label's largest budget ("max"), every row ("all"), or one value.

    Returns (rows, description). Without a budget column every row is used.
    """
    df = _frame(df)
    if "budget" not in df or budget_filter == "all":
        return df, "all rows"
    parts, desc = [], []
    for label, part in df.groupby("label", sort=False):
        if part["budget"].isna().all():  # this input has no budget grid: use all its rows
            parts.append(part)
            desc.append(f"{label}: all {len(part)} rows (no budget)")
            continue
        if budget_filter == "max":
            b = part["budget"].max()
            keep = part["budget"] == b
            text = f"{label}: budget {b:g}"
            if "budget_solution" in part and part.loc[keep, "budget_solution"].nunique() > 1:
                s = part.loc[keep, "budget_solution"].max()
                keep &= part["budget_solution"] == s
                text += f"x{s:g}"
        else:
            b = float(budget_filter)
            keep = part["budget"] == b
            text = f"{label}: budget {b:g}"
            if not keep.any():
                raise ValueError(f"budget_filter={budget_filter!r}: input {label!r} has no rows at that budget; "
                                 f"it has {', '.join(f'{x:g}' for x in sorted(part['budget'].dropna().unique()))}")
        parts.append(part[keep])
        desc.append(f"{text} ({int(keep.sum())} rows)")
    return pd.concat(parts, ignore_index=True), "; ".join(desc)
