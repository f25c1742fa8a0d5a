"""Which of vLLM's two model runners an engine runs, and the budget-forcing processor written for it.

vLLM 0.32 picks per engine (``VllmConfig.use_v2_model_runner``, ``vllm/config/vllm.py``): Model Runner V2
(``vllm/v1/worker/gpu/``) unless ``VLLM_USE_V2_MODEL_RUNNER=0``, Triton has no backend (this CPU build:
"Model Runner V2 requires Triton; using the V1 model runner instead") or the config asks for a feature V2
lacks. Each runner loads only logits processors of its own interface and refuses the other's at engine
start, so the processor is chosen before ``LLM(...)`` by asking vLLM's own config the same question,
and checked against the runner the started engine reports.
"""

from __future__ import annotations

BUDGET_FORCING = {
    "v1": "orchestrator.rollout.budget_forcing:BudgetForcing",  # vllm.v1.sample.logits_processor
    "v2": "orchestrator.rollout.budget_forcing_v2:BudgetForcingV2",  # vllm.v1.worker.gpu.sample.logits_processor
}


def planned_model_runner(llm_kwargs: dict) -> str:
    """"v1" or "v2": the runner ``LLM(**llm_kwargs)`` will start, from the ``VllmConfig`` vLLM builds from
    the same engine arguments (``LLM`` builds it again; a second build costs milliseconds)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    args = {k: v for k, v in llm_kwargs.items() if k != "logits_processors"}
    config = EngineArgs(**args).create_engine_config(UsageContext.LLM_CLASS)
    return "v2" if getattr(config, "use_v2_model_runner", False) else "v1"  # no such property: no V2


def started_model_runner(llm) -> str:
    """"v1" or "v2": the runner a started ``vllm.LLM`` reports."""
    return "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
