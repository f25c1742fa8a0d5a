"""Reward worker processes with a hard per-sample timeout.

Reward code is user code run on model output: it can raise, hang, or crash. Each worker is a fresh
interpreter (``subprocess`` exec, never fork: the parent holds Ray and torch threads) that talks to the
parent over two private pipes, resolves reward functions by name, and streams back one result per item.
If a busy worker sends nothing for ``timeout_s``, the parent kills it, marks exactly the item it was on
as "timeout", starts a replacement and re-sends the rest of its chunk. Workers start once and are
reused across calls; ``close()`` kills and reaps every one of them.

Using exec'd interpreters rather than multiprocessing's spawn/forkserver means no re-import of the
driver's ``__main__`` and no long-lived forkserver or resource-tracker process left behind.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from orchestrator.rewards.registry import get_format, get_verifier

log = logging.getLogger(__name__)

Outcome = tuple  # (correct: bool, format_value: bool | float, error: str | None)

MAX_ERROR_CHARS = 500
# A fresh worker may import heavy reward code (sympy, user modules) before its first item; that time is
# not charged to the item's timeout, but a worker that never becomes ready is not waited on forever.
STARTUP_GRACE_S = 60.0


def _error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def evaluate_one(
    verifier: Callable, format_fn: Callable | None, solution: str, answer: str, item: Any
) -> Outcome:
    """Run the reward code on one sample; any exception becomes that sample's error."""
    try:
        correct = bool(verifier(solution, answer))
        value: bool | float = 0.0
        if format_fn is not None:
            raw = format_fn(item)
            value = bool(raw) if isinstance(raw, (bool, np.bool_)) else float(raw)
        return correct, value, None
    except Exception as exc:  # noqa: BLE001 - reward code is untrusted; one sample fails, not the batch
        return False, 0.0, _error_text(exc)


def evaluate_in_process(items: Sequence[Any], verifier: str, format_fn: str | None) -> list[Outcome]:
    """Score in the calling process: exceptions are caught, hangs are not (no timeouts in-process)."""
    v = get_verifier(verifier)
    f = get_format(format_fn) if format_fn else None
    return [evaluate_one(v, f, it.solution, it.answer, it) for it in items]


def _payload(items: Sequence[Any], format_fn: str | None) -> list[tuple]:
    # Verifiers only need the solution and the answer; the (long) thinking travels only for format code.
    if format_fn is None:
        return [(it.solution, it.answer, None) for it in items]
    return [(it.solution, it.answer, it) for it in items]


@dataclass
class _Worker:
    proc: subprocess.Popen
    to_worker: Connection
    from_worker: Connection
    ready: bool = False  # said hello: imports done, reading its pipe (so a send cannot block on it)


@dataclass
class _Busy:
    """A chunk in flight on one worker: item indices, how many came back, when the next is due."""

    worker: _Worker
    indices: list[int]
    payload: list[tuple]
    message: tuple | None = None  # held back until a fresh worker says hello
    warm: bool = False  # the worker was already serving before this chunk
    started: bool = False  # the worker acknowledged the chunk: functions resolved and warmed up
    done: int = 0
    deadline: float = 0.0


@dataclass
class _Job:
    verifier: str
    format_fn: str | None
    hints: tuple[str | None, str | None]
    timeout_s: float
    outcomes: list[Outcome | None]
    queue: deque = field(default_factory=deque)  # (indices, payload) chunks waiting for a worker


def _start_worker(preload: Sequence[str]) -> _Worker:
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    boot = (
        "import sys\n"
        f"sys.path[:] = {list(sys.path)!r}\n"
        "from orchestrator.rewards.pool import _worker_main\n"
        f"_worker_main({to_r}, {from_w}, {os.getpid()}, {list(preload)!r})\n"
    )
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", boot], pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, env=env
        )
    except BaseException:
        os.close(to_w)
        os.close(from_r)
        raise
    finally:
        os.close(to_r)
        os.close(from_w)
    return _Worker(proc, Connection(to_w, readable=False), Connection(from_r, writable=False))


def _stop_worker(worker: _Worker, grace_s: float = 0.0) -> None:
    """Terminate, then kill, then reap: no zombie, no orphan."""
    proc = worker.proc
    if proc.poll() is None and grace_s > 0:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for conn in (worker.to_worker, worker.from_worker):
        conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:  # ask all first, so they exit in parallel
        try:
            w.to_worker.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        _stop_worker(w, grace_s=1.0)
    workers.clear()


class RewardPool:
    """Worker processes that score items by reward-function name with a per-sample timeout.

    ``preload`` names modules every worker imports at start (e.g. a workload's module that registers its
    verifiers); functions registered in other importable modules are found through their module anyway.
    One ``evaluate`` runs at a time per pool.
    """

    def __init__(self, num_workers: int = 1, preload: Sequence[str] = ()):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.preload = tuple(preload)
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []  # shared with the finalizer; never rebound
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._all)
        for _ in range(num_workers):  # start now; they import while the caller does other work
            self._spawn()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._all]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.clear()
            self._finalizer()  # runs _shutdown once

    def _spawn(self) -> _Worker:
        worker = _start_worker(self.preload)
        self._all.append(worker)
        self._idle.append(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        if worker in self._all:
            self._all.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        _stop_worker(worker)

    def evaluate(
        self, items: Sequence[Any], verifier: str, format_fn: str | None, timeout_s: float
    ) -> list[Outcome]:
        """One outcome per item, in order: (correct, format value, None | "timeout" | "error: ...")."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        hints = (get_verifier(verifier).__module__, get_format(format_fn).__module__ if format_fn else None)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            job = _Job(verifier, format_fn, hints, timeout_s, [None] * len(items))
            payload = _payload(items, format_fn)
            n_chunks = 1 if self.num_workers == 1 else 2 * self.num_workers
            size = max(1, math.ceil(len(items) / n_chunks))
            for lo in range(0, len(items), size):
                job.queue.append((list(range(lo, min(lo + size, len(items)))), payload[lo : lo + size]))
            busy: dict[Connection, _Busy] = {}
            try:
                self._run(job, busy)
            except BaseException:  # e.g. KeyboardInterrupt: workers mid-chunk hold stale work
                for state in busy.values():
                    self._retire(state.worker)
                raise
            return job.outcomes  # type: ignore[return-value]

    def _run(self, job: _Job, busy: dict[Connection, _Busy]) -> None:
        while job.queue or busy:
            while job.queue and len(busy) < self.num_workers:
                while len(self._all) < self.num_workers:
                    self._spawn()
                worker = self._idle.pop()
                if worker.proc.poll() is not None:  # died while idle
                    self._retire(worker)
                    continue
                indices, payload = job.queue.popleft()
                message = (job.verifier, job.format_fn, job.hints, payload)
                deadline = time.monotonic() + STARTUP_GRACE_S
                state = _Busy(worker, indices, payload, message, worker.ready, deadline=deadline)
                busy[worker.from_worker] = state
                if worker.ready:
                    self._send(state)
            now = time.monotonic()
            timeout = max(0.0, min(s.deadline for s in busy.values()) - now)
            for conn in wait(list(busy), timeout=timeout):
                self._drain(job, busy, conn)
            now = time.monotonic()
            for conn, state in list(busy.items()):
                if state.deadline <= now:
                    del busy[conn]
                    self._on_timeout(job, state)

    @staticmethod
    def _send(state: _Busy) -> None:
        try:
            state.worker.to_worker.send(state.message)
        except OSError:
            pass  # broken pipe: the worker died; its EOF is handled as a crash
        state.message = None

    def _drain(self, job: _Job, busy: dict, conn: Connection) -> None:
        state = busy[conn]
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                del busy[conn]
                self._on_crash(job, state)
                return
            if not state.worker.ready:  # hello
                state.worker.ready = True
                self._send(state)
            elif not state.started:
                if msg is not None:  # the worker could not resolve the reward functions
                    for i in state.indices:
                        job.outcomes[i] = (False, 0.0, msg)
                    del busy[conn]
                    self._idle.append(state.worker)
                    return
                state.started = True
                state.deadline = time.monotonic() + job.timeout_s
            else:
                job.outcomes[state.indices[state.done]] = msg
                state.done += 1
                if state.done == len(state.indices):
                    del busy[conn]
                    self._idle.append(state.worker)
                    return
                state.deadline = time.monotonic() + job.timeout_s
            if not conn.poll():
                return

    def _requeue_rest(self, job: _Job, state: _Busy, skip: int) -> None:
        rest = state.done + skip
        if rest < len(state.indices):
            job.queue.appendleft((state.indices[rest:], state.payload[rest:]))

    def _on_timeout(self, job: _Job, state: _Busy) -> None:
        self._retire(state.worker)
        if not state.started:
            msg = f"error: RewardWorkerStartup: worker not ready within {STARTUP_GRACE_S:.0f}s"
            for i in state.indices:
                job.outcomes[i] = (False, 0.0, msg)
            return
        i = state.indices[state.done]
        log.warning("reward timeout after %.1fs on item %d (verifier %s)", job.timeout_s, i, job.verifier)
        job.outcomes[i] = (False, 0.0, "timeout")
        self._requeue_rest(job, state, skip=1)

    def _on_crash(self, job: _Job, state: _Busy) -> None:
        self._retire(state.worker)
        code = state.worker.proc.returncode
        msg = f"error: RewardWorkerDied: exit code {code}"
        if not state.started and state.warm:  # died between calls (OOM killer, ...): retry on a fresh one
            self._requeue_rest(job, state, skip=0)
            return
        if not state.started:  # a fresh worker died before its first item: retrying would likely die again
            for i in state.indices:
                job.outcomes[i] = (False, 0.0, msg)
            return
        i = state.indices[state.done]
        log.warning("reward worker died (exit code %s) on item %d (verifier %s)", code, i, job.verifier)
        job.outcomes[i] = (False, 0.0, msg)
        self._requeue_rest(job, state, skip=1)


# ---- worker side ------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL if the parent dies, so a hung worker never outlives the driver.

    The signal follows the parent *thread* that started us; if that thread ends first, the pool finds the
    worker dead at its next dispatch and replaces it.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _worker_main(in_fd: int, out_fd: int, parent_pid: int, preload: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops us
    _die_with_parent(parent_pid)
    import importlib

    # The built-in verifiers and formats register on import (the modules themselves, not the package's
    # __init__, which imports this module: no import cycle).
    import orchestrator.rewards.shaping  # noqa: F401
    import orchestrator.rewards.verifiers  # noqa: F401

    for module in preload:
        importlib.import_module(module)
    inbox = Connection(in_fd, writable=False)
    outbox = Connection(out_fd, readable=False)
    outbox.send("hello")
    resolved: dict[tuple, tuple[Callable, Callable | None]] = {}
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        verifier_name, format_name, (v_hint, f_hint), payload = msg
        try:
            key = (verifier_name, format_name)
            if key not in resolved:
                verifier = get_verifier(verifier_name, v_hint)
                fmt = get_format(format_name, f_hint) if format_name else None
                for fn in (verifier, fmt):
                    if fn is not None and hasattr(fn, "warmup"):
                        fn.warmup()
                resolved[key] = (verifier, fmt)
            verifier, fmt = resolved[key]
        except Exception as exc:  # noqa: BLE001
            outbox.send(_error_text(exc))
            continue
        outbox.send(None)  # ready: the parent starts the first item's clock now
        for solution, answer, item in payload:
            outbox.send(evaluate_one(verifier, fmt, solution, answer, item))
