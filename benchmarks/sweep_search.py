"""Optuna multi-objective TPE vs random search at the same number of trial-steps: hypervolume ratio.

Runs the quickstart sweep (``configs/sweeps/quickstart.yaml``: tiny model, addition, objectives accuracy
at 16x8 up and unconstrained mean tokens down) twice per repeat through the project's own ``run_sweep``:
once with ``sampler=tpe`` (multivariate TPE, constant liar) and once with ``sampler=random``, with the
same trials, steps per trial, concurrency and sampler seed. Each sweep gets a fresh Optuna study in its
own SQLite file and its own MLflow experiment, all under ``--out``; both share the warm-start
checkpoint (cached by config hash under ``--out``), which is built once before the clock starts.

The hypervolume of each final Pareto front (complete trials) is computed with ``frontier.hypervolume``
against ONE reference point common to every sweep of the run: ``sweep.front.reference_point`` applied to the
union of all trials, i.e. accuracy 0 and mean tokens = the unconstrained budget's cap (thinking +
solution = 72): fixed worst values derived from the objectives' bounds, the same point the sweep logs
its own ``frontier/hypervolume`` against. (Only an objective with no natural bound would fall back to
1.1 x the worst value seen over all sweeps: the worse-of-both nadir, still common.) See docs/sweeps.md.

    .venv/bin/python benchmarks/sweep_search.py                      # 8 trials x 32 steps, 2 at a time, 1 repeat
    .venv/bin/python benchmarks/sweep_search.py --quick              # smoke run: 2 trials x 2 steps, short warm start
    .venv/bin/python benchmarks/sweep_search.py --repeats 3 --out /tmp/sweep-bench --n-startup-trials 2
    .venv/bin/python benchmarks/sweep_search.py --report /tmp/sweep-bench/bench-TIME   # table of an earlier run

Extra ``key=value`` arguments are sweep overrides applied to both searchers (``base.KEY=value`` for the
base training config). Prints one line per finished trial, a table (searcher, trials, trial-steps, front
size, hypervolume, wall time) and, last, the ratio optuna/random. Exit status 0 when every sweep
finished, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's orchestrator
    sys.path.insert(0, str(ROOT))

from orchestrator import frontier  # noqa: E402
from orchestrator.config import ConfigError  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "sweeps" / "quickstart.yaml"
SEARCHERS = {"optuna": "tpe", "random": "random"}  # label -> sampler; ratio is optuna/random


# ---------------------------------------------------------------------------------------------
# Hypervolume comparison (pure functions; tests/test_sweep_bench.py checks them on known fronts)


def common_reference(plan, tables: list[pd.DataFrame]) -> dict[str, float]:
    """One hypervolume reference for every sweep: ``sweep.front.reference_point`` over the union of their trials.

    Objectives with a natural bound (accuracy 0, mean tokens at a budget's cap) get that bound whatever
    the trials did; any other objective gets 1.1 x the worst value over all sweeps (worse-of-all nadir).
    """
    from orchestrator.sweep import reference_point

    frames = [t for t in tables if not t.empty]
    union = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not union.empty and "state" in union:
        union = union[union["state"] == "COMPLETE"]
    return reference_point(plan, union)


def front_hypervolume(trials: pd.DataFrame, maximize: list[str], minimize: list[str],
                      reference: dict[str, float]) -> tuple[int, float]:
    """(Pareto front size, hypervolume) of a sweep's complete trials against ``reference``."""
    if trials.empty:
        return 0, 0.0
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials
    if done.empty:
        return 0, 0.0
    size = int(frontier.pareto_mask(done, maximize, minimize).sum())
    return size, float(frontier.hypervolume(done, maximize, minimize, reference=reference))


def summarize(rows: list[dict]) -> dict:
    """Mean / spread of each searcher's hypervolume and the optuna/random ratio over repeats.

    ``ratio_of_means`` is mean HV(optuna) / mean HV(random); ``ratios`` are the per-repeat ratios
    (inf where only random's hypervolume is 0, nan where both are); ``ratio_of_means`` is None when a
    searcher has no sweep.
    """
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        by.setdefault(r["searcher"], {})[r["repeat"]] = r["hypervolume"]
    out: dict = {}
    for name, hv in by.items():
        v = np.array(list(hv.values()), dtype=float)
        out[name] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                     "min": float(v.min()), "max": float(v.max()), "n": len(v)}
    a, b = by.get("optuna", {}), by.get("random", {})
    ratios = [_ratio(a[k], b[k]) for k in sorted(set(a) & set(b))]
    out["ratios"] = ratios
    out["ratio_of_means"] = _ratio(out["optuna"]["mean"], out["random"]["mean"]) if a and b else None
    return out


def _ratio(x: float, y: float) -> float:
    """x / y; inf when only y is 0, nan when both are (no front beat the reference)."""
    if y > 0:
        return x / y
    return math.inf if x > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Running the sweeps


class TrialProgress(threading.Thread):
    """Prints one line per trial of a study as it finishes (polls the study's storage, read only)."""

    def __init__(self, storage: str, study_name: str, tag: str, target: int, objectives, every: float = 10.0):
        super().__init__(daemon=True, name=f"progress-{tag}")
        self.storage, self.study_name, self.tag, self.target = storage, study_name, tag, target
        self.objectives, self.every = objectives, every
        self.seen: set[int] = set()
        self.t0 = time.time()
        self._stop_event = threading.Event()

    def poll(self) -> None:
        import optuna
        from optuna.trial import TrialState

        from orchestrator.sweep import open_storage

        try:
            study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage),
                                      sampler=optuna.samplers.RandomSampler())
        except Exception:  # noqa: BLE001 - not created yet
            return
        for t in study.get_trials(deepcopy=False):
            if t.number in self.seen or t.state == TrialState.RUNNING or t.state == TrialState.WAITING:
                continue
            self.seen.add(t.number)
            vals = ", ".join(f"{o.name}={v:.4g}" for o, v in zip(self.objectives, t.values or []))
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
            print(f"[{self.tag}] trial {t.number} {t.state.name} {vals} | {params} "
                  f"({len(self.seen)}/{self.target}, {time.time() - self.t0:.0f} s)", flush=True)

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            self.poll()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.poll()


def sweep_overrides(args, run_dir: Path, label: str, repeat: int) -> list[str]:
    """Sweep overrides of one searcher's sweep: its own study/storage/experiment, shared output_dir."""
    out = Path(args.out).resolve()
    study = f"{run_dir.name}-{label}-r{repeat}"
    ov = [f"study_name={study}", f"sampler={SEARCHERS[label]}", f"num_trials={args.trials}",
          f"max_concurrency={args.concurrency}", f"seed={args.seed + repeat}",
          f"storage=sqlite:///{run_dir / f'{label}-r{repeat}.optuna.db'}",
          f"tracking_uri=sqlite:///{run_dir / 'mlflow.db'}", f"experiment={study}",
          # Everything a trial writes (runs, the tiny model, the shared warm start) stays under --out.
          f"base.trainer.output_dir={out}", f"base.model.path={out / 'models' / 'tiny-base'}",
          f"base.trainer.steps={args.steps}", "base.trainer.eval_every=0"]
    if args.n_startup_trials is not None:
        ov.append(f"n_startup_trials={args.n_startup_trials}")
    if args.quick:
        ov += ["base.warmstart.steps=20", "base.eval.num_prompts=16"]
    return [*ov, *args.overrides]


def run_one(args, run_dir: Path, label: str, repeat: int, log_file) -> dict:
    from orchestrator.sweep import load_sweep, open_storage, run_sweep

    plan = load_sweep(args.config, sweep_overrides(args, run_dir, label, repeat))
    tag = f"{label} r{repeat}"

    def log(*a, **_k) -> None:
        text = " ".join(str(x) for x in a)
        print(text, file=log_file, flush=True)
        if text.startswith("sweep: trial ") and ":" in text[len("sweep: trial "):]:
            print(f"[{tag}] started {text[len('sweep: '):]}", flush=True)

    # Create the (empty) study schema before the progress poller can touch the file: two processes
    # creating Optuna's tables at once fail with "table studies already exists".
    open_storage(plan.storage)
    progress = TrialProgress(plan.storage, plan.study_name, tag, args.trials, plan.objectives)
    print(f"[{tag}] sweep {plan.study_name}: {args.trials} trials x {args.steps} steps, "
          f"{args.concurrency} at a time, sampler {plan.sweep.sampler} (seed {plan.sweep.seed}"
          + (f", {plan.sweep.n_startup_trials} startup trials" if plan.sweep.sampler == "tpe" else "") + ")",
          flush=True)
    t0 = time.time()
    progress.start()
    try:
        result = run_sweep(args.config, plan=plan, log=log)
    finally:
        progress.stop()
    wall = time.time() - t0
    return {"searcher": label, "repeat": repeat, "plan": plan, "trials": result.trials, "wall_s": wall,
            "finished": result.finished}


def prepare(args, run_dir: Path, log_file):
    """Validate both searchers' plans, start Ray once, build the shared warm start (untimed)."""
    from orchestrator.cost import reserved_resources
    from orchestrator.sweep import load_sweep
    from orchestrator.sweep.run import _init_ray
    from orchestrator.warmstart import prepare_start_checkpoint

    plans = [load_sweep(args.config, sweep_overrides(args, run_dir, label, 0)) for label in SEARCHERS]
    plan = plans[0]
    demand = plan.sweep.resources.trial_cpus + reserved_resources(plan.base)["cpus"]
    started = _init_ray(plan, demand, lambda m: print(m, flush=True))
    t0 = time.time()
    start, metrics = prepare_start_checkpoint(plan.base, log=lambda m: print(m, flush=True))
    print(f"warm start: {start} ({time.time() - t0:.0f} s{', cached' if metrics.get('reused') else ''})", flush=True)
    return started


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "n/a (one searcher has no sweep yet)"
    if math.isinf(x):
        return "inf (random's hypervolume is 0)"
    return "n/a (both hypervolumes are 0)" if math.isnan(x) else f"{x:.2f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=8, help="trials per sweep (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=32, help="RL steps per trial (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=2, help="trials at once (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs of sweeps; repeat r uses sampler seed SEED+r for both (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed of repeat 0 (default: %(default)s)")
    ap.add_argument("--n-startup-trials", type=int, default=None,
                    help="TPE's random startup trials (default: the sweep config's)")
    ap.add_argument("--out", default=None,
                    help="output directory (studies, MLflow, runs, tiny model, warm-start cache); reused "
                         "across invocations for the warm start, each invocation in a fresh subdirectory "
                         "(default: a new temporary directory)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 trials x 2 steps, 20-step warm start, 16 eval prompts")
    ap.add_argument("--report", metavar="RUN_DIR",
                    help="run nothing: recompute the table of an earlier run (OUT/bench-TIME) from its studies")
    ap.add_argument("overrides", nargs="*", help="key=value sweep overrides for both searchers (base.KEY=value)")
    args = ap.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--trials" not in given:
            args.trials = 2
        if "--steps" not in given:
            args.steps = 2
    for name in ("trials", "steps", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.n_startup_trials is not None and args.n_startup_trials < 0:
        ap.error(f"--n-startup-trials={args.n_startup_trials}: must be >= 0")
    if not Path(args.config).is_file():
        ap.error(f"--config={args.config!r}: no such file")
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0].lstrip("+")
        owned = {"study_name", "sampler", "num_trials", "max_concurrency", "seed", "storage", "tracking_uri",
                 "experiment", "base.trainer.output_dir", "base.model.path", "base.trainer.steps"}
        if key in owned:
            ap.error(f"override {item!r}: {key} is set by this benchmark (use its options instead)")
    if args.report:
        if not (Path(args.report) / ARGS_FILE).is_file():
            ap.error(f"--report={args.report!r}: no {ARGS_FILE} there (give a run directory OUT/bench-TIME)")
        return args
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="budgetrl-sweep-search-")
    out = Path(args.out).resolve()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        ap.error(f"--out={args.out!r}: cannot create or write it ({probe} is not a writable directory)")
    return args


def rows_from_studies(args, run_dir: Path) -> list[dict]:
    """The sweeps of an earlier (finished or still running) benchmark run, read back from its studies."""
    from orchestrator.sweep import ATTR_INVOCATIONS, load_sweep, open_study, trials_table

    rows = []
    for r in range(args.repeats):
        for label in SEARCHERS:
            plan = load_sweep(args.config, sweep_overrides(args, run_dir, label, r))
            study = open_study(plan, create=False)
            if study is None:
                continue
            invocations = study.user_attrs.get(ATTR_INVOCATIONS) or [{}]
            inv = invocations[-1]
            wall = math.nan
            if inv.get("ended"):
                wall = (dt.datetime.fromisoformat(inv["ended"]) - dt.datetime.fromisoformat(inv["started"])).total_seconds()
            rows.append({"searcher": label, "repeat": r, "plan": plan, "trials": trials_table(study, plan),
                         "wall_s": wall, "finished": inv.get("status") == "finished"})
    return rows


def report(args, run_dir: Path, rows: list[dict], t_start: float | None) -> int:
    """Hypervolumes against the common reference, the table, results.json; the ratio printed last."""
    if not rows:
        print(f"no sweeps found in {run_dir}", file=sys.stderr)
        return 1
    plan = rows[0]["plan"]
    maximize = [o.name for o in plan.objectives if o.mode == "max"]
    minimize = [o.name for o in plan.objectives if o.mode == "min"]
    ref = common_reference(plan, [row["trials"] for row in rows])
    table = []
    for row in rows:
        trials = row["trials"]
        complete = int((trials["state"] == "COMPLETE").sum()) if not trials.empty else 0
        size, hv = front_hypervolume(trials, maximize, minimize, ref)
        row.update(hypervolume=hv, front_size=size, complete=complete)
        table.append({"searcher": row["searcher"], "repeat": row["repeat"], "seed": row["plan"].sweep.seed,
                      "trials": f"{complete}/{args.trials}", "trial-steps": complete * args.steps,
                      "front size": size, "hypervolume": round(hv, 4), "wall s": round(row["wall_s"], 1)})
    stats = summarize(rows)
    frames = [row["trials"].assign(searcher=row["searcher"], repeat=row["repeat"])
              for row in rows if not row["trials"].empty]
    if frames:
        pd.concat(frames, ignore_index=True).to_parquet(run_dir / "trials.parquet", index=False)
    finished = all(row["finished"] for row in rows) and len(rows) == len(SEARCHERS) * args.repeats
    summary = {"command": sys.argv, "trials": args.trials, "steps": args.steps, "concurrency": args.concurrency,
               "repeats": args.repeats, "n_startup_trials": plan.sweep.n_startup_trials if
               args.n_startup_trials is None else args.n_startup_trials, "reference": ref,
               "objectives": [o.name for o in plan.objectives], "rows": table, "stats": stats,
               "total_wall_s": None if t_start is None else time.time() - t_start, "finished": finished}
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))

    print(f"\nhypervolume of each final Pareto front ({', '.join(f'max {m}' for m in maximize)}, "
          f"{', '.join(f'min {m}' for m in minimize)}); common reference {ref}")
    print(pd.DataFrame(table).to_string(index=False))
    if args.repeats > 1:
        for name in SEARCHERS:
            if name not in stats:
                continue
            s = stats[name]
            print(f"{name}: hypervolume mean {s['mean']:.4f} +- {s['std']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}, "
                  f"{s['n']} repeats)")
        finite = [x for x in stats["ratios"] if math.isfinite(x)]
        print("per-repeat ratios optuna/random: " + ", ".join(_fmt_ratio(x) for x in stats["ratios"])
              + (f" (mean {np.mean(finite):.2f}, std {np.std(finite, ddof=1) if len(finite) > 1 else 0.0:.2f})"
                 if finite else ""))
    total = "" if t_start is None else f"total wall time {time.time() - t_start:.0f} s; "
    print(f"{total}results in {run_dir / 'results.json'}")
    if not finished:
        print("WARNING: not every sweep finished all its trials (see the driver log); the figures are partial",
              file=sys.stderr)
    what = "mean hypervolume" if args.repeats > 1 else "hypervolume"
    ratio = _fmt_ratio(stats.get("ratio_of_means"))
    if not finished:  # unequal trial-steps: say so on the line people read
        done = ", ".join(f"{row['searcher']} r{row['repeat']} {row['complete']}/{args.trials}" for row in rows)
        ratio = f"PARTIAL, not at equal trial-steps ({done} complete trials): {ratio}"
    print(f"ratio optuna/random ({what}, {args.trials} trials x {args.steps} steps each): {ratio}", flush=True)
    return 0 if finished else 1


ARGS_FILE = "args.json"
ARG_KEYS = ("config", "trials", "steps", "concurrency", "repeats", "seed", "n_startup_trials", "out", "quick",
            "overrides")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        run_dir = Path(args.report).resolve()
        saved = json.loads((run_dir / ARGS_FILE).read_text())
        for k in ARG_KEYS:
            setattr(args, k, saved[k])
        try:
            return report(args, run_dir, rows_from_studies(args, run_dir), None)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    args.out = str(out)
    run_dir = out / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / ARGS_FILE).write_text(json.dumps({k: getattr(args, k) for k in ARG_KEYS}, indent=1))
    log_path = run_dir / "sweeps.log"
    print(f"sweep search benchmark: {args.trials} trials x {args.steps} steps x {args.repeats} repeat(s), "
          f"{args.concurrency} at a time; out {run_dir} (driver log {log_path.name})", flush=True)
    t_start = time.time()
    rows: list[dict] = []
    started_ray = False
    with open(log_path, "a") as log_file:
        try:
            started_ray = prepare(args, run_dir, log_file)
            for r in range(args.repeats):
                order = list(SEARCHERS) if r % 2 == 0 else list(reversed(SEARCHERS))  # alternate who goes first
                for label in order:
                    rows.append(run_one(args, run_dir, label, r, log_file))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return report(args, run_dir, rows, t_start)


if __name__ == "__main__":
    sys.exit(main())
