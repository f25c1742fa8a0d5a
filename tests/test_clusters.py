"""The manifests under clusters/: KubeRay kinds against their CRDs' OpenAPI schemas, the cluster-launcher
YAML against Ray's own schema, and every ``python -m orchestrator`` command line they contain.

The CRD schemas are made strict (unknown fields fail, as ``kubectl apply`` with server-side field
validation does), so a misspelled field or a wrong type fails here instead of on a cluster. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
# The CRDs ship in the project's shared checkout next to the repository, not in the repository itself.
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
EXPECTED = {"raycluster-gpu.yaml": "RayCluster", "rayjob-train.yaml": "RayJob",
            "raycronjob-sweep.yaml": "RayCronJob"}
LAUNCHER = CLUSTERS / "cluster-launcher-aws.yaml"
# Schema keywords that only document or default; JSON Schema validation ignores or misreads them.
_DROP = {"description", "default", "example", "externalDocs", "nullable", "format"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------
# Kubernetes structural schema -> strict JSON Schema


def k8s_to_jsonschema(node: dict) -> dict:
    """One OpenAPI v3 (Kubernetes structural) schema node as plain JSON Schema, recursively.

    - ``x-kubernetes-int-or-string``: an integer or a string (``pattern`` then applies to strings only);
    - ``x-kubernetes-preserve-unknown-fields``: fields beyond ``properties`` are allowed (with no type,
      anything is);
    - ``nullable``: null is allowed too;
    - an object that lists ``properties`` and neither preserves unknown fields nor declares
      ``additionalProperties`` gets ``additionalProperties: false``: an unknown field is an error.
    Other ``x-kubernetes-*`` extensions (list types, map types, CEL validations) are dropped.
    """
    out: dict = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = k8s_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [k8s_to_jsonschema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


# Kubernetes validates metadata itself (ObjectMeta); a CRD schema says only `type: object`. What a
# manifest author writes, checked strictly, so `metdata.lables` or a bad name fails too.
_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=_Loader)


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    """A validator for ``kind`` at ``api_version`` (``ray.io/v1``) from the CRD in ``CRD_DIR``."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}: they come with the project's shared/ "
                    "checkout (CI has it), not with a clone of the repository")
    if kind not in CRD_FILES:
        pytest.fail(f"no CRD known for kind {kind!r} (known: {sorted(CRD_FILES)})")
    crd = _load_yaml(CRD_DIR / CRD_FILES[kind])
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group, f"{kind}: group {group!r} is not {crd['spec']['group']!r}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind}: version {version!r} not in the CRD ({sorted(versions)})"
    assert versions[version].get("served", False), f"{kind}: version {version!r} is not served"
    schema = k8s_to_jsonschema(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc: dict) -> list[str]:
    """Every schema violation of one manifest, as ``path.to.field: message`` lines."""
    validator = crd_validator(doc.get("kind"), doc.get("apiVersion"))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------
# The manifests


def manifest_docs() -> list[tuple[str, int, dict]]:
    """(file name, document index, document) for every YAML document of a ray.io kind in clusters/."""
    out = []
    for path in sorted([*CLUSTERS.glob("*.yaml"), *CLUSTERS.glob("*.yml")]):
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=_Loader)):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
                out.append((path.name, i, doc))
    return out


DOCS = manifest_docs()
DOC_IDS = [f"{name}#{i}" for name, i, _ in DOCS]


def test_expected_manifests_present():
    kinds = {name: doc["kind"] for name, _, doc in DOCS}
    for name, kind in EXPECTED.items():
        assert kinds.get(name) == kind, f"clusters/{name} should hold a {kind}"
    assert LAUNCHER.is_file()


@pytest.mark.parametrize("name,index,doc", DOCS, ids=DOC_IDS)
def test_manifest_matches_crd(name, index, doc):
    errors = schema_errors(doc)
    assert not errors, f"clusters/{name} (document {index}) fails its CRD schema:\n" + "\n".join(errors)


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
    return [job["rayClusterSpec"]] if "rayClusterSpec" in job else []


@functools.cache
def _ray_start_options() -> set[str]:
    """The long option names `ray start` accepts (``dashboard-host``, ``num-cpus``, ...)."""
    with warnings.catch_warnings():  # the CLI module imports Ray Serve's config (pydantic warnings)
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import start

    return {opt[2:] for p in start.params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("name,index,doc", DOCS, ids=DOC_IDS)
def test_cluster_specs_are_safe_and_steerable(name, index, doc):
    """Token auth, no public Service, real `ray start` options, rollout and learner groups apart."""
    options = _ray_start_options()
    for spec in _cluster_specs(doc):
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode must be token"
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: reach the head by port-forward"
        assert not head.get("enableIngress"), f"{name}: no ingress without an authenticating proxy"
        groups = spec.get("workerGroupSpecs", [])
        for group in [head, *groups]:
            unknown = set(group.get("rayStartParams", {})) - options
            assert not unknown, f"{name}: rayStartParams {sorted(unknown)} are not `ray start` options"
        roles = {g.get("labels", {}).get("budgetrl.io/role"): g for g in groups}
        assert set(roles) == {"rollout", "learner"}, f"{name}: need one rollout and one learner group"
        for role, group in roles.items():
            containers = group["template"]["spec"]["containers"]
            gpus = containers[0]["resources"]["limits"]["nvidia.com/gpu"]
            assert group["resources"] == {f"{role}_gpu": str(gpus)}, f"{name}: {role}_gpu must equal its GPUs"
        for container in [c for g in [head, *groups] for c in g["template"]["spec"]["containers"]]:
            env = {e["name"] for e in container.get("env", [])}
            assert "MLFLOW_TRACKING_URI" in env, f"{name}: {container['name']} lacks MLFLOW_TRACKING_URI"


@pytest.mark.parametrize("name,index,doc", [d for d in DOCS if d[2]["kind"] in ("RayJob", "RayCronJob")],
                         ids=[i for i, d in zip(DOC_IDS, DOCS) if d[2]["kind"] in ("RayJob", "RayCronJob")])
def test_jobs_shut_down_and_keep_working_dir(name, index, doc):
    job = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    assert job.get("shutdownAfterJobFinishes") is True, f"{name}: the job's cluster must be deleted after it"
    assert job["entrypoint"].startswith("python -m orchestrator "), name
    runtime_env = yaml.safe_load(job.get("runtimeEnvYAML", "{}")) or {}
    assert set(runtime_env) <= {"env_vars"}, f"{name}: runtimeEnvYAML sets {set(runtime_env)}: env_vars only"
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), name
    if doc["kind"] == "RayCronJob":
        fields = doc["spec"]["schedule"].split()
        assert len(fields) == 5, doc["spec"]["schedule"]
        assert all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields), doc["spec"]["schedule"]


# ---------------------------------------------------------------------------------------------
# Negative tests: the strict schemas reject what kubectl would


def _raycluster() -> dict:
    return copy.deepcopy(next(doc for name, _, doc in DOCS if name == "raycluster-gpu.yaml"))


def test_misspelled_field_is_rejected():
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["serviceTyp"] = doc["spec"]["headGroupSpec"].pop("serviceType")
    errors = schema_errors(doc)
    assert any("spec.headGroupSpec" in e and "'serviceTyp' was unexpected" in e for e in errors), errors

    doc = _raycluster()  # deep inside the pod template
    container = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    errors = schema_errors(doc)
    assert any("containers.0" in e and "'imagePulPolicy' was unexpected" in e for e in errors), errors

    doc = _raycluster()
    doc["metadata"]["lables"] = doc["metadata"].pop("labels")
    assert any(e.startswith("metadata") and "lables" in e for e in schema_errors(doc))


def test_wrong_type_is_rejected():
    doc = _raycluster()
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    errors = schema_errors(doc)
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas") and "not of type 'integer'" in e
               for e in errors), errors

    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # a map of strings
    assert any("rayStartParams.num-cpus" in e for e in schema_errors(doc))

    doc = _raycluster()
    doc["spec"]["authOptions"]["mode"] = "tokens"  # enum
    assert any(e.startswith("spec.authOptions.mode") for e in schema_errors(doc))

    doc = _raycluster()
    doc["kind"] = "RayJob"
    doc["apiVersion"] = "ray.io/v1"
    assert schema_errors(doc)  # a RayCluster body is not a RayJob


def test_int_or_string_quantities():
    doc = _raycluster()
    limits = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for ok in (8, "8", "500m", "32Gi"):
        limits["cpu"] = ok
        assert not schema_errors(doc), ok
    for bad in ([8], "eight", 8.5):
        limits["cpu"] = bad
        assert any("resources.limits.cpu" in e for e in schema_errors(doc)), bad


def test_conversion_of_kubernetes_extensions():
    schema = k8s_to_jsonschema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "pattern": "^[a-z]+$"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"n": {"type": "integer"}}},
            "anything": {"x-kubernetes-preserve-unknown-fields": True},
            "maybe": {"type": "string", "nullable": True},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        },
    })
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"port": 80, "free": {"n": 1, "other": [1]}, "anything": [{"x": 1}], "maybe": None,
                       "tags": ["a"]})
    assert v.is_valid({"port": "http"})
    assert not v.is_valid({"port": "HTTP"}) and not v.is_valid({"port": 1.5})
    assert not v.is_valid({"free": {"n": "1"}})
    assert not v.is_valid({"typo": 1})
    assert not v.is_valid({"tags": [1]})


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def _ray_autoscaler_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def test_cluster_launcher_yaml():
    config = _load_yaml(LAUNCHER)
    # Ray's own schema for `ray up` files (unknown top-level and node-type keys fail).
    jsonschema.validate(config, _ray_autoscaler_schema())
    types = config["available_node_types"]
    assert set(types) == {"head", "rollout_gpu", "learner_gpu"}
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    for role in ("rollout", "learner"):
        node = types[f"{role}_gpu"]
        assert f"{role}_gpu" in node["resources"] and node["labels"] == {"budgetrl.io/role": role}
        assert node["max_workers"] <= config["max_workers"]
    assert any("pip install -e '.[gpu]'" in c for c in config["setup_commands"])
    options = _ray_start_options()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in [c for c in starts if "ray start" in c]:
        assert "RAY_AUTH_MODE=token" in command, command
        args = shlex.split(command.split("ray start", 1)[1])
        unknown = {a[2:].split("=")[0] for a in args if a.startswith("--")} - options
        assert not unknown, f"not `ray start` options: {sorted(unknown)}"
    head_start = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start


def test_pip_extras_exist():
    """Every `pip install -e '.[EXTRA,...]'` under clusters/ names extras pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    pip_extras = re.compile(r"pip install -e '\.\[([\w,]+)\]'")
    used = {e for f in CLUSTERS.iterdir() if f.is_file()
            for m in pip_extras.finditer(f.read_text()) for e in m.group(1).split(",")}
    assert used and used <= extras, f"extras {sorted(used - extras)} are not in pyproject.toml"


# ---------------------------------------------------------------------------------------------
# `python -m orchestrator ...` command lines


_CMD = re.compile(r"python -m orchestrator\s+([\w-]+)\s+(\S+\.ya?ml)([^\n;&|`'\"\\]*)")


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _commands() -> list[tuple[str, str, str, list[str], bool]]:
    """(where, command, config, overrides, complete) for each command line under clusters/.

    Entrypoints and setup commands in the parsed YAML are complete; lines in comments and the README
    may be cut by a line continuation, so only their config path is checked.
    """
    out = []
    for path in sorted(p for p in CLUSTERS.iterdir() if p.is_file()):
        seen = set()
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.load_all(path.read_text(), Loader=_Loader):
                for s in _strings(doc):
                    for m in _CMD.finditer(" ".join(s.split())):
                        out.append((path.name, m.group(1), m.group(2), m.group(3).split(), True))
                        seen.add((m.group(1), m.group(2)))
        for m in _CMD.finditer(path.read_text()):
            if (m.group(1), m.group(2)) not in seen:
                out.append((path.name, m.group(1), m.group(2), [], False))
                seen.add((m.group(1), m.group(2)))
    return out


COMMANDS = _commands()


def test_commands_found():
    assert {c[1] for c in COMMANDS} >= {"train", "sweep"}, COMMANDS


@pytest.mark.parametrize("where,command,config,overrides,complete", COMMANDS,
                         ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in COMMANDS])
def test_command_names_existing_config(where, command, config, overrides, complete):
    path = ROOT / config
    if not path.is_file() and config.startswith("configs/sweeps/"):
        pytest.skip(f"{config} (used in clusters/{where}) is not written yet: it comes with the sweep")
    assert not Path(config).is_absolute(), f"{where}: use a repo-relative config path, not {config}"
    assert path.is_file(), f"clusters/{where}: `{command}` names {config}, which does not exist in the repo"
    if complete and command in ("train", "eval", "show-config"):
        from orchestrator.config import load_config

        load_config(path, overrides)  # unknown keys, wrong types, impossible values raise ConfigError
    elif complete and command == "sweep":
        from orchestrator.sweep import load_sweep

        load_sweep(path, overrides)  # validates the sweep and its base config; creates nothing


# ---------------------------------------------------------------------------------------------
# GPU configs against the RayCluster's node groups: placement as the run asks for it


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([a-zA-Z]*)$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ("32", "500m", "256Gi") as a number."""
    m = _QUANTITY.match(str(value))
    assert m and m.group(2) in _UNITS, f"not a quantity: {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def pod_resources(group: dict) -> dict[str, float]:
    """What one pod of a group offers Ray as KubeRay starts it: CPUs, GPUs and memory from the first
    container's limits (``rayStartParams`` win), and the group's custom resources."""
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    out = {"CPU": quantity(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
           "memory": quantity(params.get("memory", limits.get("memory", 0)))}
    out.update({k: quantity(v) for k, v in (group.get("resources") or {}).items()})
    return out


def _fits(bundle: dict, pod: dict) -> bool:
    return all(v <= pod.get(k, 0) + 1e-9 for k, v in bundle.items())


def _packs(bundles: list[dict], pod: dict, pods: int) -> bool:
    """First-fit decreasing of ``bundles`` into ``pods`` pods of ``pod`` (exact for equal bundles)."""
    free = [dict(pod) for _ in range(pods)]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        slot = next((f for f in free if _fits(b, f)), None)
        if slot is None:
            return False
        for k, v in b.items():
            slot[k] -= v
    return True


def placement_problems(cfg, cluster: dict) -> list[str]:
    """Why the run's placement group does not fit the RayCluster's groups as declared: each rollout
    worker must fit one pod of the rollout group only, each learner rank one pod of the learner group
    only (never the head, never the other group), and all of a role's bundles must pack into that
    group's maxReplicas pods."""
    from orchestrator.runtime import placement_bundles

    spec = cluster["spec"]
    groups = {g["labels"]["budgetrl.io/role"]: g for g in spec["workerGroupSpecs"]}
    pods = {role: pod_resources(g) for role, g in groups.items()}
    pods["head"] = pod_resources(spec["headGroupSpec"])
    problems, by_role = [], {role: [] for role in groups}
    for name, bundle in placement_bundles(cfg):
        role = name.split()[0]
        where = sorted(r for r, pod in pods.items() if _fits(bundle, pod))
        if where != [role]:
            problems.append(f"{name} {bundle} fits {where or 'no group'}, not the {role} group alone")
        by_role[role].append(bundle)
    for role, bundles in by_role.items():
        n = groups[role].get("maxReplicas", groups[role].get("replicas", 1))
        if not _packs(bundles, pods[role], n):
            problems.append(f"{len(bundles)} {role} bundles do not fit {n} pod(s) of {pods[role]}")
    return problems


def _gpu_configs() -> list[tuple[str, object]]:
    """Every shipped GPU run: configs/gpu/*.yaml and the stages of workload configs built on them."""
    from orchestrator.config import load_config
    from workloads.elastic.recipe import _stage_configs, load

    out = [(f"gpu/{p.name}", load_config(p, check_paths=False))
           for p in sorted((ROOT / "configs" / "gpu").glob("*.yaml"))]
    elastic = ROOT / "configs" / "elastic" / "deepscaler-1.5b.yaml"
    out += [(f"elastic/{elastic.name}:{stage}", c)
            for stage, c in _stage_configs(load(str(elastic)), check_paths=False).items()]
    return out


GPU_CONFIGS = _gpu_configs()


def test_every_gpu_workload_config_is_checked():
    """A workload config whose base is a GPU config must be in GPU_CONFIGS (else its placement goes
    unchecked)."""
    checked = {name.split(":")[0] for name, _ in GPU_CONFIGS}
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        base = (_load_yaml(path) or {}).get("base", "") if path.parent.name != "gpu" else ""
        if isinstance(base, str) and base.startswith("configs/gpu/"):
            assert f"{path.parent.name}/{path.name}" in checked, f"{path} builds on {base}: add it to _gpu_configs"
    assert {"gpu/deepscaler-1.5b.yaml", "gpu/deepscaler-7b.yaml"} <= checked


@pytest.mark.parametrize("name,cfg", GPU_CONFIGS, ids=[n for n, _ in GPU_CONFIGS])
def test_gpu_config_fits_the_raycluster(name, cfg):
    cluster = _raycluster()
    problems = placement_problems(cfg, cluster)
    assert not problems, f"configs/{name} vs clusters/raycluster-gpu.yaml:\n" + "\n".join(problems)
    # what the actors read and write lives on the volume every pod mounts
    mounts = {m["name"]: m["mountPath"] for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
              for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
    for key, value in (("model.path", cfg.model.path), ("data.path", cfg.data.path),
                       ("data.eval_path", cfg.data.eval_path), ("trainer.output_dir", cfg.trainer.output_dir)):
        assert value is None or value.startswith(mounts["shared"] + "/"), f"configs/{name}: {key}={value} is not under " \
                                                                           f"{mounts['shared']}"
    # `auto` resolved for these GPUs
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.vllm.enforce_eager is False
    assert cfg.rollout.vllm.gpu_memory_utilization == 0.85


def test_placement_check_finds_misfits():
    """The checker fails what the manifests cannot hold: bundles that would land on either group, more
    GPUs than maxReplicas pods hold, a rank larger than any pod."""
    from orchestrator.config import load_config

    cluster, path = _raycluster(), ROOT / "configs" / "gpu" / "deepscaler-1.5b.yaml"

    def problems(*overrides, unsteered=False):
        cfg = load_config(path, list(overrides), check_paths=False)
        if unsteered:  # no custom resources (an override cannot remove a key)
            cfg.rollout.resources, cfg.learner.resources = {}, {}
        return placement_problems(cfg, cluster)

    assert problems() == []
    unsteered = problems(unsteered=True)
    assert any("learner rank 0" in p and "['learner', 'rollout']" in p for p in unsteered), unsteered
    assert any("rollout bundles do not fit 4 pod(s)" in p for p in problems("rollout.num_workers=33"))
    assert any("learner rank 0" in p and "no group" in p for p in problems("learner.cpus_per_worker=64"))
    assert any("rollout worker 0" in p and "no group" in p for p in problems("rollout.resources.rollout_gpu=9"))
    assert quantity("500m") == 0.5 and quantity("256Gi") == 256 * 2**30


def test_readme_dockerfile_has_what_triton_needs():
    """Triton compiles C launchers against Python.h when a kernel first runs: the image needs a C
    compiler and the Python headers (a CUDA runtime image has neither)."""
    text = (CLUSTERS / "README.md").read_text()
    blocks = re.findall(r"```dockerfile\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "clusters/README.md should hold one Dockerfile"
    lines = " ".join(line.strip().rstrip("\\") for line in blocks[0].splitlines() if not line.strip().startswith("#"))
    image = re.search(r"FROM\s+(\S+)", lines).group(1)
    installed = set(re.findall(r"[\w.+-]+", " ".join(re.findall(r"apt-get install ([^&]*)", lines))))
    assert "-devel" in image or installed & {"build-essential", "gcc", "clang"}, f"{image}: no C compiler"
    assert "python3-dev" in installed or re.search(r"python3\.\d+-dev", " ".join(installed)), "no Python headers"
    assert "pip install --no-cache-dir -e '.[gpu]'" in lines
