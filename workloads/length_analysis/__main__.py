"""``python -m workloads.length_analysis CONFIG [key=value ...]`` (same as the orchestrator subcommand)."""

import sys

from orchestrator.config import ConfigError

from .job import main

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if len(sys.argv) >= 2 else 2)
try:
    sys.exit(main(sys.argv[1], sys.argv[2:]))
except ConfigError as exc:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(2)
