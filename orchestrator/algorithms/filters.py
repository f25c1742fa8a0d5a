"""Which groups (one prompt's samples) dynamic sampling keeps: a per-row keep mask over scored records."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .registry import Registry

GROUP_FILTERS = Registry("dynamic sampling filter", "algorithm.dynamic_sampling.filter")


@GROUP_FILTERS.register("zero_variance")
def zero_variance(records: pa.Table) -> np.ndarray:
    """DAPO: keep a group (one prompt's samples) unless its rewards are all equal (all right or all wrong)."""
    ids = records["prompt_id"].to_pylist()
    rewards = np.asarray(records["reward"].to_numpy(zero_copy_only=False), dtype=np.float64)
    seen: dict = {}
    for pid, r in zip(ids, rewards):
        lo, hi = seen.get(pid, (r, r))
        seen[pid] = (min(lo, r), max(hi, r))
    return np.array([seen[pid][0] != seen[pid][1] for pid in ids], dtype=bool)
