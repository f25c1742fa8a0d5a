"""Wall-clock seconds of a sweep trial over all its attempts, kept in its Optuna trial.

A trial can run more than once: Tune retries a trial whose process died or raised (``retries``), and
the re-run of a killed sweep continues a trial the dead driver left running. The trial's run holds its
placement group in every attempt, so its cost counts them all, not only the attempt that finished.
Each attempt appends ``{"start": epoch seconds, "seconds": s}`` (and ``"error"`` if it raised) to the trial's ``budgetrl.attempts``
attribute and refreshes its ``seconds`` every ``HEARTBEAT_S`` (and once more when it ends): an attempt
killed without warning loses at most one heartbeat.
"""

from __future__ import annotations

import threading
import time

ATTR_ATTEMPTS = "budgetrl.attempts"
HEARTBEAT_S = 5.0


def attempts_of(storage, trial_id: int) -> list[dict]:
    return list(storage.get_trial(trial_id).user_attrs.get(ATTR_ATTEMPTS) or [])


class AttemptClock:
    """This attempt's entry in the trial's attempts; ``total()`` adds the earlier attempts' seconds."""

    def __init__(self, storage, trial_id: int, heartbeat_s: float = HEARTBEAT_S):
        self._storage, self._trial_id = storage, trial_id
        self._attempts = attempts_of(storage, trial_id)
        self.before = sum(float(a.get("seconds", 0.0)) for a in self._attempts)
        self.index = len(self._attempts)  # 0 on the first attempt
        self._t0 = time.perf_counter()
        self._attempts.append({"start": time.time(), "seconds": 0.0})
        self._lock, self._stopped = threading.Lock(), threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="trial-attempt", daemon=True)
        self._thread.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def total(self) -> float:
        """Seconds of every attempt so far, this one up to now."""
        return self.before + self.elapsed()

    def _write(self) -> None:
        self._attempts[self.index]["seconds"] = self.elapsed()
        self._storage.set_trial_user_attr(self._trial_id, ATTR_ATTEMPTS, self._attempts)

    def _beat(self, every: float) -> None:
        while not self._stopped.wait(every):
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - a missed heartbeat costs at most one interval
                    pass

    def stop(self, error: str | None = None) -> float:
        """Record this attempt's final seconds and its error, if it raised (before the trial is told: a
        finished trial takes no updates); returns the total over every attempt."""
        with self._lock:
            self._stopped.set()
            if error:
                self._attempts[self.index]["error"] = error
            try:
                self._write()
            except Exception:  # noqa: BLE001 - the cost still counts it; the record keeps the last beat
                self._attempts[self.index]["seconds"] = self.elapsed()
        self._thread.join(5)
        return self.before + float(self._attempts[self.index]["seconds"])
