"""Budget schedules: which token budget each training prompt gets, step by step (``budget.schedule``).

A model trained at one budget is good at that budget only; a schedule trains one checkpoint across many.
Every schedule assigns each prompt of a step one budget (the columns ``budget_thinking`` and
``budget_solution`` on the prompt table), shared by the prompt's whole group so that its advantages compare
samples of the same budget. Draws are seeded by (``trainer.seed``, step, prompt id), so a step's budgets
do not depend on the order prompts are drawn in (prefetch, DAPO refills) and a resumed run repeats them.
A schedule that adapts (``curriculum``) keeps its state in the run's resumable state.

Kinds (a registry, like the algorithms'): ``fixed`` (``budget.thinking`` x ``budget.solution``, as without a
schedule), ``mixture`` (thinking and solution drawn per prompt from weighted values or an integer range),
``stages`` (Elastic Reasoning's stages: N steps at one budget, then the next) and ``curriculum`` (a ladder
of budgets from loose to tight, moving on once the accuracy at the current budget reaches a threshold).
"""

from __future__ import annotations

import zlib
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import Budget, BudgetConfig, DrawConfig, parse_budget

COLUMNS = ("budget_thinking", "budget_solution")


class BudgetSchedule:
    """The base: a fixed budget. Subclasses override ``budgets`` (and ``observe``/``state`` when they adapt)."""

    def __init__(self, cfg: BudgetConfig, seed: int = 0, lag: int = 0):
        self.cfg, self.seed, self.lag = cfg, int(seed), int(lag)

    def budgets(self, prompt_ids: list[str], step: int) -> list[Budget]:
        """One budget per prompt of step ``step``."""
        return [Budget(self.cfg.thinking, self.cfg.solution)] * len(prompt_ids)

    def assign(self, prompts: pa.Table, step: int) -> pa.Table:
        """``prompts`` with this step's ``budget_thinking`` and ``budget_solution`` columns (replaced if present)."""
        chosen = self.budgets(prompts["prompt_id"].to_pylist(), step)
        for name in COLUMNS:
            if name in prompts.column_names:
                prompts = prompts.drop_columns([name])
        return (prompts.append_column(COLUMNS[0], pa.array([b.thinking for b in chosen], pa.int32()))
                .append_column(COLUMNS[1], pa.array([b.solution for b in chosen], pa.int32())))

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        """See a step's scored records; returns the schedule's ``schedule/*`` metrics."""
        b = self.budgets([""], step)[0]
        return {"thinking": float(b.thinking), "solution": float(b.solution)}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def support(self) -> tuple[list[int], list[int]]:
        """Every (thinking, solution) value this schedule can assign, each sorted (the warm start tells
        its examples budgets from these when ``budget.prompt_hint`` is on)."""
        return [self.cfg.thinking], [self.cfg.solution]

    def _rng(self, step: int, prompt_id: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), zlib.crc32(str(prompt_id).encode())])


def _draw(d: DrawConfig, default: int, rng: np.random.Generator) -> int:
    if d.values:
        p = np.asarray(d.weights, float) if d.weights else np.ones(len(d.values))
        return int(d.values[rng.choice(len(d.values), p=p / p.sum())])
    if d.range:
        return int(rng.integers(d.range[0], d.range[1], endpoint=True))
    return default


def _values(d: DrawConfig, default: int) -> list[int]:
    if d.values:
        return sorted({int(v) for v, w in zip(d.values, d.weights or [1.0] * len(d.values)) if w > 0})
    return list(range(d.range[0], d.range[1] + 1)) if d.range else [default]


class Mixture(BudgetSchedule):
    """Thinking and solution budgets drawn independently per prompt (``budget.schedule.thinking``/``solution``)."""

    def support(self) -> tuple[list[int], list[int]]:
        s = self.cfg.schedule
        return _values(s.thinking, self.cfg.thinking), _values(s.solution, self.cfg.solution)

    def budgets(self, prompt_ids: list[str], step: int) -> list[Budget]:
        s, out = self.cfg.schedule, []
        for pid in prompt_ids:
            rng = self._rng(step, pid)
            out.append(Budget(_draw(s.thinking, self.cfg.thinking, rng), _draw(s.solution, self.cfg.solution, rng)))
        return out

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        t = np.asarray(records["budget_thinking"].to_numpy(), float)
        s = np.asarray(records["budget_solution"].to_numpy(), float)
        return {"thinking": float(t.mean()), "solution": float(s.mean())}  # this step's mean budgets


class Stages(BudgetSchedule):
    """Elastic Reasoning's stages: ``stages[i].steps`` steps at each budget in turn; the last to the end."""

    def budgets(self, prompt_ids: list[str], step: int) -> list[Budget]:
        return [self.at(step)] * len(prompt_ids)

    def support(self) -> tuple[list[int], list[int]]:
        stages = self.cfg.schedule.stages
        return sorted({st.thinking for st in stages}), sorted({st.solution for st in stages})

    def at(self, step: int) -> Budget:
        end = 0
        for st in self.cfg.schedule.stages:
            end += st.steps
            if step <= end:
                break
        return Budget(st.thinking, st.solution)

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        stages, end = self.cfg.schedule.stages, 0
        index = len(stages) - 1
        for i, st in enumerate(stages[:-1]):
            end += st.steps
            if step <= end:
                index = i
                break
        b = self.at(step)
        return {"thinking": float(b.thinking), "solution": float(b.solution), "stage": float(index)}


class Curriculum(BudgetSchedule):
    """A ladder of budgets from loose to tight. Once the accuracy at the current rung, averaged over the last
    ``window`` steps, reaches ``threshold``, the next rung applies from the next step whose prompts are not
    yet drawn (``lag`` steps later with an off-policy prefetch), so a resumed run draws the same budgets."""

    def __init__(self, cfg: BudgetConfig, seed: int = 0, lag: int = 0):
        super().__init__(cfg, seed, lag)
        s = cfg.schedule
        self.ladder = [parse_budget(x, None, "budget.schedule.ladder") for x in s.ladder]
        self.changes: list[list[int]] = [[0, 0]]  # [first step, rung]
        self.window: deque[float] = deque(maxlen=s.window)

    def rung(self, step: int) -> int:
        return max((c for c in self.changes if c[0] <= step), key=lambda c: c[0])[1]

    def budgets(self, prompt_ids: list[str], step: int) -> list[Budget]:
        return [self.ladder[self.rung(step)]] * len(prompt_ids)

    def support(self) -> tuple[list[int], list[int]]:
        return sorted({b.thinking for b in self.ladder}), sorted({b.solution for b in self.ladder})

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        current = self.changes[-1][1]
        b = self.ladder[current]
        at = pc.and_(pc.equal(records["budget_thinking"], b.thinking), pc.equal(records["budget_solution"], b.solution))
        mine = records.filter(at)
        if mine.num_rows:
            self.window.append(float(np.mean(mine["correct"].to_numpy(zero_copy_only=False))))
        acc = float(np.mean(self.window)) if self.window else 0.0
        full = len(self.window) == self.window.maxlen
        if full and acc >= self.cfg.schedule.threshold and current + 1 < len(self.ladder):
            self.changes.append([step + 1 + self.lag, current + 1])
            self.window.clear()
        used = self.ladder[self.rung(step)]
        return {"thinking": float(used.thinking), "solution": float(used.solution), "rung": float(self.rung(step)),
                "window_accuracy": acc}

    def state(self) -> dict:
        return {"changes": [list(c) for c in self.changes], "window": list(self.window)}

    def restore(self, state: dict) -> None:
        self.changes = [list(map(int, c)) for c in state["changes"]]
        self.window = deque((float(x) for x in state["window"]), maxlen=self.cfg.schedule.window)


SCHEDULES: dict[str, type[BudgetSchedule]] = {"fixed": BudgetSchedule, "mixture": Mixture, "stages": Stages,
                                              "curriculum": Curriculum}


def build_schedule(cfg: BudgetConfig, seed: int = 0, lag: int = 0) -> BudgetSchedule:
    """The schedule ``cfg.schedule.kind`` names (validated in config.py); ``lag``: trainer.off_policy_steps."""
    return SCHEDULES[cfg.schedule.kind](cfg, seed, lag)


def budget_metrics(records: pa.Table) -> dict[str, float]:
    """Per training budget of a step's records: ``{THINKxSOLUTION}/accuracy``, ``reward``, ``mean_tokens``,
    ``truncation_rate``, ``prompts`` and ``samples`` (the trainer logs them under ``budget/``)."""
    grouped = records.group_by(list(COLUMNS)).aggregate([
        ("correct", "mean"), ("reward", "mean"), ("thinking_tokens", "mean"), ("solution_tokens", "mean"),
        ("thinking_truncated", "mean"), ("prompt_id", "count_distinct"), ("correct", "count")])
    out: dict[str, float] = {}
    for r in grouped.to_pylist():
        label = Budget(r["budget_thinking"], r["budget_solution"]).label
        vals = {"accuracy": r["correct_mean"], "reward": r["reward_mean"],
                "mean_tokens": r["thinking_tokens_mean"] + r["solution_tokens_mean"],
                "truncation_rate": r["thinking_truncated_mean"], "prompts": r["prompt_id_count_distinct"],
                "samples": r["correct_count"]}
        out.update({f"{label}/{k}": float(v) for k, v in vals.items() if v is not None})
    return out
