"""Deliberately misbehaving verifiers, for tests of error and timeout handling.

Each misbehaves only on solutions containing a trigger word and is an exact match otherwise, so one
batch mixes bad and good samples. Refer to them by dotted path, e.g.
``"orchestrator.rewards.testing:raises_on_raise"``, so worker processes import them too.
"""

from __future__ import annotations

import time

from orchestrator.rewards.verifiers import exact_match


def raises_on_raise(solution: str, answer: str) -> bool:
    if "RAISE" in solution:
        raise ValueError(f"bad sample {solution.strip()!r}")
    return exact_match(solution, answer)


def hangs_on_hang(solution: str, answer: str) -> bool:
    while "HANG" in solution:  # forever; sleeping keeps the shared CPU free
        time.sleep(3600)
    return exact_match(solution, answer)


SLOW_S = 0.2


def slow(solution: str, answer: str) -> bool:
    """Slow but fine: each call takes SLOW_S, well under any timeout a test uses."""
    time.sleep(SLOW_S)
    return exact_match(solution, answer)


def crashes_on_crash(solution: str, answer: str) -> bool:
    """Kills its own process, as a segfaulting extension would: use it only inside a RewardPool."""
    if "CRASH" in solution:
        import os

        os._exit(3)
    return exact_match(solution, answer)
