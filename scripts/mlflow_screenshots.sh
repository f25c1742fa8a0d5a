#!/usr/bin/env bash
# Screenshots of the MLflow UI for docs/mlflow.md, taken by hand (not by CI): starts a light
# `mlflow server` on 127.0.0.1 over a store, renders the newest training run's page, the runs table and
# the newest sweep's trials compared, in headless Chromium (Debian's package: apt-get install chromium),
# and writes PNGs under OUT_DIR.
#   bash scripts/mlflow_screenshots.sh [BACKEND_STORE_URI] [OUT_DIR]      # defaults: sqlite:///mlflow.db docs/img
# EXPERIMENT (default budgetrl) picks the experiment; PORT (default 5077) the server's port. The pages are
# opened as http://mlflow.local:PORT (mapped to 127.0.0.1 inside Chromium only): the UI shows its chat
# assistant panel only on localhost/127.0.0.1, and it would cover a third of every screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-sqlite:///mlflow.db}
out=${2:-docs/img}
port=${PORT:-5077}
experiment=${EXPERIMENT:-budgetrl}
py=.venv/bin/python
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$browser" ]]; then
  echo "no chromium: install Debian's package (apt-get install chromium)" >&2
  exit 2
fi
mkdir -p "$out"
log=$(mktemp)
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri "$store" \
  --host 127.0.0.1 --port "$port" --workers 1 \
  --allowed-hosts "mlflow.local:$port,127.0.0.1:$port,localhost:$port" \
  --cors-allowed-origins "http://mlflow.local:$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 1
done

# The pages: the newest finished training run (not a sweep trial), the runs table, the newest sweep's trials.
mapfile -t pages < <("$py" - "http://127.0.0.1:$port" "$experiment" <<'EOF'
import json, sys, urllib.parse
from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
if exp is None:
    sys.exit(f"no experiment {sys.argv[2]!r} in this store")
eid = exp.experiment_id
runs = client.search_runs([eid], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
train = [r for r in runs if r.data.tags.get("budgetrl.stage") == "rl" and "budgetrl.trial" not in r.data.tags]
sweeps = [r for r in runs if r.data.tags.get("budgetrl.workload") == "sweep"]
if train:
    # workflowType: the UI's own model-training mode (the experiment page picks it from the experiment's
    # kind; a run page opened directly takes the browser's last choice, GenAI in a fresh profile).
    print(f"run\t#/experiments/{eid}/runs/{train[0].info.run_id}?workflowType=machine_learning")
print(f"runs\t#/experiments/{eid}/runs?workflowType=machine_learning")
if sweeps:
    kids = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    if kids:
        q = urllib.parse.urlencode({"runs": json.dumps(kids), "experiments": json.dumps([eid])})
        print(f"sweep\t#/compare-runs?{q}")
EOF
)
for page in "${pages[@]}"; do
  name=${page%%$'\t'*}
  path=${page#*$'\t'}
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --host-resolver-rules="MAP mlflow.local 127.0.0.1" --virtual-time-budget=20000 \
    --screenshot="$out/mlflow-$name.png" "http://mlflow.local:$port/$path" >/dev/null 2>&1
  echo "wrote $out/mlflow-$name.png ($path)"
done
