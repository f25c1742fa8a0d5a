"""``python -m orchestrator COMMAND CONFIG [key=value ...]``.

Commands: ``train`` (GRPO under a thinking budget), ``eval`` (a checkpoint over a budget grid),
``build-tiny`` (the embedded tiny model), ``build-standin`` (a stand-in checkpoint shaped like a real chat
model), ``show-config`` (the merged, validated config), ``sweep`` (Ray Tune + Optuna over a training
config), ``frontier`` (Pareto fronts from MLflow runs),
``serve`` (a checkpoint or models:/ URI behind an OpenAI-compatible API with per-request budgets),
``workload NAME`` (a method recipe such as ``elastic``), ``analyze`` (reasoning length vs accuracy
over rollout/eval tables), ``plan`` (GPU memory per learner and rollout device, before a run starts),
``algorithms`` (every registered advantage estimator, policy loss, aggregation, KL, filter and preset).
Configs are validated before Ray starts; a bad key or value exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config, load_config_explained, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run budget-constrained GRPO training"),
                        ("eval", "evaluate a checkpoint over a (thinking, solution) budget grid"),
                        ("show-config", "print the merged, validated config")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. budget.thinking=16")
    sv = sub.add_parser("serve", help="serve a checkpoint or models:/ URI with thinking/solution budgets "
                                      "(OpenAI-compatible API on Ray Serve; docs/serving.md)")
    sv.add_argument("target", help="checkpoint dir, or models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH")
    sv.add_argument("overrides", nargs="*", help="key=value overrides, e.g. http.port=8001 budget.thinking=64")
    sv.add_argument("--config", help="serving YAML, e.g. configs/serve.yaml (default: schema defaults)")
    wl = sub.add_parser("workload", help="run a method recipe (elastic, ...) registered under budgetrl.workloads")
    wl.add_argument("name", help="workload name, e.g. elastic")
    wl.add_argument("config", help="the workload's YAML config (see configs/<workload>/)")
    wl.add_argument("overrides", nargs="*", help="key=value overrides of the workload config")
    an = sub.add_parser("analyze", help="analyze rollout/eval tables (default workload: length_analysis)")
    an.add_argument("config", help="analysis YAML, e.g. configs/length_analysis.yaml")
    an.add_argument("overrides", nargs="*", help="key=value overrides, e.g. per_tokens=1000")
    an.add_argument("--workload", default="length_analysis",
                    help="analysis workload registered under budgetrl.workloads (default: length_analysis)")
    sub.add_parser("algorithms", help="list the registered algorithm pieces and presets, one line each")
    bt = sub.add_parser("build-tiny", help="build the embedded tiny Qwen2 model and tokenizer")
    bt.add_argument("out_dir")
    bs = sub.add_parser("build-standin", help="build a stand-in checkpoint shaped like a real chat model: trained "
                                              "BPE tokenizer, chat template with enable_thinking, two EOS ids, "
                                              "untied head, sharded safetensors (seconds, offline)")
    bs.add_argument("out_dir")
    bs.add_argument("--seed", type=int, default=0)
    sw = sub.add_parser("sweep", help="run (or resume) a hyperparameter sweep: Ray Tune + Optuna study")
    sw.add_argument("config", help="sweep YAML config (see configs/sweeps/)")
    sw.add_argument("overrides", nargs="*", help="key=value sweep overrides; base.KEY=value for the base config")
    sw.add_argument("--check", action="store_true", help="validate and print the plan; start nothing")
    fr = sub.add_parser("frontier", help="Pareto fronts (accuracy vs tokens, vs cost) from MLflow runs")
    src = fr.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="every training run of this MLflow experiment")
    src.add_argument("--study", help="every trial run of this sweep study (tag budgetrl.study)")
    src.add_argument("--run-ids", help="comma-separated MLflow run ids")
    fr.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    fr.add_argument("--budget", help="only this eval budget label (e.g. 16x8); default: every budget")
    fr.add_argument("--out", help="also write the Parquet tables and PNG plots to this directory")
    fr.add_argument("--no-log", action="store_true", help="print only; do not log a frontier run to MLflow")
    fr.add_argument("--log-experiment", help="experiment of the logged frontier run (default: the source's)")
    fr.add_argument("--include-unfinished", action="store_true", help="also runs not FINISHED")
    fr.add_argument("--include-pruned", action="store_true", help="also sweep trials stopped early")
    fr.add_argument("--currency", default="USD")
    fr.add_argument("--accelerator-hour-price", type=float, default=2.5)
    fr.add_argument("--cpu-hour-price", type=float, default=0.05)
    return p


def _sweep(args) -> int:
    from .sweep import SweepBusy, describe_plan, load_sweep, run_sweep, safe_url

    try:
        plan = load_sweep(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(describe_plan(plan))
        return 0
    try:
        result = run_sweep(args.config, plan=plan)
    except ConfigError as exc:  # e.g. the study exists with other objectives
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except SweepBusy as exc:
        print(f"sweep busy: {exc}", file=sys.stderr)
        return 3
    print(f"study {result.study_name} ({safe_url(result.storage)}): parent run {result.parent_run_id}, "
          f"front {result.front}, hypervolume {result.hypervolume:.4g}")
    return 0 if result.finished else 1


def _frontier(args) -> int:
    from .cost import CostModel
    from .frontier import frontier_command
    from .tracking import TrackingError

    try:
        frontier_command(tracking_uri=args.tracking_uri, experiment=args.experiment, study=args.study,
                         run_ids=[r.strip() for r in args.run_ids.split(",") if r.strip()] if args.run_ids else None,
                         budget=args.budget, out_dir=args.out, log_run=not args.no_log,
                         log_experiment=args.log_experiment,
                         cost_model=CostModel(args.currency, args.accelerator_hour_price, args.cpu_hour_price),
                         include_unfinished=args.include_unfinished, include_pruned=args.include_pruned)
    except (ValueError, TrackingError) as exc:
        print(f"frontier: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(argv: list[str]) -> int:
    """``plan CONFIG [key=value ...] [--shape NAME] [--gpu-memory-gib G] [--prompt-tokens N]``: exit 0 when the
    run fits its GPUs, 1 when it does not (the line says what to change), 2 for a bad config or shape."""
    from .plan import PRESETS, format_plan, plan_config, shape_from_config_json

    ap = argparse.ArgumentParser(prog="python -m orchestrator plan",
                                 description="memory per learner and rollout GPU, and whether the run fits")
    ap.add_argument("config", help="training YAML config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.num_workers=8")
    ap.add_argument("--shape", choices=sorted(PRESETS),
                    help="model shape when model.path has no config.json here (public config.json values)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of each GPU (default 80)")
    ap.add_argument("--prompt-tokens", type=int, default=256,
                    help="longest prompt in tokens (training rows are prompt + budgets; default 256)")
    args = ap.parse_intermixed_args(argv)
    if args.gpu_memory_gib <= 0 or args.prompt_tokens < 1:
        ap.error("--gpu-memory-gib must be > 0 and --prompt-tokens >= 1")
    try:
        cfg = load_config(args.config, args.overrides, check_paths=False)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    found = Path(cfg.model.path).expanduser() / "config.json"
    if args.shape:
        shape, source = PRESETS[args.shape], f"--shape {args.shape}"
    elif found.is_file():
        try:
            shape, source = shape_from_config_json(found), str(found)
        except (KeyError, ValueError) as exc:
            print(f"config error: model.path={cfg.model.path!r}: config.json lacks {exc}", file=sys.stderr)
            return 2
    else:
        print(f"config error: model.path={cfg.model.path!r}: no config.json here; give --shape "
              f"({', '.join(sorted(PRESETS))})", file=sys.stderr)
        return 2
    plan = plan_config(cfg, shape, gpu_memory_gib=args.gpu_memory_gib, prompt_tokens=args.prompt_tokens,
                       shape_source=source)
    print(format_plan(plan, " ".join([args.config, *args.overrides])))
    return 0 if plan.fits else 1


def _printed(args) -> str:
    """What the commands that only print one thing print: the algorithm registries, a built model's path."""
    if args.command == "algorithms":
        from .algorithms import listing

        return listing()
    if args.command == "build-tiny":
        from .tiny_model import build_tiny_model

        return str(build_tiny_model(args.out_dir))
    from .standin_model import build_standin_model

    return str(build_standin_model(args.out_dir, seed=args.seed))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # options may come after the overrides
        return _plan(argv[1:])
    if argv[:1] == ["serve"]:  # options may come after the overrides (argparse subparsers can't intermix)
        from .serve import cli as serve_cli

        return serve_cli(argv[1:])
    args = _parser().parse_args(argv)
    if args.command in ("algorithms", "build-tiny", "build-standin"):
        print(_printed(args))
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "frontier":
        return _frontier(args)
    if args.command in ("workload", "analyze"):
        from .workload_registry import get_workload

        name = args.name if args.command == "workload" else args.workload
        try:
            recipe = get_workload(name)
        except KeyError as exc:  # only the lookup: a KeyError inside a recipe is a bug, not a config error
            print(f"config error: {exc.args[0]}", file=sys.stderr)
            return 2
        try:
            return recipe(args.config, args.overrides)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
    try:
        cfg, resolved = load_config_explained(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "show-config":  # the YAML, then what each `auto` became and why (as comments)
        from .devices import describe

        print(to_yaml(cfg) + describe(resolved), end="")
        return 0
    if args.command == "train":
        from .tracking import TrackingError
        from .trainer import train

        from .runtime import NodeUnavailable

        try:
            result = train(cfg)
        except (ConfigError, TrackingError) as exc:  # raised before any work: bad data, store, resume
            print(f"{'config' if isinstance(exc, ConfigError) else 'tracking'} error: {exc}", file=sys.stderr)
            return 2
        except NodeUnavailable as exc:  # the cluster lacks the run's resources now; a re-run continues
            print(f"cluster error: {exc}", file=sys.stderr)
            return 3
        print(f"run {result.run_id}: checkpoint {result.checkpoint}")
        return 0
    if args.command == "eval":
        from .checkpoint_files import require_checkpoint

        try:  # before anything imports Ray or opens the MLflow store
            require_checkpoint(cfg.model.path, think_end=cfg.model.think_end, chat_template=cfg.model.chat_template)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        from .evaluation import run_eval

        run_id, summary = run_eval(cfg)
        print(f"run {run_id}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
