"""Difficulty-aware intervention as a curriculum (orchestrator/curriculum.py).

A preview rollout estimates each prompt's pass rate at the training budget; the estimate persists
across steps and is refreshed from every training rollout (an exponential moving average). Per step:
- prompts the policy always solves (rate >= ``solved_threshold`` after ``min_observations`` samples)
  are dropped (``solved_action: drop``) or kept;
- prompts it rarely solves (rate < ``hint_below``) get a prefix of the reference reasoning as the start
  of the response; the prefix's tokens are injected (loss weight 0). Its length shrinks as the rate
  rises: ``max_hint_fraction * (1 - rate / hint_below)`` of the reasoning's steps (whitespace-separated).
A prompt not yet seen (a step draws 16 of thousands, so most are) takes its difficulty level's pass
rate as a prior (``prior: difficulty``, the mean over that level's previewed and trained samples, the
same moving average): it can get a hint, never be dropped, until its own samples replace the prior.
With ``prior: none`` unseen prompts get no intervention. This is our design (methods.md): the paper's
details are not public.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from orchestrator.config import ConfigError
from orchestrator.curriculum import PREFIX_COLUMN, CurriculumContext


@dataclass
class DifficultyConfig:
    preview_prompts: int = 256  # prompts previewed before training (0: learn rates from training only)
    preview_samples: int = 4
    ema: float = 0.5  # weight of a new observation in the pass-rate estimate
    min_observations: int = 4  # samples before a prompt counts as always solved
    solved_threshold: float = 1.0
    solved_action: str = "drop"  # drop | keep
    hint_below: float = 0.25  # intervene while the estimated pass rate is below this
    max_hint_fraction: float = 0.5  # share of the reference reasoning's steps given at pass rate 0
    prior: str = "difficulty"  # an unseen prompt's rate: its difficulty level's (difficulty) | none
    seed: int = 0

    def validate(self, key: str = "curriculum") -> None:
        def bad(name, value, why):
            raise ConfigError(f"{key}.{name}={value!r}: {why}")

        if self.preview_prompts < 0:
            bad("preview_prompts", self.preview_prompts, "must be >= 0")
        if self.preview_samples < 1:
            bad("preview_samples", self.preview_samples, "must be >= 1")
        if not 0 < self.ema <= 1:
            bad("ema", self.ema, "must be in (0, 1]")
        if not 0 < self.solved_threshold <= 1:
            bad("solved_threshold", self.solved_threshold, "must be in (0, 1]")
        if self.solved_action not in ("drop", "keep"):
            bad("solved_action", self.solved_action, "must be drop or keep")
        if not 0 <= self.hint_below <= 1:
            bad("hint_below", self.hint_below, "must be in [0, 1]")
        if not 0 <= self.max_hint_fraction <= 1:
            bad("max_hint_fraction", self.max_hint_fraction, "must be in [0, 1]")
        if self.prior not in ("difficulty", "none"):
            bad("prior", self.prior, "must be difficulty or none")


def hint_steps(rate: float, num_steps: int, cfg: DifficultyConfig) -> int:
    """How many reference steps a prompt with pass rate ``rate`` is given (0 at or above hint_below)."""
    if cfg.hint_below <= 0 or rate >= cfg.hint_below or num_steps <= 1:
        return 0
    frac = cfg.max_hint_fraction * (1.0 - rate / cfg.hint_below)
    return min(num_steps - 1, math.ceil(frac * num_steps))  # never the whole reasoning


class DifficultyCurriculum:
    def __init__(self, cfg: DifficultyConfig):
        cfg.validate()
        self.cfg = cfg
        self.rates: dict[str, list[float]] = {}  # prompt_id -> [estimated pass rate, samples seen]
        self.levels: dict[str, list[float]] = {}  # str(difficulty) -> [estimated pass rate, samples seen]
        self._last = {"selected": 0, "dropped": 0, "intervened": 0, "hint_steps": 0, "from_prior": 0}

    # ---- Curriculum protocol ------------------------------------------------------------------------

    def setup(self, ctx: CurriculumContext) -> dict[str, float]:
        c = self.cfg
        n = min(c.preview_prompts, ctx.train_prompts.num_rows)
        if n == 0:
            return {}
        idx = np.random.default_rng(c.seed).choice(ctx.train_prompts.num_rows, n, replace=False)
        records = ctx.rollout(ctx.train_prompts.take(pa.array(np.sort(idx))), c.preview_samples)
        self._update(records, first=True)
        rates = np.array([r for r, _ in self.rates.values()])
        ctx.log(f"difficulty preview: {n} prompts x {c.preview_samples} samples; pass rate mean {rates.mean():.3f}, "
                f"never solved {np.mean(rates == 0):.2f}, always solved {np.mean(rates == 1):.2f}")
        return {"preview_prompts": float(n), "preview_pass_rate": float(rates.mean()),
                "preview_never_solved": float(np.mean(rates == 0)), "preview_always_solved": float(np.mean(rates == 1))}

    def select(self, prompts: pa.Table, step: int) -> pa.Table:
        c = self.cfg
        keep, prefixes = [], []
        dropped = intervened = steps_given = from_prior = 0
        ids = prompts["prompt_id"].to_pylist()
        reasoning = prompts["reasoning"].to_pylist() if "reasoning" in prompts.column_names else [None] * len(ids)
        levels = prompts["difficulty"].to_pylist() if "difficulty" in prompts.column_names else [None] * len(ids)
        for i, (pid, ref, level) in enumerate(zip(ids, reasoning, levels)):
            rate, seen = self.rates.get(pid, (None, 0))
            prior = rate is None and c.prior == "difficulty" and str(level) in self.levels
            if prior:
                rate = self.levels[str(level)][0]
            if rate is not None and seen >= c.min_observations and rate >= c.solved_threshold \
                    and c.solved_action == "drop":
                dropped += 1
                continue
            prefix = None
            if rate is not None and ref:
                parts = ref.split()
                k = hint_steps(rate, len(parts), c)
                if k:
                    prefix = " ".join(parts[:k]) + " "
                    intervened += 1
                    steps_given += k
                    from_prior += int(prior)
            keep.append(i)
            prefixes.append(prefix)
        self._last = {"selected": len(keep), "dropped": dropped, "intervened": intervened, "hint_steps": steps_given,
                      "from_prior": from_prior}
        out = prompts.take(pa.array(keep, pa.int64()))
        if PREFIX_COLUMN in out.column_names:
            out = out.drop_columns([PREFIX_COLUMN])
        return out.append_column(PREFIX_COLUMN, pa.array(prefixes, pa.string()))

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        self._update(records)
        last, total = self._last, max(1, self._last["selected"] + self._last["dropped"])
        rates = np.array([r for r, _ in self.rates.values()]) if self.rates else np.zeros(1)
        return {"intervened_share": last["intervened"] / max(1, last["selected"]),
                "prior_intervened_share": last["from_prior"] / max(1, last["selected"]),
                "dropped_share": last["dropped"] / total,
                "mean_hint_steps": last["hint_steps"] / max(1, last["intervened"]),
                "known_prompts": float(len(self.rates)), "mean_pass_rate": float(rates.mean()),
                "never_solved_share": float(np.mean(rates == 0)), "always_solved_share": float(np.mean(rates == 1))}

    def state(self) -> dict:
        return {"rates": self.rates, "levels": self.levels}

    def restore(self, state: dict) -> None:
        self.rates = {k: list(v) for k, v in state["rates"].items()}
        self.levels = {k: list(v) for k, v in state.get("levels", {}).items()}  # absent in older states

    # ---- internals ----------------------------------------------------------------------------------

    def _update(self, records: pa.Table, first: bool = False) -> None:
        """Fold ``records``' correctness into the per-prompt and per-level moving averages."""
        correct = pa.compute.cast(records["correct"], pa.float64())
        keys = [("prompt_id", self.rates, records["prompt_id"])]
        if "difficulty" in records.column_names:
            keys.append(("level", self.levels, pa.compute.cast(records["difficulty"], pa.string())))
        for name, rates, column in keys:
            t = pa.table({name: column, "correct": correct}).group_by(name).aggregate(
                [("correct", "mean"), ("correct", "count")])
            for key, mean, count in zip(t[name].to_pylist(), t["correct_mean"].to_pylist(),
                                        t["correct_count"].to_pylist()):
                if key is None or mean is None:
                    continue
                old = rates.get(key)
                if old is None or first:
                    rates[key] = [float(mean), float(count)]
                else:
                    a = self.cfg.ema
                    rates[key] = [(1 - a) * old[0] + a * float(mean), old[1] + float(count)]
