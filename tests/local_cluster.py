"""A Ray cluster of several nodes on 127.0.0.1, started with the Ray CLI as an operator would.

A head (``ray start --head``: GCS, dashboard and job API, no actor resources) plus worker nodes
(``ray start --block --address``), each with its own raylet, object store, custom resources and node
labels, the way ``clusters/raycluster-gpu.yaml``'s groups advertise ``rollout_gpu`` / ``learner_gpu``.
A node can be killed (its raylet SIGKILLed, as a preempted machine loses it) and new ones added.

Everything runs in this cluster's own temp dir, ports and process sessions, with token auth on: the
suite's own local Ray is never touched, and ``stop`` ends exactly the processes this cluster started
(``ray stop`` would end every Ray process of the user).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `python` of this interpreter
# Node failure noticed in about 3 s instead of Ray's default 30 s (health checks every second,
# three misses); read by the GCS at start, so they are set for the head.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                          "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_timeout_ms": "1000"}


# Ray gives a starting node a fixed 30 s to register (ray/_private/node.py, raylet_start_wait_time_s);
# on 2 busy cores (the other pytest-xdist worker training beside this one) a node can miss it. Such a
# start is retried, after its leftovers are killed.
STARTUP_TIMEOUT = "timed out during startup"
ATTEMPTS = 3


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    resources: dict
    proc: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def raylet_pid(self) -> int | None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                if p.name() == "raylet":
                    return p.pid
        except psutil.Error:
            pass
        return None


class LocalCluster:
    """Head + worker nodes on 127.0.0.1 under ``tmp`` (keep it short: Ray's socket paths < 107 chars)."""

    def __init__(self, tmp: Path, *, health_env: dict | None = None):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        token = self.tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env['PATH']}")
        self.env = env  # for every client: the CLI, a driver, `ray job submit`
        self.health_env = dict(FAST_FAILURE_DETECTION if health_env is None else health_env)
        self.nodes: list[Node] = []
        self._pgids: list[int] = []
        self.gcs_port = self.dashboard_port = 0

    # ---- start and stop -----------------------------------------------------------------------------

    def start_head(self, num_cpus: int = 0, attempts: int = ATTEMPTS) -> None:
        for attempt in range(1, attempts + 1):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            cmd = [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={self.tmp}",
                   "--labels=budgetrl.io/role=head"]
            proc = subprocess.Popen([str(c) for c in cmd], env={**self.env, **self.health_env}, cwd=self.tmp,
                                    start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self._pgids.append(proc.pid)  # the daemons `ray start` leaves behind keep its process group
            out, _ = proc.communicate(timeout=180)
            if proc.returncode == 0:
                return
            if STARTUP_TIMEOUT not in out or attempt == attempts:
                raise RuntimeError(f"ray start --head failed:\n{out}")
            _kill_group(proc.pid)  # what the failed start left behind, then a fresh head on new ports

    @property
    def address(self) -> str:
        """The GCS address a driver joins (``ray.address=...``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The job API / dashboard (``ray job submit --address ...``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, name: str, resources: dict, *, num_cpus: float = 1, role: str | None = None,
                 private_dirs: tuple[Path, ...] = (), timeout: float = 120) -> Node:
        """A worker node with its own raylet; returns once it has started (it registers within a second).

        ``private_dirs``: directories this node does not share with the others (an empty tmpfs over each,
        in a mount namespace of its own), as a machine without the cluster's shared storage would see."""
        log = self.tmp / f"node-{name}.log"
        labels = f"budgetrl.io/role={role or name.split('-')[0]},budgetrl.io/node={name}"
        cmd = [BIN / "ray", "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", f"--labels={labels}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               # One log monitor (the head's): the nodes share this machine's session log dir, and each
               # monitor would forward every worker's lines again.
               "--include-log-monitor=false", "--disable-usage-stats"]
        cmd = [str(c) for c in cmd]
        if private_dirs:
            mounts = " && ".join(f"mkdir -p {shlex.quote(str(d))} && mount -t tmpfs none {shlex.quote(str(d))}"
                                 for d in private_dirs)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"{mounts} && exec {' '.join(shlex.quote(c) for c in cmd)}"]
        deadline = time.monotonic() + timeout
        for attempt in range(1, ATTEMPTS + 1):
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.tmp, start_new_session=True,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT)
            self._pgids.append(proc.pid)
            while "Ray runtime started" not in (text := log.read_text()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            else:
                node = Node(name, dict(resources), proc, log)
                self.nodes.append(node)
                return node
            if STARTUP_TIMEOUT not in text or attempt == ATTEMPTS or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start:\n{text[-3000:]}")
            _kill_group(proc.pid)  # its raylet may still be up: gone before the retry registers a twin
        raise AssertionError("unreachable")

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's raylet (its workers and agents go with it, as on a lost machine)."""
        pid = node.raylet_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        try:
            node.proc.wait(30)  # `ray start --block` ends the node's other processes and exits
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
        self.nodes.remove(node)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster's sessions or naming its temp dir."""
        me = os.getpid()
        names_tmp = re.compile(re.escape(str(self.tmp)) + r"(?![^/\s])")
        procs = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or ())
                if p.pid != me and (os.getpgid(p.pid) in self._pgids or names_tmp.search(cmdline)):
                    procs.append(p)
            except (psutil.Error, ProcessLookupError):
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
