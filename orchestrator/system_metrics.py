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
import warnings
from collections.abc import Iterator

from .config import Config


def _monitor(run_id: str, tracking_uri: str, interval_s: float, node: str | None = None):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    monitor.budgetrl_first_step = monitor._logging_step
    return monitor


def _finish(monitor) -> None:
    """Stop ``monitor`` and send what it holds. A run (or a node's share of it) shorter than one period
    gets one sample at the end, averaged since the monitor started, rather than none."""
    monitor.finish()
    if monitor._logging_step == monitor.budgetrl_first_step:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


class NodeSampler:
    """A Ray actor (no CPU reserved) that runs the monitor on one node of the run, as ``system/<node>/*``."""

    def __init__(self, run_id: str, tracking_uri: str, interval_s: float, node: str):
        self.monitor = _monitor(run_id, tracking_uri, interval_s, node)

    def stop(self) -> None:
        _finish(self.monitor)


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
    """Send each node's last samples and end its sampler; one that failed (or whose node was lost) is
    reported, never an error of the run."""
    import ray

    for s in samplers:
        try:
            ray.get(s.stop.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001 - system metrics must not fail a finished run
            warnings.warn(f"system metrics: a node's sampler failed ({type(exc).__name__}: {exc})", stacklevel=2)
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
        _finish(monitor)
        if samplers:
            stop_node_samplers(samplers)
