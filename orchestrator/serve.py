"""Budgeted serving on Ray Serve: OpenAI-compatible completions and chat with thinking/solution budgets.

``python -m orchestrator serve CHECKPOINT_OR_MODEL_URI [key=value ...]`` serves a Hugging Face
checkpoint directory, or a registry model (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
``runs:/RUN_ID/checkpoint``; see ``registry.py``), behind ``/v1/completions`` and
``/v1/chat/completions``. Every request may set ``thinking_budget`` and ``solution_budget``, or, for a
registry model with a measured frontier, ``reasoning_effort`` or ``target_accuracy`` (``effort.py``); the
replica runs the project's own two-phase generation (``rollout/budget.py``) on the project's engines
(vLLM, or HF ``generate``), batching concurrent requests (``@serve.batch``), and reports thinking and
solution tokens separately in ``usage``.

Layers: ``ServeConfig`` (``serve_config.py``: schema, validated before Ray starts) -> ``BudgetedServer``
(plain Python: request validation, batched generation, OpenAI-shaped responses; testable without Ray) ->
``BudgetedLLM`` (the Serve deployment: FastAPI ingress, dynamic batching, one engine thread) ->
``deploy`` / ``main`` (start Ray and Serve, bind ``http.host:http.port``, run the app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from . import registry
from .config import Budget, ConfigError
from .effort import BudgetChoice, BudgetRequestError, Frontier, choose, is_int, is_number
from .prompt_hint import budget_hint, hint_messages
from .runtime import init_ray
from .serve_config import (  # noqa: F401  (the config API is importable from here too)
    AutoscalingConfig,
    DeploymentConfig,
    HttpConfig,
    SamplingDefaults,
    ServeBudgetConfig,
    ServeConfig,
    ServeModelConfig,
    base_url,
    config_warnings,
    load_serve_config,
    validate_serve_config,
)

logger = logging.getLogger("ray.serve")

# ================================================================================================
# Requests -> budgeted generation -> OpenAI-shaped responses (plain Python, no Ray)


class APIError(Exception):
    """An error answered with the OpenAI error shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Serve's proxy gives every request this header (the client's own value, else a fresh id) and returns it on
# the response; a 500 names it so that a client's report finds the server log's traceback.
REQUEST_ID_HEADER = "x-request-id"


def internal_error(request_id: str) -> dict:
    """The body of a 500: a generic message and the request id, never the exception (it stays in the log)."""
    return {"error": {"message": f"internal server error (request id {request_id}); the server log has the details",
                      "type": "server_error", "param": None, "code": "internal_error", "request_id": request_id}}


# Request fields this server does not implement: a request that sets them gets a 400 rather than
# an answer that silently ignores them.
_UNSUPPORTED = ("stream", "stop", "logprobs", "top_logprobs", "echo", "suffix", "tools", "functions",
                "response_format", "logit_bias")


@dataclass
class Job:
    """One validated request: every sample (prompts x n) with its budgets and sampling settings."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list[list[int]]  # one per prompt
    n: int
    budget: Budget  # every sample's (the request's thinking_budget and solution_budget, capped)
    temperature: float
    top_p: float
    seed: int | None
    choice: BudgetChoice  # where the budget came from (request, effort, target, default) and why

    @property
    def size(self) -> int:
        return len(self.prompt_ids) * self.n

    def samples(self) -> list[tuple[list[int], int | None]]:
        """(prompt ids, seed) per sample, prompt-major (choice index = prompt index * n + j)."""
        out = []
        for i, ids in enumerate(self.prompt_ids):
            for j in range(self.n):
                k = i * self.n + j
                out.append((ids, None if self.seed is None else (self.seed + 2 * k) % (2**31 - 1)))
        return out


def _job_size(jobs: list[Job]) -> int:
    return sum(j.size for j in jobs)


class BudgetedServer:
    """Tokenizer + engine (through ``RolloutWorker``) + the request logic of both endpoints."""

    def __init__(self, cfg: ServeConfig, model_dir: str, frontier: Frontier | None = None):
        from .rollout.worker import RolloutWorker

        self.cfg, self.frontier = cfg, frontier  # the model's measured frontier (registry.load_frontier)
        m = cfg.model
        engine_kwargs: dict[str, Any] = dict(dtype=m.dtype, seed=m.seed)
        if m.engine == "vllm":
            engine_kwargs.update(max_model_len=m.max_model_len, vllm=m.vllm)  # the section whole, auto resolved
        self.worker = RolloutWorker(model_dir, engine=m.engine, prompt_template=m.prompt_template,
                                    chat_template=m.chat_template, think_end=m.think_end,
                                    engine_kwargs=engine_kwargs)
        self.tokenizer = self.worker.tokenizer
        self.model_dir = model_dir
        self.names = [m.name, *m.aliases]
        self.batches = 0
        self.batched_samples = 0

    # ------------------------------------------------------------------------------ validation

    def _int(self, body: dict, key: str, default: int | None, *, minimum: int, maximum: int | None = None,
             max_key: str | None = None) -> int | None:
        v = body.get(key)
        if v is None:
            return default
        if not is_int(v):
            raise APIError(f"{key} must be an integer, got {json.dumps(v)}", param=key, code="invalid_type")
        if v < minimum:
            raise APIError(f"{key} must be >= {minimum}, got {v}", param=key, code="invalid_value")
        if maximum is not None and v > maximum:
            raise APIError(f"{key}={v} is above this server's maximum of {maximum} ({max_key})", param=key,
                           code="budget_exceeded" if key.endswith("budget") else "invalid_value")
        return v

    def _number(self, body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = body.get(key)
        if v is None:
            return default
        if not is_number(v):
            raise APIError(f"{key} must be a number, got {json.dumps(v)}", param=key, code="invalid_type")
        if (v <= lo if lo_open else v < lo) or v > hi:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise APIError(f"{key} must be in {bound}, got {v}", param=key, code="invalid_value")
        return float(v)

    def _texts(self, kind: str, body: dict, kwargs: dict, hint: str = "") -> tuple[list[str], str]:
        """Model input texts (templates applied; ``kwargs`` go to the chat template; ``hint`` first) and their field."""
        if kind == "completion":
            p = body.get("prompt")
            if isinstance(p, str):
                prompts = [p]
            elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
                prompts = p
            elif isinstance(p, list) and p and all(is_int(x) or isinstance(x, list) for x in p):
                raise APIError("prompt: token-id prompts are not supported; send text", param="prompt",
                               code="invalid_type")
            else:
                raise APIError("prompt must be a string or a non-empty list of strings", param="prompt",
                               code="invalid_type" if p is not None else "missing")
            return [self._render(hint + x) for x in prompts], "prompt"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError("messages must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_type" if msgs is not None else "missing")
        clean = []
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise APIError(f"messages[{i}] must be an object with a string role", param=f"messages[{i}]",
                               code="invalid_type")
            content = msg.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise APIError(f"messages[{i}].content: only text parts are supported",
                                       param=f"messages[{i}].content", code="invalid_type")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string or a list of text parts",
                               param=f"messages[{i}].content", code="invalid_type")
            clean.append({"role": msg["role"], "content": content})
        clean = hint_messages(clean, hint)  # the budget told as in training (budget.prompt_hint)
        if self.cfg.model.chat_template:
            try:
                text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True, **kwargs)
            except Exception as exc:
                raise APIError(f"messages: the chat template rejected them: {exc}", param="messages",
                               code="invalid_value") from exc
            return [text], "messages"
        # No chat template: the message contents, joined by newlines, fill the prompt template.
        return [self._render("\n".join(c["content"] for c in clean))], "messages"

    def _template_kwargs(self, kind: str, body: dict) -> dict:
        """A chat request's ``chat_template_kwargs`` for the chat template (as vLLM's OpenAI server takes them)."""
        kwargs, param = body.get("chat_template_kwargs"), "chat_template_kwargs"
        if kwargs is None:
            return {}
        if kind != "chat" or not self.cfg.model.chat_template:
            raise APIError(f"{param}: chat only, with model.chat_template: true", param=param, code="unsupported")
        if not isinstance(kwargs, dict) or kwargs.get("enable_thinking", True) not in (True, False):
            raise APIError(f"{param} must be an object (enable_thinking: a bool)", param=param, code="invalid_type")
        return kwargs

    def _render(self, prompt: str) -> str:
        from .rollout.worker import render_prompt
        return render_prompt(self.cfg.model.prompt_template, prompt, self.tokenizer, self.cfg.model.chat_template)

    def prepare(self, kind: str, body: Any) -> Job:
        """Validate a request body and tokenize its prompts; raises ``APIError`` (HTTP 400)."""
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", code="invalid_type")
        cfg = self.cfg
        model = body.get("model")
        if model is None:
            model = self.names[0]
        if model not in self.names:
            raise APIError(f"model {json.dumps(model)} is not served here; this server serves "
                           f"{json.dumps(self.names[0])}", param="model", code="model_not_found")
        for key in _UNSUPPORTED:
            v = body.get(key)
            if v is not None and v is not False and v != [] and v != 0:
                raise APIError(f"{key} is not supported by this server", param=key, code="unsupported")
        budget, choice = self._budget(body)
        n = self._int(body, "n", 1, minimum=1, maximum=cfg.sampling.max_n, max_key="sampling.max_n")
        temperature = self._number(body, "temperature", cfg.sampling.temperature, 0.0, 2.0)
        top_p = self._number(body, "top_p", cfg.sampling.top_p, 0.0, 1.0, lo_open=True)
        seed = body.get("seed")
        if seed is not None and not is_int(seed):
            raise APIError(f"seed must be an integer, got {json.dumps(seed)}", param="seed", code="invalid_type")
        kwargs = self._template_kwargs(kind, body)
        texts, field_name = self._texts(kind, body, kwargs, budget_hint(cfg.budget.prompt_hint, budget))
        if kwargs.get("enable_thinking") is False:  # thinking off: the solution only (rollout/budget.py)
            budget = Budget(0, budget.solution)
        if len(texts) * n > cfg.deployment.max_batch_size:
            raise APIError(f"{len(texts)} prompt(s) x n={n} is {len(texts) * n} samples, above this server's "
                           f"maximum of {cfg.deployment.max_batch_size} per request (deployment.max_batch_size)",
                           param="n", code="invalid_value")
        ids = [self.tokenizer(x, add_special_tokens=False)["input_ids"] for x in texts]
        limit = cfg.model.max_model_len
        for i, p in enumerate(ids):
            where = field_name if len(ids) == 1 else f"{field_name}[{i}]"
            if not p:
                raise APIError(f"{where} is empty after the template", param=field_name, code="invalid_value")
            need = len(p) + budget.total + 1
            if need > limit:
                raise APIError(f"{where} is {len(p)} tokens; with thinking_budget={budget.thinking}, the </think> "
                               f"marker and solution_budget={budget.solution} it needs {need} tokens, over the "
                               f"context window of {limit} (model.max_model_len)", param=field_name,
                               code="context_length_exceeded")
        return Job(kind, model, ids, n, budget, temperature, top_p, seed, choice)

    def _budget(self, body: dict) -> tuple[Budget, BudgetChoice]:
        """The budget fields, reasoning_effort or target_accuracy (``effort.choose``; else the defaults), capped by
        max_tokens (thinking first)."""
        default, most = self.cfg.budget.default, self.cfg.budget.most
        asked = {k: self._int(body, k, None, minimum=1, maximum=m, max_key=f"budget.max_{k.split('_')[0]}")
                 for k, m in (("thinking_budget", most.thinking), ("thinking_token_budget", most.thinking),
                              ("solution_budget", most.solution))}
        try:
            choice = choose(asked, body.get("reasoning_effort"), body.get("target_accuracy"), self.frontier, most,
                            default, model=f"model {json.dumps(self.names[0])}")
        except BudgetRequestError as exc:
            raise APIError(str(exc), param=exc.param, code=exc.code) from None
        t, s = choice.budget.thinking, choice.budget.solution
        cap_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if (cap := self._int(body, cap_key, None, minimum=2)) is not None:
            t = min(t, cap - 1)
            s = min(s, cap - t)
        return Budget(t, s), choice

    # ------------------------------------------------------------------------------ generation

    def generate(self, jobs: list[Job]) -> list[list | Exception]:
        """Run many jobs as few engine batches as possible (one per temperature/top_p pair)."""
        from .rollout.budget import two_phase_generate

        results: list[list | Exception] = [[] for _ in jobs]
        groups: dict[tuple[float, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.temperature, job.top_p), []).append(i)
        w = self.worker
        for (temperature, top_p), idx in groups.items():
            prompts, budgets, seeds, owner = [], [], [], []
            for i in idx:
                for ids, seed in jobs[i].samples():
                    prompts.append(ids)
                    budgets.append(jobs[i].budget)
                    seeds.append(seed)
                    owner.append(i)
            try:
                samples = two_phase_generate(w.engine, prompts, budgets, think_end_id=w.think_end_id, end_ids=w.end_ids,
                                             temperature=temperature, top_p=top_p, seeds=seeds)
            except Exception as exc:  # only this group's requests fail
                # Each failed request logs the traceback under its request id (BudgetedLLM._answer).
                logger.error("generation failed for %d samples of %d requests: %s", len(prompts), len(idx),
                             type(exc).__name__)
                for i in idx:
                    results[i] = exc
                continue
            self.batches += 1
            self.batched_samples += len(prompts)
            for i, smp in zip(owner, samples):
                results[i].append(smp)  # type: ignore[union-attr]
        return results

    def respond(self, job: Job, samples: list) -> dict:
        """OpenAI-shaped response body for a job and its samples (prompt-major order)."""
        w, tok = self.worker, self.tokenizer
        choices, think_total, sol_total, forced_total = [], 0, 0, 0
        for k, smp in enumerate(samples):
            natural = bool(smp.thinking_ids) and smp.thinking_ids[-1] == w.think_end_id and not smp.forced_think_end
            think_ids = smp.thinking_ids[:-1] if natural else smp.thinking_ids
            ended = bool(smp.solution_ids) and smp.solution_ids[-1] in w.end_ids
            sol_ids = smp.solution_ids[:-1] if ended else smp.solution_ids
            thinking = tok.decode(think_ids, skip_special_tokens=False)
            solution = tok.decode(sol_ids, skip_special_tokens=True)
            nt, ns = len(smp.thinking_ids), len(smp.solution_ids)
            think_total += nt
            sol_total += ns
            forced_total += int(smp.forced_think_end)
            extra = {"thinking_tokens": nt, "solution_tokens": ns, "thinking_truncated": smp.thinking_truncated,
                     "forced_think_end": smp.forced_think_end}
            if job.kind == "completion":
                choices.append({"index": k, "text": thinking + self.cfg.model.think_end + solution, "logprobs": None,
                                "finish_reason": smp.finish_reason, **extra})
            else:
                choices.append({"index": k, "message": {"role": "assistant", "content": solution,
                                                        "reasoning_content": thinking},
                                "logprobs": None, "finish_reason": smp.finish_reason, **extra})
        prompt_tokens = sum(len(p) for p in job.prompt_ids)
        completion = think_total + sol_total
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion, "thinking_tokens": think_total,
                 "solution_tokens": sol_total, "forced_think_end_tokens": forced_total,
                 "completion_tokens_details": {"reasoning_tokens": think_total}}
        kind = "text_completion" if job.kind == "completion" else "chat.completion"
        prefix = "cmpl" if job.kind == "completion" else "chatcmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": job.model, "choices": choices, "usage": usage, **job.choice.response_fields(job.budget)}

    def handle(self, kind: str, body: Any) -> dict:
        """Validate, generate and respond in one call (no batching across requests)."""
        job = self.prepare(kind, body)
        result = self.generate([job])[0]
        if isinstance(result, Exception):
            raise result
        return self.respond(job, result)

    def models(self) -> dict:
        b, f = self.cfg.budget, self.frontier
        return {"object": "list", "data": [{
            "id": self.names[0], "object": "model", "created": 0, "owned_by": "budgetrl",
            "max_model_len": self.cfg.model.max_model_len,
            "budget": {"thinking": b.thinking, "solution": b.solution, "max_thinking": b.max_thinking,
                       "max_solution": b.max_solution}, "frontier": f and f.to_dict(), "efforts": f and f.efforts()}]}


# ================================================================================================
# The Ray Serve deployment

app = FastAPI(title="budgetrl", docs_url=None, redoc_url=None, openapi_url=None)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@serve.deployment
@serve.ingress(app)
class BudgetedLLM:
    """One replica: a model loaded on one engine thread, concurrent requests batched together."""

    def __init__(self, cfg: ServeConfig):
        model_dir = registry.resolve_model_uri(cfg.model.path, cfg.model.tracking_uri, cfg.model.cache_dir)
        # Every engine call (construction included) runs on this one thread: the engine is not
        # thread-safe, and the event loop stays free to accept and batch requests meanwhile.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        frontier = registry.load_frontier(cfg.model.path, cfg.model.tracking_uri)
        self.server = self._pool.submit(BudgetedServer, cfg, model_dir, frontier).result()
        self._generate_batch.set_max_batch_size(cfg.deployment.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.deployment.batch_wait_timeout_s)
        self.counts = {"requests": 0, "ok": 0, "client_errors": 0, "server_errors": 0}
        self.replica = uuid.uuid4().hex[:8]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_job_size)
    async def _generate_batch(self, jobs: list[Job]) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.server.generate, jobs)

    async def _answer(self, kind: str, request: Request) -> JSONResponse:
        self.counts["requests"] += 1
        try:
            try:
                body = await request.json()
            except Exception:
                raise APIError("the request body is not valid JSON", code="invalid_json") from None
            job = self.server.prepare(kind, body)
            result = await self._generate_batch(job)
            if isinstance(result, Exception):
                raise result
            response = self.server.respond(job, result)
        except APIError as exc:
            self.counts["client_errors" if exc.status < 500 else "server_errors"] += 1
            return _error(exc)
        except Exception:
            request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
            logger.exception("request %s failed (%s)", request_id, kind)
            self.counts["server_errors"] += 1
            return JSONResponse(internal_error(request_id), status_code=500)
        self.counts["ok"] += 1
        return JSONResponse(response)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        return await self._answer("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        return await self._answer("chat", request)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(self.server.models())

    @app.get("/stats")
    async def stats(self) -> JSONResponse:
        """This replica's counters (not OpenAI API): requests, ok, client/server errors, batches."""
        s = self.server
        return JSONResponse({"replica": self.replica, **self.counts, "batches": s.batches,
                             "batched_samples": s.batched_samples,
                             "mean_batch_samples": s.batched_samples / s.batches if s.batches else 0.0})


# ================================================================================================
# Starting it


class ServeStartError(RuntimeError):
    """Serve could not start the application as configured (e.g. Serve already runs on another port)."""


def replica_env(cfg: ServeConfig) -> dict[str, str]:
    from .runtime import VLLM_CPU_ENV

    env = dict(VLLM_CPU_ENV, VLLM_CPU_KVCACHE_SPACE=str(max(1, int(round(cfg.model.vllm.kv_cache_gib)))),
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    if cfg.model.vllm.multiprocess:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def build_app(cfg: ServeConfig):
    """The bound Serve application (replicas, autoscaling, resources from ``cfg.deployment``)."""
    d = cfg.deployment
    options: dict[str, Any] = dict(
        name="BudgetedLLM",
        max_ongoing_requests=d.max_ongoing_requests,
        ray_actor_options={"num_cpus": d.cpus_per_replica, "num_gpus": d.gpus_per_replica,
                           "runtime_env": {"env_vars": replica_env(cfg)}},
        max_constructor_retry_count=2,
    )
    if d.autoscaling.enabled:
        a = d.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests,
                                         "initial_replicas": max(1, a.min_replicas)}
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = d.num_replicas
    return BudgetedLLM.options(**options).bind(cfg)


def _init_ray(cfg: ServeConfig) -> bool:
    """Join ray.address / RAY_ADDRESS, else start a private local runtime; True if this process owns it."""
    import ray

    if ray.is_initialized():
        return False
    init_ray(cfg)  # the trainer's: retries a local start that misses Ray's 30 s start-up window
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def deploy(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on ``http.host:http.port`` (Ray must be up) and run the app; returns base_url.

    Blocks until the replicas are healthy (the model loaded)."""
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    try:
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config
        if (running.host, int(running.port)) != (cfg.http.host, cfg.http.port):
            raise ServeStartError(
                f"http.port={cfg.http.port}/http.host={cfg.http.host!r}: Serve already runs in this Ray cluster "
                f"on {running.host}:{running.port}; use those values or shut that Serve instance down")
    except ImportError:  # private API moved: skip the check
        pass
    serve.run(build_app(cfg), name=cfg.deployment.name, route_prefix=cfg.http.route_prefix)
    return base_url(cfg)


def main(target: str, overrides: list[str] | tuple[str, ...] = (), config_path: str | None = None, *,
         block: bool = True) -> int:
    """``python -m orchestrator serve TARGET [key=value ...] [--config FILE]``; 2 on a config error."""
    try:
        cfg = load_serve_config(config_path, overrides, target=target)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for line in config_warnings(cfg):
        print(f"warning: {line}", file=sys.stderr)
    import ray

    owns_ray = _init_ray(cfg)
    try:
        try:
            url = deploy(cfg)
        except ServeStartError as exc:
            print(f"serve: {exc}", file=sys.stderr)
            return 1
        print(f"serving {cfg.model.name!r} at {url} (OpenAI-compatible: /completions, /chat/completions, "
              f"/models); Ctrl-C stops", flush=True)
        if not block:
            return 0
        stop = threading.Event()
        try:
            import signal

            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        except ValueError:  # not the main thread
            pass
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if block or owns_ray:
            try:
                if owns_ray:
                    serve.shutdown()
                else:
                    serve.delete(cfg.deployment.name)
            except Exception:
                pass
            if owns_ray:
                ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's arguments (shared by ``orchestrator.cli`` and ``python -m orchestrator.serve``)."""
    p.add_argument("target", help="checkpoint directory, or models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. http.port=8001 budget.thinking=64")
    p.add_argument("--config", default=None, help="serving YAML (e.g. configs/serve.yaml); default: schema defaults")


def cli(argv: list[str] | None = None) -> int:
    """Parse ``TARGET [key=value ...] [--config FILE]`` (options anywhere) and run ``main``."""
    args = _parser().parse_intermixed_args(argv)
    return main(args.target, args.overrides, args.config)


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so Ray pickles the deployment by reference.
    from orchestrator import serve as _serve

    sys.exit(_serve.cli())
