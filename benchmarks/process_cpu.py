"""Where a command's CPU time goes, by kind of process: every process on the machine sampled each second.

Runs COMMAND (e.g. the suite) and, while it runs, reads every process's user + system CPU time with psutil
once a second, keeping the last reading of each (pid, start time) and its latest title (a Ray worker
retitles itself ``ray::ClassName`` once it holds an actor). At the end it prints the CPU seconds per kind of
process (Ray actors by class, Ray's own processes, pytest workers, ``python -m orchestrator`` commands, pip,
kernel threads, ...), the count and the mean per process. Processes shorter than a second can be missed;
processes that were running before COMMAND count only the CPU they used during it.

    .venv/bin/python benchmarks/process_cpu.py -- env CI=true bash .ci/run
    .venv/bin/python benchmarks/process_cpu.py --top 15 -- .venv/bin/python -m pytest tests/test_sweep.py
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

KINDS = (  # (kind, a substring of the command line), the first match wins
    ("pytest-xdist worker", "pytest-xdist"), ("pytest", "-m pytest"), ("ray: GCS", "gcs_server"),
    ("ray: raylet", "/raylet"), ("ray: dashboard agent", "dashboard/agent.py"),
    ("ray: dashboard", "dashboard/dashboard.py"), ("ray: runtime env agent", "runtime_env/agent/main.py"),
    ("ray: log monitor", "log_monitor.py"), ("ray: monitor", "autoscaler/_private/monitor.py"),
    ("python -m orchestrator", "-m orchestrator"), ("ray CLI", "bin/ray "), ("mlflow", "mlflow"), ("pip", "-m pip "),
)


def kind(cmd: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]
    for name, part in KINDS:
        if part in cmd:
            return name
    program, _, rest = cmd.partition(" ")
    return f"{os.path.basename(program)} {rest}".strip()[:60]  # its command line, the program's folder left out


def sample(seen: dict, first: dict) -> None:
    import psutil

    for p in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time", "name"]):
        try:
            ct = p.info["cpu_times"]
            if ct is None:
                continue
            key = (p.info["pid"], p.info["create_time"])
            cpu = ct.user + ct.system
            first.setdefault(key, cpu)
            seen[key] = (" ".join(p.info["cmdline"] or []) or p.info["name"] or "?", cpu)
        except Exception:  # noqa: BLE001 - a process may end between the listing and the read
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=30, help="kinds to print")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give a command after --")
    seen: dict = {}
    first: dict = {}
    sample(seen, first)  # what ran before the command: only its CPU from here on counts
    before = dict(first)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen, first)
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for key, (cmd, cpu) in seen.items():
        used = cpu - before.get(key, 0.0)
        if used > 0 and key[0] != os.getpid():
            totals[kind(cmd)][0] += used
            totals[kind(cmd)][1] += 1
    total = sum(c for c, _ in totals.values())
    print(f"\n{' '.join(command)}: exit {proc.returncode}, {wall:.0f} s wall, {total:.0f} CPU s in "
          f"{sum(n for _, n in totals.values())} processes")
    print("| kind | CPU s | processes | CPU s each |\n|---|---|---|---|")
    for name, (cpu, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {name} | {cpu:.1f} | {n} | {cpu / n:.1f} |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
