"""MLflow Model Registry: register a checkpoint directory as a model version, resolve one back.

A checkpoint is a Hugging Face ``save_pretrained`` directory. ``register_checkpoint`` makes it a
registered model version whose source is the MLflow 3 logged model holding its files
(``logged_model.py``): the training run's model ``checkpoint`` when it holds this checkpoint (nothing is
copied), else, for a run made before logged models, the run's ``checkpoint`` artifact, otherwise a new
registration run that records the directory as its logged model. Lineage is kept as version tags: source run, checkpoint
path, and the source run's config hash, git commit, dataset digest and workload when it has them.

``resolve_model_uri`` turns ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``
or ``runs:/RUN_ID/PATH`` (``runs:/RUN_ID/checkpoint``: the run's logged model of that name, or its artifact)
into a local directory (downloaded once into a cache), and passes a local
directory through unchanged. Everything goes through an explicit ``MlflowClient`` (no fluent globals).

The model's measured frontier (``effort.Frontier``: accuracy and mean tokens per evaluated budget, from the
source run's final eval summary) travels with the version: a JSON artifact of the version's run, named by the
``budgetrl.frontier`` version tag, with a one-line ``budgetrl.frontier_summary`` tag; ``load_frontier`` reads
it back for serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import logged_model, tracking
from .effort import Frontier

REGISTRY_PREFIXES = ("models:/", "runs:/")
CHECKPOINT_ARTIFACT = "checkpoint"
TAG_CHECKPOINT = "budgetrl.checkpoint"  # set by the trainer on the run that saved a checkpoint
# Lineage tags copied from the source run onto the model version when the run has them.
_INHERITED_TAGS = (tracking.TAG_CONFIG_HASH, tracking.TAG_GIT_COMMIT, tracking.TAG_DATASET_DIGEST,
                   tracking.TAG_WORKLOAD, tracking.TAG_STAGE)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_COMPLETE = ".budgetrl_download_complete"
TAG_FRONTIER = "budgetrl.frontier"  # version tag: the frontier JSON's artifact path in the version's run
TAG_FRONTIER_SUMMARY = "budgetrl.frontier_summary"  # version tag: Frontier.summary(), for people and the UI
TAG_PROMPT_HINT = "budgetrl.prompt_hint"  # version tag: the training run's budget.prompt_hint (serving renders it)
TAG_MODEL_ID = "budgetrl.model_id"  # version tag: the MLflow logged model the version was registered from
_EVAL_SUMMARY = re.compile(r"^eval/(?:step_(\d+)|eval)_summary\.parquet$")  # evaluation.log_eval's tables


class RegistryError(ValueError):
    """A model URI that cannot be resolved, or a checkpoint that cannot be registered."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed registry URI: ``models:/name/version``, ``models:/name@alias`` or ``runs:/id/path``."""

    kind: str  # "version" | "alias" | "latest" | "run"
    name: str  # registered model name, or the run id for kind "run"
    ref: str  # version number, alias, "latest", or the artifact path for kind "run"


def is_registry_uri(target: str) -> bool:
    return str(target).startswith(REGISTRY_PREFIXES)


def parse_model_uri(uri: str) -> ModelRef:
    """Parse a registry URI; raises ``RegistryError`` naming the URI when it is malformed."""
    if uri.startswith("runs:/"):
        rest = uri[len("runs:/"):].strip("/")
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise RegistryError(f"{uri!r}: expected runs:/RUN_ID/ARTIFACT_PATH (e.g. runs:/abc123/checkpoint)")
        return ModelRef("run", run_id, path)
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r}: not a registry URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH)")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in alias:
            return ModelRef("alias", name, alias)
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit() and int(version) > 0:
            return ModelRef("version", name, str(int(version)))
        if name and version == "latest":
            return ModelRef("latest", name, "latest")
    raise RegistryError(f"{uri!r}: expected models:/NAME/VERSION (VERSION a positive integer or 'latest') "
                        "or models:/NAME@ALIAS")


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking._probe(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


# ---------------------------------------------------------------------------------------------
# Register


def _local_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _artifact_files(client, run_id: str, path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out.update(_artifact_files(client, run_id, info.path))
        else:
            out[info.path] = int(info.file_size or 0)
    return out


def _run_holds_checkpoint(client, run_id: str, ckpt: Path) -> bool:
    """The run's ``checkpoint/`` artifact has the same files with the same sizes as ``ckpt``."""
    try:
        remote = _artifact_files(client, run_id, CHECKPOINT_ARTIFACT)
    except Exception:
        return False
    prefix = CHECKPOINT_ARTIFACT + "/"
    remote = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in remote.items()}
    return bool(remote) and remote == _local_files(ckpt)


def _find_checkpoint_models(client, ckpt: Path, run_id: str | None) -> tuple:
    """(the newest logged model recorded for this checkpoint path by ``logged_model.log_checkpoint_model``, of run
    ``run_id`` when given, registration runs' left out; the newest one, registration runs' included, whose
    artifacts are the directory's files), None for either missing: a periodic checkpoint's model is external
    (lineage and step, no files)."""
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        value = str(ckpt).replace("'", "\\'")
        query = f"tags.`{TAG_CHECKPOINT}` = '{value}'" + (f" AND source_run_id = '{run_id}'" if run_id else "")
        models = client.search_logged_models(experiments, filter_string=query, max_results=20,
                                             order_by=[{"field_name": "creation_time", "ascending": False}])
    except Exception:
        return None, None
    local = _local_files(ckpt)
    holding = next((m for m in models if m.status == "READY"
                    and logged_model.checkpoint_model_artifacts(client, m) == local), None)
    recorded = next((m for m in models if m.tags.get(tracking.TAG_STAGE) != "register"), None)  # not our own
    return recorded, holding


def _find_training_run(client, ckpt: Path) -> str | None:
    """The run the trainer tagged with this checkpoint path (``budgetrl.checkpoint``), if any."""
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        value = str(ckpt).replace("'", "\\'")
        runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_CHECKPOINT}` = '{value}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    except Exception:
        return None
    return runs[0].info.run_id if runs else None


def _check_dir(model_dir: Path, where: str, *, shown: str | None = None, **checks) -> dict:
    """``checkpoint_files.check_model_dir`` on a checkpoint (config.json, every shard its index names, EOS ids;
    ``checks``: its think_end, chat_template, present), as a ``RegistryError`` led by ``where``; ``shown``
    replaces the local directory in the message (a registry artifact checked in a temporary copy). A failure that
    names another key (``model.think_end``, ``model.chat_template``) stays a ``CheckpointError``."""
    from .checkpoint_files import CheckpointError, check_model_dir

    try:
        return check_model_dir(model_dir, **checks)
    except CheckpointError as exc:
        msg, prefix = str(exc), f"model.path={str(model_dir)!r}: "
        named_key = not msg.startswith(prefix)  # names a key of its own (model.think_end, model.chat_template)
        msg = msg if named_key else msg[len(prefix):]
        msg = msg.replace(str(model_dir), shown) if shown else msg
        raise (CheckpointError(msg) if named_key else RegistryError(f"{where}: {msg}")) from None


def register_checkpoint(tracking_uri: str | None, checkpoint_dir: str | os.PathLike, name: str,
                        run_id: str | None = None, tags: Mapping[str, str] | None = None, *,
                        alias: str | None = None, experiment: str = "budgetrl",
                        description: str | None = None, frontier: Frontier | str | None = "auto",
                        token_price: float | None = None) -> int:
    """Register ``checkpoint_dir`` as a new version of registered model ``name``; returns the version.

    ``run_id`` is the run that produced the checkpoint (its lineage tags are copied onto the version);
    when not given, the run that recorded this checkpoint path is looked up (its logged model, else its
    ``budgetrl.checkpoint`` tag). The version is registered from the MLflow logged model that holds these files
    (``logged_model.log_checkpoint_model``; nothing is copied), else from a run made before logged models that
    holds them as its ``checkpoint`` artifact, else a registration run in ``experiment`` records the directory
    as its logged model. The recorded model's step picks the eval summary for the frontier. ``alias`` (e.g.
    ``prod``) is moved to the new version. ``tags`` are added to the version as given. ``frontier``: ``"auto"`` stores the source run's final
    eval summary as the version's frontier when it has one (``run_frontier``; ``token_price`` per 1000 tokens
    fills its cost), a ``Frontier`` is stored as given, None stores none.
    """
    ckpt = Path(checkpoint_dir).expanduser().resolve()
    _check_dir(ckpt, f"checkpoint_dir={str(checkpoint_dir)!r}")
    if not _NAME_RE.match(name):
        raise RegistryError(f"name={name!r}: use letters, digits, '_', '-', '.' (no '/' or '@')")
    if not (frontier is None or frontier == "auto" or isinstance(frontier, Frontier)):
        raise RegistryError(f"frontier={frontier!r}: 'auto', None or an effort.Frontier")
    client, uri = _client(tracking_uri)

    source_run = None
    if run_id is not None:
        try:
            source_run = client.get_run(run_id)
        except Exception as e:
            raise RegistryError(f"run_id={run_id!r}: no such run in {uri}: {e}") from e
    recorded, model = _find_checkpoint_models(client, ckpt, run_id)
    if source_run is None:
        found = recorded.source_run_id if recorded is not None else _find_training_run(client, ckpt)
        source_run = client.get_run(found) if found else None

    version_tags = {tracking.TAG_SOURCE_CHECKPOINT: str(ckpt)}
    if source_run is not None:
        version_tags[tracking.TAG_SOURCE_RUN] = source_run.info.run_id
        version_tags.update({k: source_run.data.tags[k] for k in _INHERITED_TAGS if k in source_run.data.tags})
        if hint := source_run.data.params.get("budget.prompt_hint"):  # the model was told its budget in training
            version_tags[TAG_PROMPT_HINT] = hint
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    if isinstance(frontier, str):  # "auto": read before anything is written, so a bad table leaves no run behind
        step = (recorded.tags or {}).get(logged_model.TAG_MODEL_STEP) if recorded is not None else None
        frontier = (run_frontier(client, source_run.info.run_id, token_price, step=int(step) if step else None)
                    if source_run is not None else None)

    if model is None and source_run is not None and _run_holds_checkpoint(client, source_run.info.run_id, ckpt):
        holder, source = source_run.info.run_id, f"runs:/{source_run.info.run_id}/{CHECKPOINT_ARTIFACT}"
    else:
        if model is None:
            model = _registration_model(client, uri, experiment, name, ckpt, version_tags)
        holder, source = model.source_run_id, model.artifact_location
        version_tags[TAG_MODEL_ID] = model.model_id
    if frontier is not None:
        version_tags.update(_store_frontier(client, holder, frontier))

    try:
        client.get_registered_model(name)
    except Exception:
        try:
            client.create_registered_model(name, description="budgetrl checkpoints")
        except Exception:  # created concurrently
            client.get_registered_model(name)
    # source: the model's artifact URI, not models:/<model_id> (the SQL registry resolves that through the
    # process-global tracking URI, not this client's).
    mv = client.create_model_version(name, source=source, run_id=holder, tags=version_tags,
                                     description=description, model_id=version_tags.get(TAG_MODEL_ID))
    version = int(mv.version)
    if TAG_MODEL_ID in version_tags:
        _link_version(client, version_tags[TAG_MODEL_ID], name, version)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return version


def _registration_model(client, uri: str, experiment: str, name: str, ckpt: Path, version_tags: dict):
    """A registration run (``budgetrl.stage=register``) that records ``ckpt`` as its logged model."""
    run_tags = {k: v for k, v in version_tags.items() if k.startswith(tracking.TAG_PREFIX)}
    run_tags[tracking.TAG_STAGE] = "register"
    with tracking.Tracker.start(uri, experiment, run_name=f"register-{name}", tags=run_tags) as tracker:
        model_id = logged_model.log_checkpoint_model(tracker, ckpt, 0)
    return client.get_logged_model(model_id)


def _link_version(client, model_id: str, name: str, version: int) -> None:
    """``mlflow.modelVersions`` on the logged model, as ``mlflow.register_model`` writes it: the UI's model ->
    registered version link. A tracking server adds it itself; a SQL store used directly does not."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    links = json.loads(existing) if existing else []
    if not any(link.get("name") == name and str(link.get("version")) == str(version) for link in links):
        links.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})


def run_frontier(client, run_id: str, token_price: float | None = None, step: int | None = None) -> Frontier | None:
    """The frontier of a run's final eval summary (``evaluation.log_eval``: the highest-step
    ``eval/step_N_summary.parquet``, else the eval command's ``eval/eval_summary.parquet``), or with ``step`` (a
    periodic checkpoint's) that step's summary; None without one."""
    import pyarrow.parquet as pq

    try:
        names = [f.path for f in client.list_artifacts(run_id, "eval")]
    except Exception:
        return None
    found = sorted((int(m[1]) if m[1] else -1, n) for n in names if (m := _EVAL_SUMMARY.match(n)))
    if step is not None:
        found = [f for f in found if f[0] == step]
    if not found:
        return None
    path = found[-1][1]
    with tempfile.TemporaryDirectory(prefix="budgetrl-frontier-") as tmp:
        table = pq.read_table(client.download_artifacts(run_id, path, tmp))
    try:
        return Frontier.from_summary(table, f"runs:/{run_id}/{path}", token_price)
    except ValueError as exc:
        raise RegistryError(f"run {run_id}: its eval summary {path} gives no frontier: {exc}") from exc


def _store_frontier(client, run_id: str, frontier: Frontier) -> dict[str, str]:
    """Log the frontier's JSON into ``run_id`` (a path named by its content); the version tags that point at it."""
    text = frontier.to_json()
    path = f"frontier/frontier-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    client.log_text(run_id, text, path)
    return {TAG_FRONTIER: path, TAG_FRONTIER_SUMMARY: frontier.summary()[:4000]}  # a SQL store's tag column: 5000


def version_tags(uri: str, tracking_uri: str | None = None) -> dict[str, str]:
    """The tags of a registered version (``models:/`` URIs); {} for a local directory or a ``runs:/`` URI."""
    if not str(uri).startswith("models:/"):
        return {}
    client, store = _client(tracking_uri)
    return dict(_version(client, store, uri, parse_model_uri(uri)).tags or {})


def load_frontier(uri: str, tracking_uri: str | None = None) -> Frontier | None:
    """The frontier stored with a registered version (``models:/`` URIs); None for a version registered without
    one, a local directory or a ``runs:/`` URI."""
    if not str(uri).startswith("models:/"):
        return None
    client, store = _client(tracking_uri)
    mv = _version(client, store, uri, parse_model_uri(uri))
    path = (mv.tags or {}).get(TAG_FRONTIER)
    if not path:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="budgetrl-frontier-") as tmp:
            return Frontier.from_dict(json.loads(Path(client.download_artifacts(mv.run_id, path, tmp)).read_text()))
    except Exception as exc:
        raise RegistryError(f"{uri!r}: cannot read its frontier {path} from run {mv.run_id}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Resolve


def default_cache_dir() -> Path:
    return Path(os.environ.get("BUDGETRL_MODEL_CACHE", Path.home() / ".cache" / "budgetrl" / "models"))


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", part)


def check_model_files(uri: str, tracking_uri: str | None = None, **checks) -> dict:
    """A registry model checked before Ray starts as a local directory is (``checkpoint_files.check_model_dir``:
    config.json, every shard its index names, EOS ids, tokenizer; ``checks``: think_end, chat_template) without
    downloading its weights: the artifact's files are listed, the small ones fetched. Returns its config.json."""
    import mlflow

    client, store = _client(tracking_uri)
    _, download_uri, _ = _lookup(client, store, uri, parse_model_uri(uri))
    with tempfile.TemporaryDirectory(prefix="budgetrl-check-") as tmp:
        try:
            names = [Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=download_uri,
                                                                              tracking_uri=store) if not f.is_dir]
            for name in names:
                if not name.endswith(".safetensors"):
                    mlflow.artifacts.download_artifacts(artifact_uri=f"{download_uri.rstrip('/')}/{name}",
                                                        dst_path=tmp, tracking_uri=store)
        except Exception as exc:
            raise RegistryError(f"{uri!r}: cannot list or read the files of {download_uri}: {exc}") from exc
        return _check_dir(Path(tmp), f"{uri!r}: the artifact at {download_uri}", shown=download_uri,
                          present=names, **checks)


def _lookup(client, store: str, uri: str, ref: ModelRef) -> tuple[str, str, str]:
    """(description, artifact URI to download, cache key) for a parsed reference."""
    if ref.kind == "run":
        try:
            run = client.get_run(ref.name)
        except Exception as e:
            raise _not_found(uri, store, e) from e
        download = f"runs:/{ref.name}/{ref.ref}"
        name, _, rest = ref.ref.partition("/")
        try:  # runs:/RUN/checkpoint of a run that logged its checkpoint as a logged model (MLflow resolves
            # that itself only through the process-global tracking URI)
            model = logged_model.find_checkpoint_model(client, ref.name, name, run.info.experiment_id)
        except Exception:  # noqa: BLE001 - a store without logged models: the run's own artifacts
            model = None
        if model is not None:
            download = f"{model.artifact_location.rstrip('/')}/{rest}".rstrip("/")
        return f"run {ref.name} artifact {ref.ref}", download, f"runs/{ref.name}/{_safe(ref.ref)}"
    mv = _version(client, store, uri, ref)
    download = client.get_model_version_download_uri(mv.name, mv.version)
    # The version's run id makes the cache key change if a name is deleted and re-registered.
    key = f"models/{_safe(mv.name)}/{mv.version}-{_safe(mv.run_id or 'norun')[:12]}"
    return f"registered model {mv.name} version {mv.version}", download, key


def _version(client, store: str, uri: str, ref: ModelRef):
    """The ``ModelVersion`` a ``models:/`` reference names (version, alias or latest)."""
    try:
        if ref.kind == "alias":
            mv = client.get_model_version_by_alias(ref.name, ref.ref)
        elif ref.kind == "latest":
            versions = client.search_model_versions(f"name = '{ref.name}'")
            if not versions:
                raise RegistryError(f"{uri!r}: registered model {ref.name!r} has no versions in {store}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(ref.name, ref.ref)
    except RegistryError:
        raise
    except Exception as e:
        raise _not_found(uri, store, e) from e
    return mv


def _not_found(uri: str, store: str, e: Exception) -> RegistryError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return RegistryError(f"{uri!r}: not found in the registry at {store}: {first}")


def resolve_model_uri(uri: str, tracking_uri: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """A local model directory for ``uri``: a local path as is, a registry URI downloaded (once).

    Downloads land in ``cache_dir`` (default ``$BUDGETRL_MODEL_CACHE`` or ``~/.cache/budgetrl/models``)
    under the model name and version; a finished download is reused, a half-finished one is not
    (files are downloaded into a temporary directory and renamed into place).
    """
    if not is_registry_uri(uri):
        path = Path(uri).expanduser()
        _check_dir(path, repr(uri))
        return str(path.resolve())
    import mlflow

    ref = parse_model_uri(uri)
    client, store = _client(tracking_uri)
    _, download_uri, key = _lookup(client, store, uri, ref)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / key
    if (target / _COMPLETE).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(tmp),
                                                         tracking_uri=store))
        _check_dir(local, f"{uri!r}: the artifact at {download_uri}", shown=download_uri)
        (local / _COMPLETE).write_text(uri + "\n")
        staged = target.parent / f".{target.name}-{uuid.uuid4().hex[:8]}"
        local.rename(staged)
        try:
            staged.rename(target)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(staged, ignore_errors=True)
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
