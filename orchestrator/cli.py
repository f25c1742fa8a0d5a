"""``python -m orchestrator COMMAND CONFIG [key=value ...]``.

Commands: ``train`` (GRPO under a thinking budget), ``eval`` (a checkpoint over a budget grid),
``build-tiny`` (the embedded tiny model), ``show-config`` (the merged, validated config).
Configs are validated before Ray starts; a bad key or value exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run budget-constrained GRPO training"),
                        ("eval", "evaluate a checkpoint over a (thinking, solution) budget grid"),
                        ("show-config", "print the merged, validated config")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. budget.thinking=16")
    bt = sub.add_parser("build-tiny", help="build the embedded tiny Qwen2 model and tokenizer")
    bt.add_argument("out_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build-tiny":
        from .tiny_model import build_tiny_model

        print(build_tiny_model(args.out_dir))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(to_yaml(cfg), end="")
        return 0
    if args.command == "train":
        from .trainer import train

        result = train(cfg)
        print(f"run {result.run_id}: checkpoint {result.checkpoint}")
        return 0
    if args.command == "eval":
        from .evaluation import run_eval

        run_id, summary = run_eval(cfg)
        print(f"run {run_id}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
