"""Colocation (``rollout.colocate``): the run's rollout engine inside learner rank 0's process.

verl calls this the hybrid engine. Here it is the HF engine's: one Ray actor holds the learner and the
engine, so a run starts one process instead of two (each imports torch and transformers: ~10 s of CPU on
the hosts measured, ``docs/performance.md`` section 11) and a weight sync is a copy in memory, not a trip
through the object store. The price is overlap: the engine and the learner take turns (one actor runs
one call at a time), so the next step's rollout no longer runs beside the update, which on a few CPU
cores shared by both processes it hardly did.

What it needs, checked in the driver before Ray starts: the HF engine (vLLM keeps its own engine and
memory pools), one rollout worker and one learner rank, synchronous steps (an off-policy rollout would
read the weights the learner is changing) and the object-store sync (a rank cannot broadcast to itself).
``auto`` colocates exactly then, on CPUs and without custom resources (a cluster's node groups keep
learner and engines apart)."""

from __future__ import annotations

from .config_merge import ConfigError

AUTO = "auto"  # devices.AUTO (devices.resolve_auto calls this module: no import back)


def conflicts(cfg) -> list[str]:
    """What keeps ``cfg`` from colocating, each naming its key (empty: it can)."""
    r, le = cfg.rollout, cfg.learner
    out = []
    if r.engine != "hf":
        out.append(f"rollout.engine={r.engine} (only the hf engine runs inside the learner's process)")
    if r.num_workers != 1:
        out.append(f"rollout.num_workers={r.num_workers} (one engine shares learner rank 0's process)")
    if le.num_workers != 1:
        out.append(f"learner.num_workers={le.num_workers} (one learner rank)")
    if cfg.trainer.off_policy_steps:
        out.append(f"trainer.off_policy_steps={cfg.trainer.off_policy_steps} (an off-policy rollout runs beside "
                   "the update that changes the weights it would read)")
    if r.weight_sync.method == "collective":
        out.append("rollout.weight_sync.method=collective (a rank cannot broadcast to itself)")
    return out


def resolve(cfg) -> tuple[bool, str]:
    """``rollout.colocate=auto``: (value, why)."""
    r, le = cfg.rollout, cfg.learner
    blockers = conflicts(cfg)
    if r.gpus_per_worker or le.gpus_per_worker:
        blockers.append("GPUs (auto colocates on CPUs; set rollout.colocate=true to share a GPU)")
    if r.resources or le.resources:
        blockers.append("custom resources (node groups keep the learner and the engines apart)")
    if blockers:
        return False, "separate actors: " + blockers[0]  # the first thing to change
    return True, ("HF engine, one rollout worker, one learner rank, synchronous, CPUs: the engine runs in the "
                  "learner's process (one process to start instead of two, weights copied in memory)")


def check(cfg) -> None:
    """``ConfigError`` for a bad ``rollout.colocate`` or an explicit ``true`` that cannot be honoured."""
    c = cfg.rollout.colocate
    if not (c == AUTO or isinstance(c, bool)):
        raise ConfigError(f"rollout.colocate={c!r}: must be true, false or auto")
    if c is True and (blockers := conflicts(cfg)):
        raise ConfigError("rollout.colocate=true: the engine cannot share the learner's process with "
                          + "; ".join(blockers))


def bundle(rollout: dict[str, float], learner: dict[str, float]) -> dict[str, float]:
    """One actor's resources: what the engine and the learner rank would each have asked for, together.
    Both run on the actor's first GPU, so on GPUs give the two roles fractions that add up to one."""
    return {k: rollout.get(k, 0) + learner.get(k, 0) for k in {**rollout, **learner}}
