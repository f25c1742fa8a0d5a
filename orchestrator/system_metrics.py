"""System metrics of a training run: MLflow's own sampler, attached to the run by id.

MLflow's ``SystemMetricsMonitor`` samples CPU, memory, disk and network (GPU utilization and memory
too where ``pynvml`` and a GPU are present) and logs them as ``system/*`` metrics, which the MLflow UI
shows in the run's "System metrics" tab. MLflow starts it from the fluent ``start_run``; the project's
runs go through ``MlflowClient`` (tracking.py), so the driver starts the monitor on the run id itself.
One set per node: the driver samples its own machine as ``system/*``; on a run whose actors span
several nodes, a small sampler actor on each other node logs ``system/<node>/*`` (MLflow's ``node_id``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from .config import Config


def _monitor(run_id: str, tracking_uri: str, interval_s: float, node: str | None = None):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


class NodeSampler:
    """A Ray actor (no CPU reserved) that runs the monitor on one node of the run, as ``system/<node>/*``."""

    def __init__(self, run_id: str, tracking_uri: str, interval_s: float, node: str):
        self.monitor = _monitor(run_id, tracking_uri, interval_s, node)

    def stop(self) -> None:
        self.monitor.finish()


def other_nodes(placement: dict, driver_node: str) -> list[str]:
    """The Ray node ids of a run's actors (``WorkerGroup.placement``: role -> node infos) but the driver's."""
    nodes = {info.get("node_id") for infos in placement.values() for info in infos}
    return sorted(n for n in nodes if n and n != driver_node)


def start_node_samplers(cfg: Config, run_id: str, tracking_uri: str, nodes: list[str]) -> list:
    """One ``NodeSampler`` pinned to each of ``nodes``; their keys carry the node id's first 8 hex."""
    if not nodes:
        return []
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(num_cpus=0)(NodeSampler)
    return [cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
        run_id, tracking_uri, cfg.tracking.system_metrics_interval_s, f"node-{n[:8]}") for n in nodes]


def stop_node_samplers(samplers: list) -> None:
    import ray

    with contextlib.suppress(Exception):  # a lost node's sampler is gone with it
        ray.get([s.stop.remote() for s in samplers], timeout=60)
    for s in samplers:
        ray.kill(s)


@contextlib.contextmanager
def sampling(cfg: Config, run_id: str, tracking_uri: str, placement: dict | None = None) -> Iterator[None]:
    """Sample the driver's machine (and each other node of ``placement``) into ``run_id`` while the block
    runs, when ``tracking.system_metrics`` is on. A resumed run continues its system metrics' steps after
    the last logged one. The last samples are sent as the block ends: end it before the run is finished."""
    if not cfg.tracking.system_metrics:
        yield
        return
    import ray

    monitor = _monitor(run_id, tracking_uri, cfg.tracking.system_metrics_interval_s)
    samplers = []
    try:
        if placement and ray.is_initialized():
            nodes = other_nodes(placement, ray.get_runtime_context().get_node_id())
            samplers = start_node_samplers(cfg, run_id, tracking_uri, nodes)
        yield
    finally:
        monitor.finish()
        if samplers:
            stop_node_samplers(samplers)
