"""Budgeted serving: config validation, the MLflow registry round trip, the HF fallback in-process, and
the Ray Serve deployment (vLLM replica serving ``models:/tiny/1``) called with the official OpenAI client.
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from pathlib import Path

import pytest

from orchestrator.config import ConfigError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "serve.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, eval_summary):
    """One SQLite MLflow store for the module (creating one costs seconds), tiny registered as version 1 from a
    run whose eval logged two summaries (steps 2 and 4): the final one (conftest's EVAL_GRID) is its frontier."""
    import pyarrow.compute as pc

    from orchestrator import registry, tracking

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with tracking.Tracker.start(uri, "budgetrl", run_name="eval", tags={tracking.TAG_WORKLOAD: "eval"}) as run:
        earlier = eval_summary.set_column(eval_summary.column_names.index("accuracy"), "accuracy",
                                          pc.multiply(eval_summary["accuracy"], 0.5))
        run.log_table(earlier, "eval/step_0002_summary.parquet")
        run.log_table(eval_summary, "eval/step_0004_summary.parquet")
    assert registry.register_checkpoint(uri, tiny_model, "tiny", run.run_id, tags={"note": "first"}, alias="prod") == 1
    return uri, root


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("budget.thinking=-3", "budget.thinking=-3: must be > 0"),
    ("budget.thinking=200", "budget.thinking=200: the default is above budget.max_thinking=128"),
    ("budget.max_solution=200", "budget.max_solution=200 = 329 leaves no room for a prompt in model.max_model_len=256"),
    ("model.engine=trt", "model.engine='trt'"),
    ("model.dtype=int8", "model.dtype='int8'"),
    ("model.think_end=<nope>", "model.think_end='<nope>': is not a single token"),
    ("model.max_model_len=1024", "model.max_model_len=1024: larger than the checkpoint's context of 256 tokens"),
    ("http.port=0", "http.port=0: must be in 1..65535"),
    ("http.port=abc", "http.port"),
    ("http.route_prefix=llm", "http.route_prefix='llm'"),
    ("deployment.autoscaling.enabled=true", None),
    ("deployment.autoscaling.enabled=true deployment.autoscaling.max_replicas=0",
     "deployment.autoscaling.max_replicas=0"),
    ("sampling.top_p=0", "sampling.top_p=0.0: must be in (0, 1]"),
    ("sampling.max_n=64", "sampling.max_n=64: must be <= deployment.max_batch_size=32"),
    ("bogus.key=1", "bogus"),
])
def test_config_errors_name_key_and_value(tiny_model, override, message):
    from orchestrator.serve import load_serve_config

    if message is None:
        load_serve_config(CONFIG, override.split(), target=tiny_model)
        return
    with pytest.raises(ConfigError) as err:
        load_serve_config(CONFIG, override.split(), target=tiny_model)
    assert message in str(err.value)


def test_config_resolves_engine_settings_per_replica_device(tiny_model):
    """Serving shares the rollout engine's settings: `auto` follows deployment.gpus_per_replica."""
    from orchestrator.serve import load_serve_config

    from orchestrator.devices import cpu_bf16_flags

    m = load_serve_config(CONFIG, [], target=tiny_model).model
    cpu_dtype = "bfloat16" if cpu_bf16_flags() else "float32"  # a CPU with bf16 instructions serves in bf16
    assert (m.vllm.enforce_eager, m.vllm.gpu_memory_utilization, m.dtype) == (True, 0.5, cpu_dtype)
    m = load_serve_config(CONFIG, ["deployment.gpus_per_replica=1"], target=tiny_model).model
    assert (m.vllm.enforce_eager, m.vllm.gpu_memory_utilization, m.dtype) == (False, 0.85, "bfloat16")
    assert load_serve_config(CONFIG, ["deployment.gpus_per_replica=1", "model.dtype=float32"],
                             target=tiny_model).model.dtype == "float32"  # an explicit dtype stays
    with warnings.catch_warnings(record=True) as caught:  # explicit bf16 where the CPU would emulate it: warned
        warnings.simplefilter("always")
        load_serve_config(CONFIG, ["model.dtype=bfloat16"], target=tiny_model)
    assert any("~50x slower" in str(w.message) for w in caught) == (not cpu_bf16_flags())
    with pytest.raises(ConfigError, match="model.vllm.tensor_parallel_size=2: .*deployment.gpus_per_replica=1"):
        load_serve_config(CONFIG, ["deployment.gpus_per_replica=1", "model.vllm.tensor_parallel_size=2"],
                          target=tiny_model)


def test_config_target_checks(tmp_path, tiny_model, store):
    from orchestrator.serve import config_warnings, load_serve_config

    with pytest.raises(ConfigError, match="model.path=.*no such model directory"):
        load_serve_config(CONFIG, [], target=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="model.path='models:/x'.*models:/NAME/VERSION"):
        load_serve_config(CONFIG, [], target="models:/x")
    with pytest.raises(ConfigError, match="model.path='models:/absent/1'.*not found"):
        load_serve_config(CONFIG, [f"model.tracking_uri={store[0]}"], target="models:/absent/1")
    cfg = load_serve_config(CONFIG, [f"model.tracking_uri={store[0]}"], target="models:/tiny@prod")
    assert cfg.model.name == "models:/tiny@prod" and cfg.model.aliases == ["tiny"]
    # A version whose frontier cannot be read is refused before Ray starts.
    from mlflow import MlflowClient

    from orchestrator import registry

    v = registry.register_checkpoint(store[0], tiny_model, "lost", frontier=None)
    MlflowClient(store[0], registry_uri=store[0]).set_model_version_tag("lost", str(v), registry.TAG_FRONTIER,
                                                                        "frontier/gone.json")
    with pytest.raises(ConfigError, match=r"model.path='models:/lost/1'.*cannot read its frontier frontier/gone.json"):
        load_serve_config(CONFIG, [f"model.tracking_uri={store[0]}"], target="models:/lost/1")
    cfg = load_serve_config(CONFIG, ["http.host=0.0.0.0"], target=tiny_model)
    assert cfg.model.name == tiny_model and cfg.http.host == "0.0.0.0"
    assert "no authentication" in config_warnings(cfg)[0]
    assert config_warnings(load_serve_config(CONFIG, [], target=tiny_model)) == []


def test_registered_model_brings_its_training_prompt_hint(tiny_model, store):
    """A version registered from a run trained with budget.prompt_hint carries it (version tag); serving it
    renders that hint unless told otherwise, and a different hint is refused naming the trained one."""
    from orchestrator import registry, tracking
    from orchestrator.serve import load_serve_config

    hint = "[think {thinking}] "
    with tracking.Tracker.start(store[0], "budgetrl", run_name="hinted", params={"budget": {"prompt_hint": hint}}) as run:
        pass
    v = registry.register_checkpoint(store[0], tiny_model, "hinted", run.run_id, frontier=None)
    assert registry.version_tags(f"models:/hinted/{v}", store[0])[registry.TAG_PROMPT_HINT] == hint
    over = [f"model.tracking_uri={store[0]}"]
    assert load_serve_config(CONFIG, over, target=f"models:/hinted/{v}").budget.prompt_hint == hint
    assert load_serve_config(CONFIG, over, target="models:/tiny/1").budget.prompt_hint == ""  # trained without
    assert load_serve_config(CONFIG, over + ["budget.prompt_hint='<{thinking}>'"], target="models:/tiny/1"
                             ).budget.prompt_hint == "<{thinking}>"
    with pytest.raises(ConfigError, match=r"budget.prompt_hint='<\{thinking\}>'.*was trained with the hint"):
        load_serve_config(CONFIG, over + ["budget.prompt_hint='<{thinking}>'"], target=f"models:/hinted/{v}")


def test_context_length_comes_from_the_checkpoint(tmp_path, tiny_model, store):
    """Without --config the context is the checkpoint's (256 here, not the 4096 default) and the budget
    limits left unset fit it; an explicit value wins, up to what the checkpoint supports."""
    import json
    import shutil

    from orchestrator.serve import load_serve_config

    cfg = load_serve_config(None, [], target=tiny_model)
    b = cfg.budget
    assert cfg.model.max_model_len == 256
    assert (b.max_thinking, b.max_solution, b.thinking, b.solution) == (128, 64, 128, 64)  # 1/2, 1/4 of 256
    cfg = load_serve_config(None, ["model.max_model_len=200", "budget.max_solution=32"], target=tiny_model)
    b = cfg.budget
    assert cfg.model.max_model_len == 200 and (b.max_thinking, b.max_solution, b.thinking, b.solution) == (100, 32, 100, 32)
    with pytest.raises(ConfigError, match=r"^model.max_model_len=1024: .*checkpoint.*256"):
        load_serve_config(None, ["model.max_model_len=1024"], target=tiny_model)
    # A registry model's config.json is read from the store before Ray starts.
    cfg = load_serve_config(None, [f"model.tracking_uri={store[0]}"], target="models:/tiny/1")
    assert cfg.model.max_model_len == 256 and cfg.budget.max_thinking == 128
    # A checkpoint that names no context length needs an explicit one.
    bare = Path(shutil.copytree(tiny_model, tmp_path / "bare"))
    conf = json.loads((bare / "config.json").read_text())
    del conf["max_position_embeddings"]
    (bare / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"^model.max_model_len=None: .*no context length.*set it"):
        load_serve_config(None, [], target=str(bare))
    assert load_serve_config(None, ["model.max_model_len=512"], target=str(bare)).model.max_model_len == 512


def test_deployment_options_from_config(tiny_model):
    from orchestrator.serve import build_app, load_serve_config

    cfg = load_serve_config(CONFIG, ["deployment.autoscaling.enabled=true", "deployment.autoscaling.min_replicas=0",
                                     "deployment.autoscaling.max_replicas=3", "deployment.cpus_per_replica=2"],
                            target=tiny_model)
    d = build_app(cfg)._bound_deployment
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (0, 3, 16)
    assert d.ray_actor_options["num_cpus"] == 2
    assert d.ray_actor_options["runtime_env"]["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


# -------------------------------------------------------------------------------------------- registry


def test_register_and_resolve_round_trip(tmp_path, tiny_model, store, eval_summary):
    from orchestrator import registry, tracking

    store = store[0]
    cache = tmp_path / "cache"
    v2 = registry.register_checkpoint(store, tiny_model, "tiny")  # version 1 is the fixture's
    assert v2 >= 2

    from mlflow import MlflowClient

    mv = MlflowClient(store, registry_uri=store).get_model_version("tiny", "1")
    assert mv.tags[tracking.TAG_SOURCE_CHECKPOINT] == str(Path(tiny_model).resolve())
    # No run held these files: a registration run recorded them as its logged model "checkpoint".
    assert mv.tags["note"] == "first" and mv.tags[registry.TAG_MODEL_ID].startswith("m-")
    assert mv.source == MlflowClient(store).get_logged_model(mv.tags[registry.TAG_MODEL_ID]).artifact_location

    original = (Path(tiny_model) / "model.safetensors").read_bytes()
    for uri, version in (("models:/tiny/1", 1), ("models:/tiny@prod", 1), ("models:/tiny/latest", v2),
                         (f"runs:/{mv.run_id}/checkpoint", None)):
        local = Path(registry.resolve_model_uri(uri, store, cache))
        assert (local / "model.safetensors").read_bytes() == original, uri
        assert (local / "tokenizer.json").is_file()
        if version is not None:
            assert local.parent.name == "tiny" and local.name.startswith(f"{version}-")
    # A finished download is reused; a local directory passes through.
    assert registry.resolve_model_uri("models:/tiny/1", store, cache) == registry.resolve_model_uri(
        "models:/tiny@prod", store, cache)
    assert registry.resolve_model_uri(tiny_model) == str(Path(tiny_model).resolve())

    with pytest.raises(registry.RegistryError, match="not found"):
        registry.resolve_model_uri("models:/tiny/9", store, cache)

    # The frontier travels with version 1 (its run's final eval summary); version 2 had no eval run.
    from orchestrator.effort import Frontier

    frontier = registry.load_frontier("models:/tiny@prod", store)
    assert frontier.source == f"runs:/{mv.tags[tracking.TAG_SOURCE_RUN]}/eval/step_0004_summary.parquet"
    assert frontier.points == Frontier.from_summary(eval_summary).points
    assert mv.tags[registry.TAG_FRONTIER_SUMMARY] == frontier.summary()
    assert registry.load_frontier("models:/tiny/latest", store) is None
    assert registry.load_frontier(tiny_model, store) is None
    with pytest.raises(registry.RegistryError, match="no config.json"):
        registry.register_checkpoint(store, tmp_path, "tiny")


def test_register_points_at_the_training_runs_checkpoint(tmp_path, tiny_model, store, eval_summary):
    """A checkpoint the trainer logged is registered from that run (no copy), with its lineage."""
    import shutil

    from mlflow import MlflowClient

    from orchestrator import registry, tracking

    store = store[0]
    ckpt = str(shutil.copytree(tiny_model, tmp_path / "run" / "checkpoint"))  # a path no other run has
    tags = {tracking.TAG_CONFIG_HASH: "abc123def456", tracking.TAG_WORKLOAD: "train", registry.TAG_CHECKPOINT: ckpt}
    with tracking.Tracker.start(store, "budgetrl", run_name="train", tags=tags) as run:
        run.log_artifacts(ckpt, "checkpoint")
    version = registry.register_checkpoint(store, ckpt, "trained")  # run found by its checkpoint tag
    mv = MlflowClient(store, registry_uri=store).get_model_version("trained", str(version))
    assert mv.source == f"runs:/{run.run_id}/checkpoint" and mv.run_id == run.run_id
    assert mv.tags[tracking.TAG_SOURCE_RUN] == run.run_id
    assert mv.tags[tracking.TAG_CONFIG_HASH] == "abc123def456"
    assert mv.tags[tracking.TAG_SOURCE_CHECKPOINT] == ckpt
    assert registry.TAG_FRONTIER not in mv.tags  # a run without eval tables: no frontier
    with tracking.Tracker.start(store, "budgetrl", run_name="eval") as bad:  # an eval command's table, broken
        bad.log_table(eval_summary.drop_columns(["accuracy"]), "eval/eval_summary.parquet")
    with pytest.raises(registry.RegistryError, match=r"eval/eval_summary.parquet gives no frontier: .*'accuracy'"):
        registry.register_checkpoint(store, ckpt, "trained", bad.run_id)
    with pytest.raises(registry.RegistryError, match="frontier='yes'"):
        registry.register_checkpoint(store, ckpt, "trained", frontier="yes")


def test_checkpoints_are_logged_models_with_their_eval(tmp_path, tiny_model, store, eval_summary):
    """Final checkpoint: logged model "checkpoint" holding the files (the run keeps no copy), its eval attached,
    registered from it (nothing copied) and served back; periodic one: external model of its step, its eval too."""
    import json
    import shutil

    from mlflow import MlflowClient

    from orchestrator import logged_model, registry, tracking

    store = store[0]
    out = tmp_path / "out"
    ckpt, periodic = (str(shutil.copytree(tiny_model, out / n)) for n in ("checkpoint", "checkpoint-00002"))
    final_eval = {"eval/4x4/accuracy": 0.5, "eval/4x4/mean_tokens": 4.0}
    with tracking.Tracker.start(store, "budgetrl", run_name="train",
                                tags={tracking.TAG_CONFIG_HASH: "feedc0ffee12", tracking.TAG_WORKLOAD: "train"}) as run:
        buf = tracking.MetricBuffer()
        buf.add({"eval/4x4/accuracy": 0.25, "eval/4x4/mean_tokens": 3.0, "train/loss": 1.0}, 2)
        pid = logged_model.record_periodic(run, periodic, 2, buf)  # as the trainer: before the held eval is sent
        assert buf.flush(run)
        run.log_metrics(final_eval, 4)  # the final eval goes out first; the model reuses its timestamps
        run.log_table(eval_summary, "eval/step_0004_summary.parquet")
        mid = logged_model.record_final(run, ckpt, 4, final_eval)  # as the trainer's _finish
    client = MlflowClient(store, registry_uri=store)
    final, per = client.get_logged_model(mid), client.get_logged_model(pid)
    assert (final.name, final.source_run_id, final.status, final.model_type) == (
        "checkpoint", run.run_id, "READY", logged_model.MODEL_TYPE)
    assert {(m.key, m.value, m.step) for m in final.metrics} == {(k, v, 4) for k, v in final_eval.items()}
    assert final.tags[tracking.TAG_CONFIG_HASH] == "feedc0ffee12" and final.tags[logged_model.TAG_MODEL_STEP] == "4"
    assert (per.name, per.tags["mlflow.model.isExternal"], per.tags[tracking.TAG_CHECKPOINT]) == (
        "checkpoint-00002", "true", periodic)
    assert {(m.key, m.value, m.step) for m in per.metrics} == {("eval/4x4/accuracy", 0.25, 2),
                                                              ("eval/4x4/mean_tokens", 3.0, 2)}
    assert logged_model.checkpoint_model_artifacts(client, per) == {}  # its weights stayed on disk
    assert {(o.model_id, o.step) for o in client.get_run(run.run_id).outputs.model_outputs} == {(pid, 2), (mid, 4)}
    assert "checkpoint" not in {a.path for a in client.list_artifacts(run.run_id)}  # one upload: the model's
    history = client.get_metric_history(run.run_id, "eval/4x4/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.25), (4, 0.5)]  # no step twice

    version = registry.register_checkpoint(store, ckpt, "logged")  # found by the model's checkpoint tag
    mv = client.get_model_version("logged", str(version))
    assert (mv.source, mv.run_id, mv.tags[registry.TAG_MODEL_ID]) == (final.artifact_location, run.run_id, mid)
    assert mv.tags[tracking.TAG_CONFIG_HASH] == "feedc0ffee12"
    links = json.loads(client.get_logged_model(mid).tags["mlflow.modelVersions"])
    assert [(link["name"], str(link["version"])) for link in links] == [("logged", str(version))]
    assert registry.load_frontier(f"models:/logged/{version}", store).source.endswith("step_0004_summary.parquet")
    assert registry.check_model_files(f"models:/logged/{version}", store)["model_type"]
    original = (Path(tiny_model) / "model.safetensors").read_bytes()
    for uri in (f"models:/logged/{version}", f"runs:/{run.run_id}/checkpoint"):
        local = Path(registry.resolve_model_uri(uri, store, tmp_path / "cache"))
        assert (local / "model.safetensors").read_bytes() == original, uri

    # The periodic (external) one: uploaded by a registration run, lineage from the training run, no frontier
    # (no eval summary of step 2 in this run).
    v2 = registry.register_checkpoint(store, periodic, "logged")
    mv2 = client.get_model_version("logged", str(v2))
    assert mv2.run_id != run.run_id and mv2.tags[tracking.TAG_SOURCE_RUN] == run.run_id
    assert mv2.tags[registry.TAG_MODEL_ID] != pid and registry.TAG_FRONTIER not in mv2.tags


# ------------------------------------------------------------------------------- HF fallback, no Ray


def test_hf_engine_budgets_and_errors_in_process(tiny_model):
    from orchestrator.serve import APIError, BudgetedServer, load_serve_config

    cfg = load_serve_config(CONFIG, ["model.engine=hf"], target=tiny_model)
    server = BudgetedServer(cfg, cfg.model.path)
    r = server.handle("completion", {"model": tiny_model, "prompt": ["12+34", "5+6"], "n": 2,
                                     "thinking_budget": 5, "solution_budget": 4, "seed": 1})
    assert len(r["choices"]) == 4 and r["budget"] == {"thinking": 5, "solution": 4}
    for c in r["choices"]:
        assert c["thinking_tokens"] <= 5 and 1 <= c["solution_tokens"] <= 4
        # Truncated means exactly the budget, then a forced </think>.
        assert c["thinking_truncated"] == (c["thinking_tokens"] == 5 and c["forced_think_end"])
        assert cfg.model.think_end in c["text"]
    u = r["usage"]
    assert u["thinking_tokens"] == sum(c["thinking_tokens"] for c in r["choices"])
    assert u["completion_tokens"] == u["thinking_tokens"] + u["solution_tokens"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] == (1 + 5 + 1) + (1 + 3 + 1)  # <s> and <think> are one token, characters one each
    assert r["budget_source"] == "request"
    with pytest.raises(APIError) as err:
        server.handle("completion", {"prompt": "1+1", "thinking_budget": 129})
    assert err.value.param == "thinking_budget" and "budget.max_thinking" in err.value.message
    with pytest.raises(APIError) as err:
        server.handle("completion", {"prompt": "1+1", "thinking_token_budget": 129})
    assert err.value.param == "thinking_token_budget" and "budget.max_thinking" in err.value.message
    # A local directory has no measured frontier: effort and target answer 400 saying so.
    with pytest.raises(APIError) as err:
        server.handle("completion", {"prompt": "1+1", "reasoning_effort": "low"})
    assert (err.value.param, err.value.code) == ("reasoning_effort", "no_frontier")
    assert "has no measured frontier" in err.value.message


# ---------------------------------------------------------------------------------- Ray Serve + OpenAI


@pytest.fixture(scope="module")
def served(ray_session, store):
    """The deployment serving models:/tiny/1 from the SQLite registry, on a free loopback port."""
    from ray import serve

    from orchestrator.serve import deploy, load_serve_config

    uri, root = store
    cfg = load_serve_config(CONFIG, [f"http.port={_free_port()}", f"model.tracking_uri={uri}",
                                     f"model.cache_dir={root}/cache", "deployment.batch_wait_timeout_s=0.05"],
                            target="models:/tiny/1")
    url = deploy(cfg)
    yield cfg, url
    serve.shutdown()


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60)


def _stats(url: str) -> dict:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/stats", timeout=10).json()


def _check_usage(usage, choices):
    extra = usage.model_extra
    assert extra["thinking_tokens"] == sum(c.model_extra["thinking_tokens"] for c in choices)
    assert extra["solution_tokens"] == sum(c.model_extra["solution_tokens"] for c in choices)
    assert usage.completion_tokens == extra["thinking_tokens"] + extra["solution_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == extra["thinking_tokens"]


def test_completions_honour_budgets(client):
    r = client.completions.create(model="models:/tiny/1", prompt=["12+34", "5+6"], n=2, temperature=1.0,
                                  extra_body={"thinking_budget": 5, "solution_budget": 4})
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        e = c.model_extra
        assert 0 <= e["thinking_tokens"] <= 5 and 1 <= e["solution_tokens"] <= 4
        # A random model rarely closes its thinking: mostly exactly the budget, then a forced </think>
        # (fewer tokens only if it emitted </think>, or EOS, which is dropped and the marker forced).
        assert e["thinking_truncated"] == (e["thinking_tokens"] == 5 and e["forced_think_end"])
        assert "</think>" in c.text and c.finish_reason in ("stop", "length")
    _check_usage(r.usage, r.choices)
    assert r.usage.prompt_tokens == (1 + 5 + 1) + (1 + 3 + 1)

    # max_tokens caps thinking + solution: thinking cut to max_tokens - 1 first.
    r = client.completions.create(model="tiny", prompt="7+8", max_tokens=6,
                                  extra_body={"thinking_budget": 10, "solution_budget": 10})
    assert r.usage.completion_tokens <= 6 and r.model_extra["budget"] == {"thinking": 5, "solution": 1}


def test_chat_returns_reasoning_separately(client):
    r = client.chat.completions.create(model="models:/tiny/1", messages=[{"role": "user", "content": "12+34"}],
                                       extra_body={"thinking_budget": 6, "solution_budget": 3})
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert isinstance(c.message.model_extra["reasoning_content"], str)
    assert c.model_extra["thinking_tokens"] <= 6 and c.model_extra["solution_tokens"] <= 3
    _check_usage(r.usage, r.choices)
    # Defaults from the config: budget.thinking=16, budget.solution=8.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1+1"}])
    assert r.model_extra["budget"] == {"thinking": 16, "solution": 8}
    assert [m.id for m in client.models.list().data] == ["models:/tiny/1"]


def test_bad_requests_get_400_naming_the_field(client, served):
    import openai

    before = _stats(served[1])
    cases = [
        (dict(extra_body={"thinking_budget": -1}), "thinking_budget"),
        (dict(extra_body={"thinking_budget": 2.5}), "thinking_budget"),
        (dict(extra_body={"solution_budget": "8"}), "solution_budget"),
        (dict(extra_body={"thinking_budget": 129}), "thinking_budget"),  # budget.max_thinking=128
        (dict(extra_body={"solution_budget": 65}), "solution_budget"),
        (dict(prompt="9" * 300), "prompt"),  # over the 256-token context window
        (dict(model="gpt-4o"), "model"),
        (dict(n=9), "n"),
        (dict(temperature=-1), "temperature"),
    ]
    for kwargs, param in cases:
        args = {"model": "tiny", "prompt": "1+2", **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**args)
        assert err.value.status_code == 400
        body = err.value.response.json()["error"]
        assert body["param"] == param and param in body["message"], body
        assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[], extra_body={"thinking_budget": 3})
    assert err.value.response.json()["error"]["param"] == "messages"
    # The server keeps serving after the bad requests.
    r = client.completions.create(model="tiny", prompt="1+2", extra_body={"thinking_budget": 3, "solution_budget": 2})
    assert r.usage.model_extra["thinking_tokens"] <= 3
    after = _stats(served[1])
    assert after["client_errors"] - before["client_errors"] == len(cases) + 1
    assert after["server_errors"] == 0 and after["ok"] - before["ok"] == 1


def test_reasoning_effort_and_target_accuracy(client):
    """models:/tiny/1's frontier (conftest's EVAL_GRID; best accuracy 0.62 unconstrained) maps effort and target
    to budgets; the response names the budget and its source, and keeps the usage split."""
    import openai

    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "12+34"}],
                                       reasoning_effort="low")  # the official client's own parameter
    e = r.model_extra
    assert (e["budget"], e["budget_source"], e["frontier_point"]["label"]) == (
        {"thinking": 8, "solution": 4}, "effort", "8x4")
    assert "reasoning_effort=low" in e["budget_reason"] and r.choices[0].model_extra["thinking_tokens"] <= 8
    _check_usage(r.usage, r.choices)
    for extra, budget, source, label in (
            ({"reasoning_effort": "medium"}, (32, 16), "effort", "32x16"),
            ({"reasoning_effort": "high"}, (128, 64), "effort", "unconstrained"),  # the server's largest budget
            ({"target_accuracy": 0.5}, (16, 8), "target", "16x8"),
            ({"target_accuracy": 0.59}, (64, 32), "target", "64x32"),
            ({"thinking_token_budget": 6, "solution_budget": 3}, (6, 3), "request", None),
            ({}, (16, 8), "default", None)):
        r = client.completions.create(model="tiny", prompt="1+2", extra_body=extra)
        e = r.model_extra
        assert (e["budget"]["thinking"], e["budget"]["solution"], e["budget_source"]) == (*budget, source), extra
        assert (e.get("frontier_point") or {}).get("label") == label
        assert r.choices[0].model_extra["thinking_tokens"] <= budget[0]
        _check_usage(r.usage, r.choices)
    assert client.models.list().data[0].model_extra["efforts"] == {"low": "8x4", "medium": "32x16",
                                                                    "high": "unconstrained"}
    cases = [(dict(extra_body={"target_accuracy": 0.7}), "target_accuracy", "target_unreachable",
              "best accuracy available is 0.620"),
             (dict(reasoning_effort="high", extra_body={"target_accuracy": 0.5}), "reasoning_effort",
              "conflicting_fields", "target_accuracy"),
             (dict(reasoning_effort="low", extra_body={"thinking_budget": 4}), "thinking_budget",
              "conflicting_fields", "reasoning_effort"),
             (dict(extra_body={"thinking_budget": 4, "thinking_token_budget": 5}), "thinking_budget",
              "conflicting_fields", "thinking_token_budget"),
             (dict(reasoning_effort="minimal"), "reasoning_effort", "invalid_value", "low, medium, high")]
    for kwargs, param, code, named in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1+2"}], **kwargs)
        body = err.value.response.json()["error"]
        assert (body["param"], body["code"]) == (param, code) and param in body["message"], body
        assert named in body["message"], body


def test_concurrent_requests_are_batched(served):
    from openai import AsyncOpenAI

    before = _stats(served[1])

    async def run():
        async with AsyncOpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*[
                c.completions.create(model="tiny", prompt=f"{i}+{i}",
                                     extra_body={"thinking_budget": 4 + i % 3, "solution_budget": 3})
                for i in range(8)])

    results = asyncio.run(run())
    for i, r in enumerate(results):
        assert r.choices[0].model_extra["thinking_tokens"] <= 4 + i % 3
    after = _stats(served[1])
    batches = after["batches"] - before["batches"]
    assert after["ok"] - before["ok"] == 8 and batches < 8  # some requests shared an engine batch


def _replica_logs() -> str:
    """Every Serve replica log of this test session's Ray node (where a replica's logger writes)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("replica_*.log")))


def test_server_error_answers_a_request_id_and_logs_the_details(served, tmp_path, tiny_model):
    """A real engine failure: a checkpoint whose tokenizer has a token its embedding lacks, served (HF engine)
    as a second app beside ``served``; a prompt with that token fails in the forward pass (IndexError).
    The client gets a generic 500 naming a request id (also the x-request-id header), never the exception
    text; the replica's log holds the traceback under that id."""
    import shutil
    import time

    import httpx
    from ray import serve
    from transformers import AutoTokenizer

    from orchestrator.serve import deploy, load_serve_config

    broken = Path(shutil.copytree(tiny_model, tmp_path / "broken"))
    tok = AutoTokenizer.from_pretrained(broken)
    tok.add_tokens(["<oov>"])  # id 128 = the model's vocabulary size: out of range of its embedding
    tok.save_pretrained(broken)
    cfg = load_serve_config(CONFIG, [f"http.port={served[0].http.port}", "model.engine=hf", "deployment.name=broken",
                                     "http.route_prefix=/broken", "deployment.cpus_per_replica=0.5"],
                            target=str(broken))
    url = deploy(cfg)
    try:
        body = {"prompt": "1+<oov>", "thinking_budget": 3, "solution_budget": 2}
        r = httpx.post(f"{url}/completions", json=body, timeout=60)
        mine = httpx.post(f"{url}/completions", json=body, headers={"x-request-id": "client-id-7"}, timeout=60)
        ok = httpx.post(f"{url}/completions", json={**body, "prompt": "1+2"}, timeout=60)
        stats = httpx.get(url.removesuffix("/v1") + "/stats", timeout=10).json()
    finally:
        serve.delete("broken")
    assert r.status_code == 500 and mine.status_code == 500 and ok.status_code == 200  # the replica kept serving
    rid = r.headers["x-request-id"]
    err = r.json()["error"]
    assert rid and err["request_id"] == rid and rid in err["message"]
    assert (err["type"], err["code"], err["param"]) == ("server_error", "internal_error", None)
    assert "IndexError" not in r.text and "index out of range" not in r.text
    assert mine.json()["error"]["request_id"] == mine.headers["x-request-id"] == "client-id-7"
    assert (stats["server_errors"], stats["ok"]) == (2, 1)
    deadline = time.time() + 20
    while f"request {rid} failed" not in _replica_logs() and time.time() < deadline:
        time.sleep(0.5)
    log = _replica_logs()
    entry = log[log.index(f"request {rid} failed"):]
    assert "Traceback" in entry and "IndexError: index out of range" in entry
    assert "request client-id-7 failed" in log
