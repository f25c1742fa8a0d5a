"""``python -m workloads.journey CONFIG [key=value ...]``: the recipe without the installed entry point
(same as ``python -m orchestrator workload journey CONFIG ...`` once the package is re-installed)."""

import sys

from .recipe import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m workloads.journey CONFIG [key=value ...]")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
