#!/usr/bin/env bash
# Budget forcing in vLLM on a GPU machine, one line per check (PASS/FAIL + figures); exit 0 when none failed.
# Needs the project with vLLM (pip install -e '.[gpu]'); starts one in-process engine on the tiny model.
#   bash scripts/gpu_check_vllm.sh                          # the GPU: Model Runner V2 expected
#   PYTHON=.venv/bin/python bash scripts/gpu_check_vllm.sh --interpret-triton   # a CPU: V2, Triton interpreted
# What each check does: scripts/gpu_check_vllm.py. Record the figures in docs/performance.md, section 6.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check_vllm.py "$@"
