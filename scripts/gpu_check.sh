#!/usr/bin/env bash
# The learner checks a first GPU machine has to pass, one line each (PASS/FAIL/SKIP + figures); exit 0 when
# none failed. Needs python with torch, transformers and pyarrow (no Ray, vLLM or MLflow). From anywhere:
#   bash scripts/gpu_check.sh                       # cuda:0, the qwen2-0.5b shape (not yet run on a GPU)
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu --shape tiny --batch 8 --prompt 8 --response 16
# What each check does: scripts/gpu_check.py. Record the figures in docs/performance.md, section 6.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
