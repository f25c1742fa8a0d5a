"""Ray runtime and worker groups: connect to (or start) Ray, place rollout and learner actors.

Placement: one placement group holds a bundle per rollout worker and per learner rank, so a run
either gets all its resources or waits, never half-starts. Under ``ray job submit`` the driver joins
the job's cluster and inherits the job's runtime_env (its working_dir is never overwritten here).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import colocation
from .config import Config

# Every worker: quiet library progress bars and INFO logs (the driver shows progress).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_VERBOSITY": "error", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
# An actor died, or its node did, taking objects it held with it (e.g. the learner's exported weights).
ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)
# vLLM on CPU: use both cores, keep the engine in the actor's process (fast start, direct weight sync).
VLLM_CPU_ENV = {**WORKER_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def init_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS, else start a private local runtime."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh runtime, never a stale cluster left in the temp dir.
        start_local_ray(num_cpus=cfg.ray.num_cpus, log_to_driver=True)


def start_local_ray(attempts: int = 3, **kwargs) -> None:
    """``ray.init(address="local", ...)``, tried again when the node misses Ray's fixed 30 s start-up
    window (seen on an overloaded machine: "The current node timed out during startup")."""
    kwargs.setdefault("include_dashboard", False)
    # Ray starts one idle worker per CPU when the first driver connects, each importing Ray (~3 s of CPU
    # here); our actors carry runtime envs of their own and never use them (docs/performance.md, section 11).
    kwargs.setdefault("_system_config", {"prestart_worker_first_driver": False})
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()


def role_resources(section) -> dict[str, float]:
    """One actor's resources of a ``rollout`` or ``learner`` section: its CPUs, GPUs and custom resources."""
    return {"CPU": section.cpus_per_worker, "GPU": section.gpus_per_worker, **section.resources}


def placement_bundles(cfg: Config, *, learner: bool = True) -> list[tuple[str, dict[str, float]]]:
    """(role, bundle) of every actor of a run, in placement-group order: rollout workers, then learner
    ranks. A bundle holds the actor's CPUs, GPUs and custom resources (zeros left out)."""
    r, le = cfg.rollout, cfg.learner
    out = [(f"rollout worker {i}", role_resources(r)) for i in range(r.num_workers)]
    out += [(f"learner rank {i}", role_resources(le)) for i in range(le.num_workers if learner else 0)]
    if learner and r.colocate is True:  # one actor, both roles (orchestrator/colocation.py)
        out = [(f"{out[1][0]} with {out[0][0]}", colocation.bundle(out[0][1], out[1][1]))]
    return [(role, {k: v for k, v in b.items() if v} or {"CPU": 0.01}) for role, b in out]


class WorkerGroup:
    """Rollout workers and the learner of one run, placed together.

    The group owns the fan-out: ``submit`` splits a prompt table across the rollout workers, ``gather``
    concatenates their records, ``generate`` does both; callers hold the group, never a list of actors."""

    def __init__(self, cfg: Config, model_path: str, *, learner: bool = True, name: str | None = None,
                 shared_dir: str | None = None):
        """``name`` (a run's identity) names the placement group: a group left behind by a dead earlier
        attempt of the same run (e.g. a Tune trial whose process was killed; placement groups outlive
        the actor that made them) is removed first, so the retry gets its resources back.
        ``shared_dir``: a directory every node holding an actor must see as the driver does (the run's
        output dir), checked once the bundles are placed and before any actor starts."""
        from .rollout.worker import RolloutWorker

        r = cfg.rollout
        placed = placement_bundles(cfg, learner=learner)
        bundles = [b for _, b in placed]
        self.roles = [role for role, _ in placed]
        self.node_wait_s = cfg.trainer.node_wait_s
        if name:
            _remove_stale_placement_group(name)
        self.pg = placement_group(bundles, strategy="PACK", name=name or "")
        if not self.pg.wait(self.node_wait_s):
            why = describe_unplaced(self.pg, self.roles, self.node_wait_s)
            remove_placement_group(self.pg)  # a pending group would take the nodes when they come
            raise NodeUnavailable(why)
        if shared_dir is not None:
            try:
                self.check_shared_storage(shared_dir)
            except BaseException:
                remove_placement_group(self.pg)
                raise

        engine_kwargs = dict(dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, seed=r.seed)
        if r.engine == "vllm":
            engine_kwargs["vllm"] = r.vllm  # the section whole, its auto values resolved (config.load_config)
        env = dict(VLLM_CPU_ENV)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(r.vllm.kv_cache_gib))))
        if r.vllm.multiprocess:
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        self._rollout_cls = ray.remote(RolloutWorker)
        self._rollout_args = dict(engine=r.engine, prompt_template=cfg.model.prompt_template,
                                  chat_template=cfg.model.chat_template, think_end=cfg.model.think_end,
                                  engine_kwargs=engine_kwargs,
                                  truncate_prompts=cfg.data.overlong_prompts == "truncate_left")
        self._rollout_env = env
        self.cfg, self.model_path = cfg, model_path
        # Colocated (rollout.colocate): one actor is learner rank 0 and rollout worker 0, in bundle 0.
        self.colocated = learner and r.colocate is True
        self.learner = None
        if self.colocated:
            self._start_learner(model_path)
            return
        self.rollout = [self._new_rollout(i) for i in range(r.num_workers)]
        if learner:
            self._start_learner(model_path)
        ray.get([w.ready.remote() for w in self.rollout])

    def _start_learner(self, model_path: str) -> None:
        if not self.colocated:
            self.learner = LearnerGroup(self.cfg, model_path, self.pg, first_bundle=self.cfg.rollout.num_workers)
            return
        self.learner = LearnerGroup(self.cfg, model_path, self.pg, first_bundle=0, rollout=self._rollout_args)
        self.rollout = [self.learner.lead]

    def submit(self, prompts, spec, step: int) -> list:
        """Start ``generate`` on the rollout workers (an even split of the prompts); returns the Ray refs."""
        n = len(self.rollout)
        size = -(-prompts.num_rows // n)
        return [w.generate.remote(prompts.slice(i * size, size), spec, step=step)
                for i, w in enumerate(self.rollout) if i * size < prompts.num_rows]

    @staticmethod
    def gather(refs: list):
        """The records of ``submit``'s refs, in prompt order; the schema metadata keeps the slowest
        worker's engine seconds (the critical path)."""
        import pyarrow as pa

        from .rollout.worker import ENGINE_SECONDS, engine_seconds

        parts = ray.get(refs)
        slowest = max((engine_seconds(p) for p in parts), default=0.0)
        return pa.concat_tables(parts).replace_schema_metadata({ENGINE_SECONDS: str(slowest)})

    def generate(self, prompts, spec, step: int):
        """Records of ``prompts`` under the sampling ``spec``, from every rollout worker."""
        return self.gather(self.submit(prompts, spec, step))

    def _new_rollout(self, i: int):
        r = self.cfg.rollout
        return self._rollout_cls.options(
            num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, resources=dict(r.resources) or None,
            runtime_env={"env_vars": self._rollout_env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote(self.model_path, worker_index=i, **self._rollout_args)

    def dead_rollouts(self, timeout_s: float = 30.0) -> list[int]:
        """Indices of rollout workers that no longer answer (none when colocated: a lost colocated actor
        is the learner's, which the trainer rebuilds from the last state with the engine inside)."""
        if self.colocated:
            return []
        dead = []
        for i, w in enumerate(self.rollout):
            try:
                ray.get(w.ready.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
        return dead

    def replace_rollouts(self, indices: list[int]) -> list[int]:
        """New workers in the dead workers' bundles (they start from the run's start weights: push yours).

        A bundle whose node was lost is re-placed by Ray on another node that fits it; this waits up to
        ``trainer.node_wait_s`` for that, then raises ``NodeUnavailable`` naming the missing resources."""
        for i in indices:
            try:
                ray.kill(self.rollout[i])
            except Exception:
                pass

        def start():
            for i in indices:
                self.rollout[i] = self._new_rollout(i)
            ray.get([self.rollout[i].ready.remote() for i in indices])

        self._on_live_bundles(start)
        return indices

    def replace_learner(self, model_path: str) -> None:
        """A new learner group in the same bundles, from ``model_path`` (then load a state into it);
        waits for bundles on a lost node to be re-placed, like ``replace_rollouts``."""
        self.learner.shutdown()

        self._on_live_bundles(lambda: self._start_learner(model_path))

    def _on_live_bundles(self, start) -> None:
        """Run ``start`` (new actors in the group's bundles) once every bundle sits on a live node.

        Ray re-places the bundles of a lost node by itself, but the placement group's table can name
        the dead node for a moment after the node is declared dead, and an actor created then dies with
        it: such a start is tried again, all within ``trainer.node_wait_s``."""
        deadline = time.monotonic() + self.node_wait_s
        while True:
            self._wait_for_bundles(deadline)
            try:
                start()
                return
            except ray.exceptions.ActorDiedError:
                if time.monotonic() > deadline:
                    raise

    def _wait_for_bundles(self, deadline: float) -> None:
        """Return once the group is placed with every bundle on a live node, else ``NodeUnavailable``."""
        while True:
            table = ray.util.placement_group_table(self.pg)
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            where = table.get("bundles_to_node_id", {})
            if table.get("state") == "CREATED" and all(where.get(i) in alive for i in range(len(self.roles))):
                return
            if time.monotonic() > deadline:
                raise NodeUnavailable(describe_unplaced(self.pg, self.roles, self.node_wait_s))
            time.sleep(0.5)

    def placement(self) -> dict:
        """Which node holds each actor: ``{"rollout": [node], "learner": [node]}`` with id, address, labels."""
        return placement_of(self.pg, self.roles)

    def check_shared_storage(self, out_dir: str) -> None:
        """Fail at once (``ConfigError``) when a node holding an actor cannot see ``out_dir`` as the driver
        does: the learner writes checkpoints and states there and the driver reads them, rollout workers
        load weights from there. One zero-CPU task per other node reads a file the driver just wrote."""
        import uuid

        from .config import ConfigError

        here = ray.get_runtime_context().get_node_id()
        where = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        first = {}
        for i, role in enumerate(self.roles):
            if where.get(i) and where[i] != here:
                first.setdefault(where[i], (i, role))
        if not first:
            return
        probe, token = Path(out_dir).resolve() / f".storage-probe-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        try:
            read = ray.remote(num_cpus=0)(_read_text)
            seen = ray.get([read.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=i)).remote(str(probe)) for i, _ in first.values()])
        finally:
            probe.unlink(missing_ok=True)
        for (node, (_, role)), text in zip(first.items(), seen):
            if text != token:
                raise ConfigError(
                    f"trainer.output_dir: {role}'s node ({node[:8]}) does not see the driver's {probe.parent}; "
                    "on several nodes it must be storage every node mounts (checkpoints, "
                    "states and warm starts are written on one node and read on another)")

    def shutdown(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()
        for a in self.rollout:
            try:
                ray.kill(a)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass


class LearnerGroup:
    """The learner ranks of one run behind one handle (rank 0 answers for the group).

    ``submit_step`` sends the batch with the call to one rank, or as one object in the store to several.
    Weight export, saves and state saves are collectives under FSDP, so they go to every rank there and
    to rank 0 otherwise.
    """

    def __init__(self, cfg: Config, model_path: str, pg, *, first_bundle: int, rollout: dict | None = None):
        """``rollout``: a ``RolloutWorker``'s arguments when rank 0 hosts the engine (``rollout.colocate``)."""
        from .learner.distributed import rendezvous_address, resolve_strategy
        from .learner.worker import Learner

        le, a = cfg.learner, cfg.algorithm
        self.world_size = le.num_workers
        self.sync_dtype = cfg.model.dtype  # the engines' dtype: every weight sync is cast to it
        strategy = le.strategy
        if le.gpus_per_worker <= 0 and strategy == "auto":
            strategy = "ddp"
        self.strategy = resolve_strategy(strategy, _device_kind(le.gpus_per_worker), self.world_size)
        self.sharded = self.strategy == "fsdp"

        def placed(i: int):
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + i)

        dist_init = None
        if self.world_size > 1:  # the rendezvous lives on rank 0's node
            dist_init = ray.get(ray.remote(rendezvous_address).options(
                num_cpus=0, scheduling_strategy=placed(0)).remote())
        remote_learner, extra, need = ray.remote(Learner), {}, role_resources(le)
        if rollout is not None:
            from .learner.colocated import ColocatedLearner

            remote_learner, extra = ray.remote(ColocatedLearner), {"rollout": rollout}
            need = colocation.bundle(role_resources(cfg.rollout), need)
        custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU") and v}
        self.ranks = [
            remote_learner.options(
                num_cpus=need["CPU"], num_gpus=need["GPU"], resources=custom or None,
                runtime_env={"env_vars": dict(WORKER_ENV)}, scheduling_strategy=placed(i),
            ).remote(model_path, **extra, lr=le.lr, weight_decay=le.weight_decay, grad_clip=le.grad_clip,
                     micro_batch_size=le.micro_batch_size, algorithm=a, lr_warmup_steps=le.lr_warmup_steps,
                     dtype=cfg.model.dtype,
                     num_threads=le.num_threads or None, seed=cfg.trainer.seed, rank=i, world_size=self.world_size,
                     strategy=self.strategy if self.world_size > 1 else "auto", dist_init=dist_init,
                     micro_batch_tokens=le.micro_batch_tokens, activation_checkpointing=le.activation_checkpointing,
                     max_shard_size=le.max_shard_size, compile=le.compile)
            for i in range(self.world_size)
        ]
        ray.get([r.version.remote() for r in self.ranks])

    @property
    def lead(self):
        return self.ranks[0]

    def _all(self, method: str, *args):
        return [getattr(r, method).remote(*args) for r in self.ranks]

    def _collective(self, method: str, *args):
        """Refs of a call that every rank must join (FSDP) or only rank 0 makes; rank 0's ref first."""
        if self.sharded:
            return self._all(method, *args)
        return [getattr(self.lead, method).remote(*args)]

    def submit_step(self, batch, export: bool = True) -> tuple[list, object]:
        """Start a step that also exports the new weights (``export``): (metrics refs, rank 0's first; an
        object ref to the updated weights as a ``WeightPayload`` in the engines' dtype, or None). The
        weights ref can go to the rollout workers at once (they wait for it), before ``step_result``
        collects the metrics."""
        # One rank: the batch goes with the call (a small table travels inline, no object-store round
        # trip); several: one object in the store that every rank reads.
        arg = batch if self.world_size == 1 else ray.put(batch)
        calls = [r.step_and_payload.options(num_returns=2).remote(arg, export and (self.sharded or i == 0),
                                                                  self.sync_dtype)
                 for i, r in enumerate(self.ranks)]
        return [m for m, _ in calls], (calls[0][1] if export else None)

    def sequence_kl(self, batch):
        """Each sample's summed KL to the reference (``Learner.sequence_kl``; every rank joins when several)."""
        return ray.get(self._all("sequence_kl", batch) if self.world_size > 1 else [self.lead.sequence_kl.remote(batch)])[0]

    @staticmethod
    def step_result(metric_refs: list) -> dict:
        return ray.get(metric_refs)[0]

    def get_weights(self):
        """An object ref to rank 0's full weights as a ``WeightPayload`` in the engines' dtype (to send to
        every rollout worker)."""
        refs = self._collective("sync_payload", self.sync_dtype)
        if len(refs) > 1:
            ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def broadcast_weights(self, slots: list[int], version: int, bucket_mb: float) -> list:
        """Refs (rank 0's first, ``{slot: "ok" | error}``) of a broadcast of the weights in the engines'
        dtype to the engines of ``slots`` over their groups (``learner/sync_sender.py``)."""
        return self._collective("broadcast_weights", slots, version, self.sync_dtype, bucket_mb)

    def save(self, path: str) -> str:
        return ray.get(self._collective("save", path))[0]

    def save_state(self, path: str) -> str:
        return ray.get(self._collective("save_state", path))[0]

    def load_state(self, path: str) -> int:
        return ray.get(self._all("load_state", path))[0]

    def version(self) -> int:
        return ray.get(self.lead.version.remote())

    def shutdown(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r)
            except Exception:
                pass


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


class NodeUnavailable(RuntimeError):
    """No live node offers what a run's actors need, after waiting ``trainer.node_wait_s``."""


def _nodes() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes()}


def _node_info(node: dict | None, node_id: str) -> dict:
    if node is None:
        return {"node_id": node_id, "alive": False}
    return {"node_id": node_id, "address": node.get("NodeManagerAddress"), "alive": bool(node.get("Alive")),
            "labels": {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}}


def placement_of(pg, roles: list[str]) -> dict:
    """Node of every bundle of ``pg`` by role (``rollout worker 3`` -> ``rollout[3]``)."""
    table = ray.util.placement_group_table(pg)
    where, nodes = table.get("bundles_to_node_id", {}), _nodes()
    out: dict[str, list] = {"rollout": [], "learner": []}
    for i, role in enumerate(roles):
        node_id = where.get(i, "")
        for kind in out:  # a colocated actor's role names both
            if kind in role:
                out[kind].append(_node_info(nodes.get(node_id), node_id) if node_id else {"node_id": None})
    return out


def describe_placement(placement: dict) -> str:
    """One line: each node (short id and labels) with the actors it holds."""
    by_node: dict[str, list[str]] = {}
    for role, nodes in placement.items():
        for i, n in enumerate(nodes):
            labels = ", ".join(f"{k}={v}" for k, v in sorted((n.get("labels") or {}).items()))
            node = f"node {(n.get('node_id') or 'unplaced')[:8]}" + (f" ({labels})" if labels else "")
            by_node.setdefault(node, []).append(f"{role} {i}")
    return "; ".join(f"{node}: {', '.join(who)}" for node, who in by_node.items())


def describe_unplaced(pg, roles: list[str], waited_s: float) -> str:
    """Which actors have no node, what each asks for, and what the live nodes offer."""
    table = ray.util.placement_group_table(pg)
    placed, specs = table.get("bundles_to_node_id", {}), pg.bundle_specs
    alive = [n for n in ray.nodes() if n.get("Alive")]
    missing = [i for i in range(len(roles)) if i not in placed or placed[i] not in {n["NodeID"] for n in alive}]
    if not missing:
        missing = list(range(len(roles)))  # not created as a whole: every bundle waits

    def fits_a_node(spec: dict) -> bool:
        return any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in spec.items()) for n in alive)

    # Name the actors no live node could ever hold (a missing resource); if each would fit somewhere
    # (the nodes are busy or too few together), all that wait.
    missing = [i for i in missing if not fits_a_node(specs[i])] or missing
    asks = {}
    for i in missing:
        asks.setdefault(json.dumps(specs[i], sort_keys=True), []).append(roles[i])
    what = "; ".join(f"{', '.join(who)} need{'s' if len(who) == 1 else ''} {spec}" for spec, who in asks.items())
    offered = sorted({k for n in alive for k in n.get("Resources", {}) if not k.startswith(("node:", "memory",
                                                                                               "object_store"))})
    custom = {k: v for k, v in specs[missing[0]].items() if k not in ("CPU", "GPU", "memory")}
    example = f" --resources='{json.dumps(custom)}'" if custom else ""
    return (f"no live node offers what the run needs after waiting {waited_s:g} s (trainer.node_wait_s): {what}. "
            f"Live nodes: {len(alive)}, offering {', '.join(offered) or 'nothing'}. Add a node that offers it "
            f"(`ray start --address=HEAD:PORT{example} ...`), or change the run's rollout/learner resources")


def _remove_stale_placement_group(name: str) -> None:
    from ray.util import get_placement_group

    try:
        stale = get_placement_group(name)
    except ValueError:  # none by that name
        return
    remove_placement_group(stale)


def _device_kind(gpus_per_worker: float):
    import torch

    return torch.device("cuda" if gpus_per_worker > 0 else "cpu")
