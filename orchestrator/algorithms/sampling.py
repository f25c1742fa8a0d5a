"""DAPO dynamic sampling: keep only groups that carry a learning signal, generating more prompts to refill.

``fill_batch`` is called by the driver right after a step's rollouts are scored; ``more()`` draws,
generates and scores one more batch of prompts (the driver owns prompts and workers).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from .filters import GROUP_FILTERS
from .presets import resolve


def _groups(table: pa.Table) -> list:
    """prompt ids in order of first appearance."""
    return list(dict.fromkeys(table["prompt_id"].to_pylist()))


def _first_groups(table: pa.Table, n: int) -> pa.Table:
    chosen = set(_groups(table)[:n])
    return table.filter(pa.array([pid in chosen for pid in table["prompt_id"].to_pylist()], pa.bool_()))


def fill_batch(records: pa.Table, more: Callable[[], pa.Table], algorithm) -> tuple[pa.Table, dict[str, float]]:
    """(the step's training records, metrics) under ``algorithm.dynamic_sampling``.

    Off: ``records`` unchanged, no metrics. On: groups the filter rejects are dropped and ``more()`` is
    called until as many groups as ``records`` holds are kept or ``max_tries`` generation rounds (the first
    included) are spent; the kept groups are cut to that count, and a shortfall is padded with dropped
    groups (their advantages are 0) so every step trains on the same batch size."""
    a = resolve(algorithm)
    ds = a.dynamic_sampling
    if not ds.enabled:
        return records, {}
    keep = GROUP_FILTERS.get(ds.filter)
    want = len(_groups(records))
    kept, dropped, n_kept, n_dropped, tries, batch = [], [], 0, 0, 0, records
    while True:
        tries += 1
        mask = keep(batch)
        kept.append(batch.filter(pa.array(mask, pa.bool_())))
        dropped.append(batch.filter(pa.array(~mask, pa.bool_())))
        n_kept += len(_groups(kept[-1]))
        n_dropped += len(_groups(dropped[-1]))
        if n_kept >= want or tries >= ds.max_tries:
            break
        batch = more()
    out = _first_groups(pa.concat_tables(kept, promote_options="default"), want)
    padded = max(0, want - n_kept)
    if padded:
        out = pa.concat_tables([out, _first_groups(pa.concat_tables(dropped, promote_options="default"), padded)],
                               promote_options="default")
    return out, {"dynamic_sampling/tries": float(tries), "dynamic_sampling/dropped_groups": float(n_dropped),
                 "dynamic_sampling/kept_groups": float(min(n_kept, want)),
                 "dynamic_sampling/padded_groups": float(padded)}
