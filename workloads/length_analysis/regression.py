"""Logistic regression of correctness on reasoning tokens, controlling for difficulty and domain.

Model (per label): ``logit P(correct) = a + b * tokens / per_tokens + C(difficulty) + C(domain)``,
fitted by maximum likelihood (Newton-Raphson). Reported per label:

- ``coef`` (b, log-odds per ``per_tokens`` tokens) with SE, z, p and CI; ``odds_ratio`` = exp(b) with CI;
- ``ame``: the average marginal effect, i.e. the mean over rows of dP/d(tokens/per_tokens) =
  b * p_i (1 - p_i): "accuracy change per ``per_tokens`` tokens" (a probability; ``ame_pp`` is it in
  percentage points), with a delta-method CI.

Standard errors are model-based, or cluster-robust by ``prompt_id`` when some prompt has several rows
(several samples or budgets per prompt are not independent). ``compare_token_effects`` differences the
AME between labels; when the labels share prompt ids the SE accounts for the pairing.

Degenerate inputs return a row with a ``status`` and a ``message`` instead of raising:
``all_correct`` / ``all_wrong`` (no variation to explain), ``no_token_variation``,
``tokens_explained_by_controls`` (tokens do not vary within tiers), ``too_few_rows``,
``not_converged``. A control level whose rows are all correct (or all wrong) has no finite effect;
its rows are dropped and named in the message (the slope's MLE is unchanged by this: those rows carry
no information about it). When tokens separate right from wrong perfectly, the ML estimate does not
exist; the row then carries Firth's penalized estimate (``status="firth"``) and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import linprog
from scipy.special import expit

from .data import ALL, level_order
from .stats import _frame, _z

OK_STATUSES = ("ok", "firth")


@dataclass
class TokenEffect:
    label: str = "input"
    difficulty: str = ALL  # "all": every tier, difficulty as a control; else the fit within one tier
    status: str = "ok"
    message: str = ""
    n: int = 0  # rows given
    n_used: int = 0  # rows in the fit (after dropping constant-outcome levels)
    per_tokens: float = 1000.0
    unit: str = "per 1000 tokens"
    accuracy: float = float("nan")  # of the rows used
    mean_tokens: float = float("nan")
    coef: float = float("nan")
    se: float = float("nan")
    z: float = float("nan")
    p_value: float = float("nan")
    coef_ci_lo: float = float("nan")
    coef_ci_hi: float = float("nan")
    odds_ratio: float = float("nan")
    or_ci_lo: float = float("nan")
    or_ci_hi: float = float("nan")
    ame: float = float("nan")
    ame_se: float = float("nan")
    ame_ci_lo: float = float("nan")
    ame_ci_hi: float = float("nan")
    ame_pp: float = float("nan")
    controls: str = ""
    dropped: str = ""
    method: str = ""  # ml | firth
    cov_type: str = ""  # model | cluster(prompt_id, G=...)
    iterations: int = 0
    # Per-row AME influence values and their cluster ids (for comparisons); not part of the table.
    influence: np.ndarray | None = field(default=None, repr=False)
    clusters: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("influence")
        d.pop("clusters")
        return d


def unit_text(per_tokens: float) -> str:
    return f"per {per_tokens:g} tokens"


# ---------------------------------------------------------------------------------------------
# Fitting


def _loglik(X: np.ndarray, y: np.ndarray, b: np.ndarray) -> float:
    eta = X @ b
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def fit_logistic(X: np.ndarray, y: np.ndarray, *, firth: bool = False, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Newton-Raphson with step halving; Firth's bias-reduced score when ``firth``.

    Returns (coefficients, inverse Fisher information at them, converged, iterations).
    """
    n, k = X.shape
    b = np.zeros(k)

    def objective(beta: np.ndarray) -> float:
        ll = _loglik(X, y, beta)
        if firth:
            p = expit(X @ beta)
            sign, logdet = np.linalg.slogdet(X.T @ (X * (p * (1 - p))[:, None]))
            ll += 0.5 * logdet if sign > 0 else -np.inf
        return ll

    current = objective(b)
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        p = expit(X @ b)
        w = p * (1 - p)
        info = X.T @ (X * w[:, None])
        try:
            inv = np.linalg.inv(info)
        except np.linalg.LinAlgError:
            inv = np.linalg.pinv(info)
        resid = y - p
        if firth:
            h = w * np.einsum("ij,jk,ik->i", X, inv, X)
            resid = resid + h * (0.5 - p)
        step = inv @ (X.T @ resid)
        t = 1.0
        for _ in range(40):
            cand = objective(b + t * step)
            if cand >= current - 1e-12 * (1 + abs(current)):
                break
            t /= 2
        b = b + t * step
        change = abs(cand - current)
        current = cand
        if np.max(np.abs(t * step)) < tol or change < 1e-14 * (1 + abs(current)):
            converged = True
            break
    p = expit(X @ b)
    info = X.T @ (X * (p * (1 - p))[:, None])
    try:
        inv = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(info)
    return b, inv, converged, it


def separated_rows(X: np.ndarray, y: np.ndarray) -> tuple[int, np.ndarray | None]:
    """Linear-programming check for (quasi-)complete separation (Konis 2007).

    Looks for a direction d with s_i x_i.d >= 0 for all rows (s = +1 correct, -1 wrong) and > 0 for
    some; the ML estimate exists iff there is none. Returns (rows strictly separated, d or None).
    """
    s = np.where(y > 0.5, 1.0, -1.0)
    A = X * s[:, None]
    A, counts = np.unique(np.round(A, 12), axis=0, return_counts=True)
    res = linprog(-A.sum(0), A_ub=-A, b_ub=np.zeros(len(A)), bounds=[(-1, 1)] * X.shape[1], method="highs")
    if res.status != 0 or res.x is None:
        return 0, None
    margin = A @ res.x
    tol = 1e-7 * max(1.0, float(np.abs(A).max()))
    strict = margin > tol
    if not strict.any():
        return 0, None
    return int(counts[strict].sum()), res.x


def _dummies(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    levels = level_order(values)
    cols = [(values.to_numpy() == lv).astype(float) for lv in levels[1:]]
    return (np.column_stack(cols) if cols else np.empty((len(values), 0))), levels


def token_effect(df, per_tokens: float = 1000.0, controls: Sequence[str] = ("difficulty", "domain"),
                 cluster: str | None = "prompt_id", confidence: float = 0.95, label: str | None = None) -> TokenEffect:
    """Fit the model on one table (one label) and report the token effect; never raises on degenerate data."""
    df = _frame(df)
    label = label if label is not None else str(df["label"].iloc[0])
    eff = TokenEffect(label=label, n=len(df), per_tokens=float(per_tokens), unit=unit_text(per_tokens))
    notes: list[str] = []

    def give_up(status: str, why: str) -> TokenEffect:
        eff.status = status
        eff.message = "; ".join([why] + notes)
        return eff

    y_all = df["correct"].to_numpy(float)
    if y_all.min() == y_all.max():
        state = "correct" if y_all[0] == 1 else "wrong"
        return give_up(f"all_{state}", f"all {len(df)} rows are {state}: correctness does not vary, so its "
                                       "dependence on tokens cannot be estimated")
    if df["tokens"].nunique() < 2:
        return give_up("no_token_variation", f"every row has {df['tokens'].iloc[0]:g} tokens: no length variation")

    # Controls: keep those with >1 level; drop levels whose outcome is constant (no finite effect).
    active = [c for c in controls if c in df.columns]
    data = df
    dropped = []
    changed = True
    while changed:
        changed = False
        for c in active:
            if data[c].nunique() < 2:
                continue
            rates = data.groupby(c, sort=False)["correct"].agg(["mean", "size"])
            const = rates[(rates["mean"] == 0) | (rates["mean"] == 1)]
            if len(const) and len(const) < len(rates):
                for lv, r in const.iterrows():
                    dropped.append(f"{c}={lv} ({int(r['size'])} rows, all {'correct' if r['mean'] == 1 else 'wrong'})")
                data = data[~data[c].isin(const.index)]
                changed = True
    if dropped:
        notes.append("dropped " + ", ".join(dropped) + ": outcome constant within the level, so the level's "
                     "effect is infinite; the slope uses the other rows")
        eff.dropped = "; ".join(dropped)
    used_controls = []
    for c in active:
        levels = level_order(data[c])
        if len(levels) > 1:
            used_controls.append(c)
        elif levels == [ALL]:
            notes.append(f"no {c} column: not a control")
        else:
            notes.append(f"{c} has one level ({levels[0]!r}): not a control")
    eff.controls = ", ".join(f"{c} ({data[c].nunique()} levels)" for c in used_controls) or "none"
    eff.n_used = len(data)
    y = data["correct"].to_numpy(float)
    eff.accuracy = float(y.mean())
    eff.mean_tokens = float(data["tokens"].mean())
    x = data["tokens"].to_numpy(float) / per_tokens
    if np.std(x) == 0:
        return give_up("no_token_variation", f"after dropping constant levels every row has {x[0] * per_tokens:g} tokens")

    # Design: intercept, standardized tokens, dummies (full-rank subset).
    mean_x, sd_x = float(x.mean()), float(x.std())
    zx = (x - mean_x) / sd_x
    blocks = [np.ones((len(data), 1))]
    for c in used_controls:
        blocks.append(_dummies(data[c])[0])
    C = np.column_stack(blocks)
    q, r = np.linalg.qr(C)
    keep = np.abs(np.diag(r)) > 1e-9 * max(1.0, np.abs(np.diag(r)).max())
    if not keep.all():
        notes.append(f"{int((~keep).sum())} control dummies are collinear (nested levels) and were left out")
        C = C[:, keep]
    resid = zx - C @ np.linalg.lstsq(C, zx, rcond=None)[0]
    if np.var(resid) < 1e-10:
        return give_up("tokens_explained_by_controls", "tokens do not vary within the control levels "
                       f"({eff.controls}): their effect cannot be separated from the controls")
    X = np.column_stack([C[:, :1], zx, C[:, 1:]])
    k = X.shape[1]
    if len(y) <= k + 1 or min(y.sum(), len(y) - y.sum()) < 1:
        return give_up("too_few_rows", f"{len(y)} rows for {k} parameters")

    b, inv, converged, iters = fit_logistic(X, y)
    n_sep, direction = 0, None
    if not converged or not np.all(np.isfinite(b)) or np.max(np.abs(X @ b)) > 20:
        # Diverging or saturated fit: confirm separation with the LP (costly, so only here).
        n_sep, direction = separated_rows(X, y)
    firth = n_sep > 0
    if firth:
        if abs(direction[1]) > 1e-9:
            rule = (f"a linear rule in tokens{' and controls' if k > 2 else ''} (correct rows have "
                    f"{'more' if direction[1] > 0 else 'fewer'} tokens)")
        else:
            rule = "a combination of control levels"
        notes.insert(0, f"perfect separation: {rule} predicts correctness with no error ({n_sep} of {len(y)} rows "
                        "strictly, the rest on the boundary), "
                        "so the ML estimate does not exist; Firth's penalized estimate is shown "
                        "(its CI is approximate)")
        b, inv, converged, iters = fit_logistic(X, y, firth=True)
    eff.iterations = iters
    eff.method = "firth" if firth else "ml"
    if not converged or not np.all(np.isfinite(b)):
        return give_up("not_converged", f"Newton-Raphson did not converge in {iters} iterations")

    p = expit(X @ b)
    w = p * (1 - p)
    # AME in standardized units and its gradient (delta method).
    ame_z = b[1] * w.mean()
    grad = (b[1] * (w * (1 - 2 * p))[:, None] * X).mean(0)
    grad[1] += w.mean()
    phi = (X * (y - p)[:, None]) @ inv  # per-row influence of the coefficients (inv is symmetric)
    psi = phi @ grad  # per-row influence of the AME
    cluster_ids = None
    cov_b = inv
    if not firth and cluster and cluster in data.columns and data[cluster].notna().all():
        ids = data[cluster].astype(str).to_numpy()
        codes, uniq = pd.factorize(ids)
        G = len(uniq)
        if G < len(ids) and G > 1:
            sums = np.zeros((G, k))
            np.add.at(sums, codes, phi)
            corr = G / (G - 1) * (len(ids) - 1) / (len(ids) - k)
            cov_b = corr * sums.T @ sums
            eff.cov_type = f"cluster({cluster}, G={G})"
        else:
            eff.cov_type = "model"
        cluster_ids = ids
    else:
        eff.cov_type = "model"
    var_ame_z = float(grad @ cov_b @ grad)
    zc = _z(confidence)
    scale = 1.0 / sd_x  # standardized -> per ``per_tokens`` tokens
    eff.coef = float(b[1] * scale)
    eff.se = float(np.sqrt(cov_b[1, 1]) * scale)
    eff.z = eff.coef / eff.se if eff.se > 0 else float("nan")
    eff.p_value = float(2 * sps.norm.sf(abs(eff.z)))
    eff.coef_ci_lo, eff.coef_ci_hi = eff.coef - zc * eff.se, eff.coef + zc * eff.se
    eff.odds_ratio = float(np.exp(eff.coef))
    eff.or_ci_lo, eff.or_ci_hi = float(np.exp(eff.coef_ci_lo)), float(np.exp(eff.coef_ci_hi))
    eff.ame = float(ame_z * scale)
    eff.ame_se = float(np.sqrt(max(var_ame_z, 0.0)) * scale)
    eff.ame_ci_lo, eff.ame_ci_hi = eff.ame - zc * eff.ame_se, eff.ame + zc * eff.ame_se
    eff.ame_pp = 100 * eff.ame
    eff.influence = psi * scale
    eff.clusters = cluster_ids
    eff.status = "firth" if firth else "ok"
    eff.message = "; ".join(notes)
    return eff


def token_effects(df, per_tokens: float = 1000.0, controls: Sequence[str] = ("difficulty", "domain"),
                  cluster: str | None = "prompt_id", confidence: float = 0.95,
                  by_difficulty: bool = False) -> tuple[pd.DataFrame, list[TokenEffect]]:
    """``token_effect`` for every label: (table with one row per label and scope, the TokenEffect objects).

    Scope ``difficulty="all"`` pools the tiers with difficulty as a control; ``by_difficulty`` adds one
    fit per tier (controls other than difficulty still apply), since the slope can differ by tier.
    """
    df = _frame(df)
    effects = [token_effect(part, per_tokens, controls, cluster, confidence, label=str(label))
               for label, part in df.groupby("label", sort=False)]
    if by_difficulty and df["difficulty"].nunique() > 1:
        within = [c for c in controls if c != "difficulty"]
        for level in level_order(df["difficulty"]):
            tier = df[df["difficulty"] == level]
            for label, part in tier.groupby("label", sort=False):
                e = token_effect(part, per_tokens, within, cluster, confidence, label=str(label))
                e.difficulty = level
                effects.append(e)
    return pd.DataFrame([e.row() for e in effects]), effects


def compare_token_effects(effects: Sequence[TokenEffect], confidence: float = 0.95) -> pd.DataFrame:
    """AME of each label minus the first label's (the reference) within each difficulty scope, with a CI.

    If both labels' rows carry prompt ids, the SE comes from the per-prompt sums of the two fits'
    influence values (paired: the same prompts in both tables). Otherwise the two estimates are
    treated as independent (var = se_a^2 + se_b^2).
    """
    columns = ["difficulty", "label", "reference", "diff_ame", "diff_se", "diff_ci_lo", "diff_ci_hi", "diff_pp",
               "p_value", "se_method", "message"]
    rows = []
    zc = _z(confidence)
    scopes: dict[str, list[TokenEffect]] = {}
    for e in effects:
        scopes.setdefault(e.difficulty, []).append(e)
    pairs = [(group[0], e) for group in scopes.values() for e in group[1:]]
    for ref, e in pairs:
        row = dict(difficulty=e.difficulty, label=e.label, reference=ref.label, diff_ame=np.nan, diff_se=np.nan,
                   diff_ci_lo=np.nan,
                   diff_ci_hi=np.nan, diff_pp=np.nan, p_value=np.nan, se_method="", message="")
        if e.status not in OK_STATUSES or ref.status not in OK_STATUSES:
            bad = e if e.status not in OK_STATUSES else ref
            row["message"] = f"no estimate for {bad.label!r} ({bad.status})"
            rows.append(row)
            continue
        if e.per_tokens != ref.per_tokens:
            raise ValueError("compare_token_effects: effects use different per_tokens units")
        diff = e.ame - ref.ame
        paired = (e.clusters is not None and ref.clusters is not None and e.status == ref.status == "ok"
                  and len(set(e.clusters) & set(ref.clusters)) > 0)
        if paired:
            ids = np.concatenate([ref.clusters, e.clusters])
            vals = np.concatenate([-ref.influence, e.influence])
            codes, uniq = pd.factorize(ids)
            sums = np.zeros(len(uniq))
            np.add.at(sums, codes, vals)
            G = len(uniq)
            se = float(np.sqrt(G / max(G - 1, 1) * np.sum(sums**2)))
            shared = len(set(e.clusters) & set(ref.clusters))
            row["se_method"] = f"paired by prompt ({shared} shared prompts)"
        else:
            se = float(np.hypot(e.ame_se, ref.ame_se))
            row["se_method"] = "independent"
        row.update(diff_ame=diff, diff_se=se, diff_ci_lo=diff - zc * se, diff_ci_hi=diff + zc * se, diff_pp=100 * diff,
                   p_value=float(2 * sps.norm.sf(abs(diff / se))) if se > 0 else np.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
