"""Bounded load test of the budgeted server, on loopback only.

Starts ``python -m orchestrator.serve`` (its own Ray runtime, one replica) on a free 127.0.0.1 port in a
subprocess, sends a fixed number of completion requests at a fixed concurrency for each budget from
this process, prints requests/s, p50/p99 latency and token throughput per budget plus the server's
error counters (which must be 0), then stops the server.

``--efforts low,medium,high`` adds a mixed run: the requests cycle through those ``reasoning_effort`` values
(each answer must say ``budget_source: effort``), reported overall and per effort. That needs a registry model
with a measured frontier: ``--model models:/NAME/VERSION model.tracking_uri=...``, or by default the tiny model
registered in a temporary SQLite store with a made-up frontier (``DEMO_FRONTIER``: it exercises the mapping under
load; its accuracies are not measurements).

    .venv/bin/python benchmarks/serve_load.py                     # tiny model, 64 requests x 8, 16x8 and 64x32
    .venv/bin/python benchmarks/serve_load.py --model outputs/quickstart/checkpoint --engine hf
    .venv/bin/python benchmarks/serve_load.py --budgets 16x8 --efforts low,medium,high

Exit status: 0 when every request succeeded and the server counted no errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (label, thinking, solution, accuracy, mean tokens): made up, within configs/serve.yaml's limits (128 / 64).
DEMO_FRONTIER = [("8x4", 8, 4, 0.35, 10.0), ("16x8", 16, 8, 0.5, 20.0), ("32x16", 32, 16, 0.58, 40.0),
                 ("64x32", 64, 32, 0.62, 80.0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_budget(text: str) -> tuple[int, int]:
    t, _, s = text.lower().partition("x")
    return int(t), int(s)


def start_server(model: str, port: int, engine: str, log_path: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator.serve", model, "--config", str(ROOT / "configs" / "serve.yaml"),
           f"http.port={port}", "http.host=127.0.0.1", f"model.engine={engine}", "ray.num_cpus=2", *extra]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false")
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # the server deletes its app and shuts its Ray runtime down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register_demo(model_dir: str, tmp: Path) -> tuple[str, list[str]]:
    """The tiny model registered with ``DEMO_FRONTIER`` in a temporary SQLite store: (URI, server overrides)."""
    from orchestrator import registry
    from orchestrator.effort import Frontier

    store = f"sqlite:///{tmp}/mlflow.db"
    rows = [dict(budget_label=lb, budget_thinking=t, budget_solution=s, accuracy=a, mean_tokens=m)
            for lb, t, s, a, m in DEMO_FRONTIER]
    version = registry.register_checkpoint(store, model_dir, "tiny", frontier=Frontier.from_summary(rows, "demo"))
    return f"models:/tiny/{version}", [f"model.tracking_uri={store}", f"model.cache_dir={tmp}/cache"]


async def run_load(base: str, model: str, budget: tuple[int, int] | list[str], requests: int, concurrency: int,
                   temperature: float) -> dict:
    """``requests`` completions at ``concurrency``: at one ``budget`` (THINK, SOLUTION), or cycling through
    ``reasoning_effort`` values (a list of them; latencies also per effort)."""
    sem = asyncio.Semaphore(concurrency)
    efforts = budget if isinstance(budget, list) else None
    latencies: list[float] = []
    by_effort: dict[str, list[float]] = {e: [] for e in efforts or []}
    tokens = {"completion": 0, "thinking": 0, "solution": 0}
    errors: list[str] = []

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int) -> None:
            body = {"model": model, "prompt": f"{100 + 37 * i % 900}+{200 + 53 * i % 800}=", "temperature": temperature}
            effort = efforts[i % len(efforts)] if efforts else None
            body.update({"reasoning_effort": effort} if effort else
                        {"thinking_budget": budget[0], "solution_budget": budget[1]})
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/completions", json=body)
                dt = time.perf_counter() - t0
            if r.status_code != 200 or (effort and r.json().get("budget_source") != "effort"):
                errors.append(f"{r.status_code}: {r.text[:200]}")
                return
            u = r.json()["usage"]
            latencies.append(dt)
            if effort:
                by_effort[effort].append(dt)
            tokens["completion"] += u["completion_tokens"]
            tokens["thinking"] += u["thinking_tokens"]
            tokens["solution"] += u["solution_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(requests)])
        wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    label = "effort:" + "/".join(efforts) if efforts else f"{budget[0]}x{budget[1]}"
    per_effort = {e: (float(np.percentile(v, 50) * 1000), float(np.percentile(v, 99) * 1000), len(v))
                  for e, v in by_effort.items() if v}
    return {"budget": label, "per_effort": per_effort, "requests": requests, "concurrency": concurrency, "wall_s": wall,
            "req_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000), "mean_thinking": tokens["thinking"] / max(1, len(latencies)),
            "mean_solution": tokens["solution"] / max(1, len(latencies)),
            "completion_tok_per_s": tokens["completion"] / wall, "errors": len(errors), "error_samples": errors[:3]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory or models:/ URI (default: build the tiny model)")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--budgets", default="16x8,64x32", help="comma-separated THINKxSOLUTION")
    ap.add_argument("--efforts", default=None, help="comma-separated reasoning_effort values for a mixed run "
                    "(e.g. low,medium,high); needs a model with a frontier (see the module docstring)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for the server")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        ap.error("keep it bounded: 1 <= --requests <= 10000, 1 <= --concurrency <= 256")
    budgets = [_parse_budget(b) for b in args.budgets.split(",")]
    from orchestrator.effort import EFFORT_SHARE

    if args.efforts and (bad := [e for e in args.efforts.split(",") if e not in EFFORT_SHARE]):
        ap.error(f"--efforts: {','.join(bad)} not among {', '.join(EFFORT_SHARE)}")

    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        model, overrides = args.model, list(args.overrides)
        if model is None:
            from orchestrator.tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny"))
            if args.efforts:
                model, extra = register_demo(model, Path(tmp))
                overrides = extra + overrides
        port = _free_port()
        base = f"http://127.0.0.1:{port}/v1"
        log_path = Path(tmp) / "server.log"
        t0 = time.perf_counter()
        proc = start_server(model, port, args.engine, log_path, overrides)
        try:
            ready_s = wait_ready(proc, base, log_path, args.startup_timeout)
            served = httpx.get(f"{base}/models", timeout=5).json()["data"][0]["id"]
            print(f"server ready in {ready_s:.1f} s ({args.engine}, model {served}, {base})")
            asyncio.run(run_load(base, served, budgets[0], min(8, args.requests), min(8, args.concurrency),
                                 args.temperature))  # warm-up, not reported
            loads = budgets + ([args.efforts.split(",")] if args.efforts else [])
            rows = [asyncio.run(run_load(base, served, b, args.requests, args.concurrency, args.temperature))
                    for b in loads]
            stats = httpx.get(f"{base.removesuffix('/v1')}/stats", timeout=5).json()
        finally:
            stop_server(proc)
        print(f"\n{'budget':>22} {'reqs':>5} {'conc':>4} {'wall s':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'think':>6} {'sol':>5} {'tok/s':>7} {'errors':>6}")
        for r in rows:
            print(f"{r['budget']:>22} {r['requests']:>5} {r['concurrency']:>4} {r['wall_s']:>7.2f} "
                  f"{r['req_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['mean_thinking']:>6.1f} "
                  f"{r['mean_solution']:>5.1f} {r['completion_tok_per_s']:>7.0f} {r['errors']:>6}")
            for e, (p50, p99, n) in r["per_effort"].items():
                print(f"{'  ' + e:>22} {n:>5} {'':>4} {'':>7} {'':>7} {p50:>8.0f} {p99:>8.0f}")
            for e in r["error_samples"]:
                print(f"  error: {e}")
        print(f"\nserver counters: requests={stats['requests']} ok={stats['ok']} "
              f"client_errors={stats['client_errors']} server_errors={stats['server_errors']} "
              f"batches={stats['batches']} mean_batch_samples={stats['mean_batch_samples']:.1f}")
        print(f"total {time.perf_counter() - t0:.1f} s (server start, warm-up, load, stop)")
        failed = any(r["errors"] for r in rows) or stats["server_errors"] or stats["client_errors"]
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
