#!/usr/bin/env bash
# The stand-in quickstart end to end, one command: build the stand-in chat checkpoint if missing, warm-start
# it through its chat template, budgeted GRPO, the eval grid (configs/standin/quickstart.yaml), then serve
# the trained checkpoint on 127.0.0.1 and ask it one chat completion with enable_thinking, then stop.
#   bash scripts/standin_quickstart.sh [key=value ...]     # overrides go to the train command
# Killed mid-run, the same command continues the run from its last state (same MLflow run).
# Env: PYTHON (default .venv/bin/python), PORT (8000), CONFIG, SERVE_CONFIG, SERVE_ARGS (key=value overrides
# of the serving config, space-separated, e.g. "model.max_model_len=4096 budget.max_thinking=2048").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/standin/quickstart.yaml}
SERVE_CONFIG=${SERVE_CONFIG:-configs/standin/serve.yaml}
PORT=${PORT:-8000}
LOG=$(mktemp)
SERVER=
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then kill -TERM "$SERVER"; wait "$SERVER" || true; fi
    rm -f "$LOG"
}
trap cleanup EXIT

"$PY" -m orchestrator train "$CONFIG" "$@" | tee "$LOG"
CKPT=$(sed -n 's/^run [^ ]*: checkpoint //p' "$LOG" | tail -n 1)
[ -n "$CKPT" ] || { echo "standin_quickstart: no checkpoint in the train output" >&2; exit 1; }

# shellcheck disable=SC2086  # SERVE_ARGS: word-split on purpose
"$PY" -m orchestrator serve "$CKPT" --config "$SERVE_CONFIG" "http.port=$PORT" ${SERVE_ARGS:-} &
SERVER=$!
"$PY" - "$PORT" <<'PYEOF'
import json, sys, time, urllib.request

from openai import OpenAI

base = f"http://127.0.0.1:{sys.argv[1]}/v1"
deadline = time.time() + 600
while True:  # until the replica has loaded the model
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
            model = json.load(r)["data"][0]["id"]
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("standin_quickstart: the server did not answer /v1/models within 600 s")
        time.sleep(2)
client = OpenAI(base_url=base, api_key="unused")
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "47+38="}], temperature=0.0,
    extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 32, "solution_budget": 8})
msg = reply.choices[0].message
print(json.dumps({"question": "47+38=", "reasoning_content": getattr(msg, "reasoning_content", None),
                  "content": msg.content, "usage": reply.usage.model_dump()}, indent=1))
PYEOF
