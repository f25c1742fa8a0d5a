"""Budgeted two-phase generation on both engines, and in-place weight sync into vLLM."""

import math

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.config import Budget
from orchestrator.rollout.worker import SamplingSpec


def _prompts(n=8):
    rows = [{"prompt_id": f"p{i}", "task": "addition", "difficulty": 2, "domain": "arithmetic",
             "prompt": f"{10 + i}+{20 + i}=", "answer": str(30 + 2 * i), "reasoning": None} for i in range(n)]
    return pa.Table.from_pylist(rows)


def test_vllm_engine_takes_the_section_with_auto_resolved(tiny_model):
    """The engine takes ``rollout.vllm`` whole; an ``auto`` left unresolved fails before vLLM starts."""
    from orchestrator.config import VllmConfig
    from orchestrator.rollout.engine import STANDALONE_VLLM, VllmEngine

    with pytest.raises(ValueError, match="resolve them first"):
        VllmEngine(tiny_model, vllm=VllmConfig())
    assert (STANDALONE_VLLM.enforce_eager, STANDALONE_VLLM.gpu_memory_utilization) == (True, 0.5)


def _think_end(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tok.convert_tokens_to_ids("</think>"), tok.eos_token_id


def _check_budgets(table, tiny_model, t, s, forced_trained=True):
    think_end, eos = _think_end(tiny_model)
    rows = table.to_pylist()
    kinds = set()
    for r in rows:
        assert r["thinking_tokens"] <= t and r["solution_tokens"] <= s
        resp = r["response_token_ids"]
        n = r["thinking_tokens"]
        assert len(resp) == len(r["injected"]) == len(r["loss_mask"]) == len(r["response_logprobs"])
        if r["thinking_truncated"]:
            kinds.add("truncated")
            assert n == t
            assert resp[n] == think_end and r["injected"][n]  # the forced marker ends the thinking
            assert r["loss_mask"][n] == (1 if forced_trained else 0)
            assert r["response_logprobs"][n] is None
        elif r["injected"][n] if n < len(resp) else False:
            kinds.add("forced-after-eos")
        else:
            kinds.add("closed")
            assert resp[n - 1] == think_end and not any(r["injected"])
        assert r["injected"].count(True) <= 1
        assert "</think>" not in r["thinking"]
        assert r["finish_reason"] in ("stop", "length")
        if r["finish_reason"] == "stop":
            assert resp[-1] == eos
        lps = [x for x, inj in zip(r["response_logprobs"], r["injected"]) if not inj]
        assert all(x is not None and x <= 0 for x in lps)
    return kinds


@pytest.mark.parametrize("engine", ["vllm", "hf", "hf_bf16"])
def test_two_phase_budgets(engine, request, tiny_model):
    worker = request.getfixturevalue(f"{engine}_worker")
    t, s = 40, 6
    spec = SamplingSpec(group_size=8, budget=Budget(t, s), temperature=1.0, seed=1,
                        train_forced_think_end=False)
    if engine == "vllm":
        import ray

        table = ray.get(worker.generate.remote(_prompts(), spec, step=3))
    else:
        table = worker.generate(_prompts(), spec, step=3)
    assert table.num_rows == 64
    assert set(table["sample_index"].to_pylist()) == set(range(8))
    kinds = _check_budgets(table, tiny_model, t, s, forced_trained=False)
    # A random model at temperature 1 closes its thinking sometimes and runs out of budget other times.
    assert {"truncated", "closed"} <= kinds, kinds


def test_per_prompt_budgets_and_hint_vllm(vllm_worker, tiny_model):
    """A budget schedule's per-prompt budgets (columns of the prompt table) bind the prompt's whole group, a
    row without them takes the spec's budget, and each prompt is told its own budget (budget.prompt_hint)."""
    import ray
    from transformers import AutoTokenizer

    think = pa.array([4, 12, None, 4], pa.int32())
    prompts = _prompts(4).append_column("budget_thinking", think).append_column(
        "budget_solution", pa.array([2, 6, None, 3], pa.int32()))
    spec = SamplingSpec(group_size=6, budget=Budget(8, 5), temperature=1.0, seed=2, prompt_hint="[think {thinking}] ")
    table = ray.get(vllm_worker.generate.remote(prompts, spec, step=1))
    want = {"p0": (4, 2), "p1": (12, 6), "p2": (8, 5), "p3": (4, 3)}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    truncated = set()
    for r in table.to_pylist():
        t, s = want[r["prompt_id"]]
        assert (r["budget_thinking"], r["budget_solution"]) == (t, s)
        assert r["thinking_tokens"] <= t and r["solution_tokens"] <= s
        if r["thinking_truncated"]:
            assert r["thinking_tokens"] == t
            truncated.add(t)
        text = f"<s>[think {t}] {r['prompt']}<think>"
        assert r["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(truncated) >= 2, truncated  # a random model runs out of several of the budgets


def test_vllm_greedy_is_deterministic(vllm_worker):
    import ray

    spec = SamplingSpec(group_size=1, budget=Budget(12, 4), temperature=0.0)
    a = ray.get(vllm_worker.generate.remote(_prompts(4), spec))
    b = ray.get(vllm_worker.generate.remote(_prompts(4), spec))
    assert a["response_token_ids"].to_pylist() == b["response_token_ids"].to_pylist()


def test_weight_sync_matches_learner_logprobs(vllm_worker, tiny_model):
    """After a learner step and a sync, vLLM scores a fixed sequence as the learner does (tied embeddings)."""
    import ray
    from transformers import AutoConfig

    from orchestrator.learner.worker import Learner

    assert AutoConfig.from_pretrained(tiny_model).tie_word_embeddings
    learner = Learner(tiny_model, lr=5e-2, micro_batch_size=64, seed=0)
    spec = SamplingSpec(group_size=4, budget=Budget(10, 4), temperature=1.0, seed=5)
    recs = ray.get(vllm_worker.generate.remote(_prompts(4), spec))
    seq_prompt = recs["prompt_token_ids"].to_pylist()[:2]
    seq_resp = recs["response_token_ids"].to_pylist()[:2]
    before = ray.get(vllm_worker.prompt_logprobs.remote([p + r for p, r in zip(seq_prompt, seq_resp)]))

    adv = np.tile([1.0, -1.0, 0.5, -0.5], 4).astype(np.float32)
    batch = recs.select(["prompt_token_ids", "response_token_ids", "loss_mask"]).append_column(
        "advantage", pa.array(adv))
    learner.step(batch)
    weights = learner.sync_payload()  # what the trainer sends: NumPy views, lm_head included
    assert "lm_head.weight" in weights.arrays
    ray.get(vllm_worker.update_weights.remote(ray.put(weights), 1))
    assert ray.get(vllm_worker.stats.remote())["last_reload"] == "inplace"  # the CPU fast path, checked below
    try:
        after = ray.get(vllm_worker.prompt_logprobs.remote([p + r for p, r in zip(seq_prompt, seq_resp)]))
        expected = learner.sequence_logprobs(seq_prompt, seq_resp)
        for p, e, a, b in zip(seq_prompt, expected, after, before):
            got = a[len(p) - 1:]
            assert len(got) == len(e)
            assert max(abs(x - y) for x, y in zip(got, e)) < 1e-3
            # ...and the update really changed the engine's scores.
            assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3
    finally:
        base = Learner(tiny_model).get_weights()
        ray.get(vllm_worker.update_weights.remote(base, 0))
    restored = ray.get(vllm_worker.prompt_logprobs.remote([p + r for p, r in zip(seq_prompt, seq_resp)]))
    for a, b in zip(restored, before):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert not any(math.isnan(x) for row in restored for x in row)


def test_vllm_large_sampled_batch(vllm_worker, tiny_model):
    """A batch whose phase-2 prefill exceeds one scheduler step (>4k tokens) at temperature 1.

    vLLM-CPU crashed here with per-request seeds ("CPU Generator does not use offset")."""
    import ray

    spec = SamplingSpec(group_size=16, budget=Budget(40, 4), temperature=1.0, seed=3)
    table = ray.get(vllm_worker.generate.remote(_prompts(16), spec, step=1))
    assert table.num_rows == 256
    assert sum(len(p) + len(r) for p, r in zip(table["prompt_token_ids"].to_pylist(),
                                               table["response_token_ids"].to_pylist())) > 8192
    _check_budgets(table, tiny_model, 40, 4)


def test_budget_forcing_matches_two_calls(ray_session, vllm_worker):
    """One request per sample (the logits processor) gives exactly the two-call samples, greedy."""

    def _budget_forcing_vs_two_calls(worker) -> dict:
        """Inside the shared rollout actor, on its engine (built with the processor registered): greedy
        budgeted samples with the budget forced inside one request vs two generate calls, on budgets
        that make the thinking close, run out, and (with a frequent token standing in for EOS) end
        before closing, which takes the second-phase fallback."""
        from collections import Counter

        from orchestrator.rollout.budget import two_phase_generate

        engine, tok = worker.engine, worker.tokenizer
        think_end = tok.convert_tokens_to_ids("</think>")
        prompts = [tok(f"<s>{10 + i}+{20 + i}=<think>", add_special_tokens=False)["input_ids"] for i in range(16)]
        budgets = [Budget(4 + 9 * (i % 4), 3 + i % 5) for i in range(16)]
        switch = engine.budget_forcing
        try:
            free = two_phase_generate(engine, prompts, budgets, think_end_id=think_end, end_ids=engine.end_token_ids,
                                      temperature=0.0)
            # The most frequent generated token as "EOS": some samples stop on it while thinking.
            common = Counter(t for s in free for t in s.thinking_ids + s.solution_ids
                             if t != think_end).most_common(1)[0][0]
            result = {}
            for eos in (engine.eos_token_id, common):
                runs = []
                for forcing in (True, False):
                    engine.budget_forcing = forcing  # the processor stays registered; False takes two calls
                    runs.append(two_phase_generate(engine, prompts, budgets, think_end_id=think_end, end_ids=[eos],
                                                   temperature=0.0))
                result[eos == common] = runs
        finally:
            engine.budget_forcing = switch  # the actor is shared by the session
        return {"think_end": think_end, "budgets": budgets, "registered": engine._forcing_registered,
                "processors": list(engine.llm.llm_engine.vllm_config.model_config.logits_processors or []),
                "runs": {k: [[vars(s) for s in run] for run in v] for k, v in result.items()}}

    # A nested function, so Ray ships it by value (the test module is not importable in Ray's workers).
    out = ray_session.get(vllm_worker.__ray_call__.remote(_budget_forcing_vs_two_calls))
    assert out["registered"]
    # This CPU's vLLM has no Triton backend: Model Runner V1, so the V1-interface processor.
    assert ray_session.get(vllm_worker.stats.remote())["model_runner"] == "v1"
    assert out["processors"] == ["orchestrator.rollout.budget_forcing:BudgetForcing"]
    kinds = set()
    for forced, two_calls in out["runs"].values():
        for a, b, budget in zip(forced, two_calls, out["budgets"]):
            for k in ("thinking_ids", "solution_ids", "forced_think_end", "thinking_truncated", "finish_reason"):
                assert a[k] == b[k], (k, a, b)
            assert a["thinking_logprobs"] == pytest.approx(b["thinking_logprobs"], abs=1e-4)
            assert a["solution_logprobs"] == pytest.approx(b["solution_logprobs"], abs=1e-4)
            assert len(a["thinking_ids"]) <= budget.thinking and len(a["solution_ids"]) <= budget.solution
            assert out["think_end"] not in a["thinking_ids"][:-1]  # a sampled marker ends the thinking
            kinds.add("truncated" if a["thinking_truncated"] else "ended early" if a["forced_think_end"] else "closed")
            kinds.add(f"solution {a['finish_reason']}")
    assert {"truncated", "ended early", "solution length"} <= kinds, kinds


def test_inplace_load_refuses_an_update_it_does_not_fit(ray_session, vllm_worker):
    """An unknown name or a wrong shape: nothing changes and the caller falls back to reload_weights."""

    def probe(worker):  # runs inside the rollout actor; nested so Ray ships it by value
        import torch

        from orchestrator.rollout.cpu_reload import load_inplace

        def check(vllm_worker):
            model = vllm_worker.get_model()
            before = {k: v.detach().clone() for k, v in model.named_parameters()}
            norm = next(k for k in before if k.endswith("norm.weight"))
            bad = [{"model.nowhere.weight": torch.zeros(4)},
                   {norm: torch.zeros(before[norm].numel() + 1)},
                   {norm: torch.full_like(before[norm], 7.0), "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}]
            refused = [not load_inplace(model, w) for w in bad]
            unchanged = all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in before.items())
            return refused, unchanged

        return worker.engine.llm.collective_rpc(check)[0]

    refused, unchanged = ray_session.get(vllm_worker.__ray_call__.remote(probe))
    assert refused == [True, True, True] and unchanged


# ---- every end-of-generation id (generation_config.json's EOS list plus the tokenizer's) -----------------


def _frequent_token(engine, tok, think_end: int) -> int:
    """The token the model samples most often (not EOS or </think>; about 1% of a random model's tokens):
    as an extra EOS, it ends some thinking and some solutions."""
    from collections import Counter

    from orchestrator.rollout.engine import GenRequest

    prompts = [tok(f"<s>{10 + i}+{20 + i}=<think>", add_special_tokens=False)["input_ids"] for i in range(8)]
    outs = engine.generate([GenRequest(p, 64, seed=0) for p in prompts for _ in range(4)], 1.0, 1.0)
    counts = Counter(t for o in outs for t in o.token_ids if t not in (think_end, engine.eos_token_id))
    return counts.most_common(1)[0][0]


def _check_end_ids(table, think_end: int, ends: tuple[int, ...], t: int, s: int) -> set[str]:
    """No end id inside a response (only last, ending its solution with finish reason ``stop``); a
    thinking an end id cut short is closed by an injected marker and not counted truncated."""
    kinds = set()
    for r in table.to_pylist():
        resp, n = r["response_token_ids"], r["thinking_tokens"]
        assert not set(resp[:-1]) & set(ends), resp
        assert n <= t and r["solution_tokens"] <= s
        if resp[-1] in ends:
            assert r["finish_reason"] == "stop"
            kinds.add(f"solution ended on {'EOS' if resp[-1] == ends[0] else 'the extra id'}")
        if n < min(t, len(resp)) and r["injected"][n]:  # the thinking stopped on an end id, which was dropped
            assert resp[n] == think_end and not r["thinking_truncated"]
            kinds.add("thinking ended early")
    return kinds


def test_every_end_id_ends_a_sample_hf(hf_worker, tiny_model, tmp_path):
    """A checkpoint whose generation config lists two EOS ids: the HF engine stops on both, the worker's
    budget accounting drops the one that cut a thinking short and finishes on either."""
    import json
    import shutil

    from orchestrator.rollout.end_ids import end_token_ids
    from orchestrator.rollout.engine import GenRequest
    from orchestrator.rollout.worker import RolloutWorker

    think_end, eos = _think_end(tiny_model)
    other = _frequent_token(hf_worker.engine, hf_worker.tokenizer, think_end)
    path = tmp_path / "two-eos"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [other, eos]}))

    worker = RolloutWorker(str(path), engine="hf", prompt_template="<s>{prompt}<think>",
                           engine_kwargs=dict(dtype="float32"))
    assert worker.end_ids == worker.engine.end_token_ids == (eos, other)  # the tokenizer's first, each once
    prompt = hf_worker.tokenizer("<s>12+34=<think>", add_special_tokens=False)["input_ids"]
    free = hf_worker.engine.generate([GenRequest(prompt, 128, seed=2)], 1.0, 1.0)[0].token_ids
    out = worker.engine.generate([GenRequest(prompt, 128, seed=2)], 1.0, 1.0)[0]  # no stop ids of its own
    assert out.token_ids == free[:free.index(other) + 1] and out.finish_reason == "stop"
    t, s = 40, 24
    spec = SamplingSpec(group_size=4, budget=Budget(t, s), temperature=1.0, seed=1)
    kinds = _check_end_ids(worker.generate(_prompts(), spec), think_end, (eos, other), t, s)
    assert {"thinking ended early", "solution ended on the extra id"} <= kinds, kinds

    # Without generation_config.json, config.json's eos_token_id (as vLLM reads it).
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "config.json", bare / "config.json")
    assert end_token_ids(str(bare), None) == (eos,) and end_token_ids(str(bare), 7) == (7, eos)


def test_every_end_id_ends_a_sample_vllm(ray_session, vllm_worker, hf_worker, tiny_model):
    """The same on the shared vLLM worker, budget forced in one request and in two calls: its end ids are
    set to the tokenizer's EOS plus a frequent token (the model's own generation config lists one)."""

    def probe(worker, prompts, spec, other):  # runs inside the rollout actor; nested so Ray ships it by value
        from orchestrator.rollout.engine import GenRequest

        engine, saved, switch = worker.engine, worker.end_ids, worker.engine.budget_forcing
        stops = engine._params(GenRequest([1, 2], 4), 1.0, 1.0).stop_token_ids
        tables = []
        try:
            worker.end_ids = (saved[0], other)
            for forcing in (True, False):
                engine.budget_forcing = forcing
                tables.append(worker.generate(prompts, spec))
        finally:
            worker.end_ids, engine.budget_forcing = saved, switch
        return {"stops": stops, "engine_ends": engine.end_token_ids, "tables": tables}

    think_end, eos = _think_end(tiny_model)
    other = _frequent_token(hf_worker.engine, hf_worker.tokenizer, think_end)  # same weights, greedy
    t, s = 40, 24
    spec = SamplingSpec(group_size=8, budget=Budget(t, s), temperature=1.0, seed=1)
    out = ray_session.get(vllm_worker.__ray_call__.remote(probe, _prompts(), spec, other))
    assert out["engine_ends"] == (eos,) and eos in out["stops"]  # every request stops on the engine's end ids
    kinds = set()
    for table in out["tables"]:
        kinds |= _check_end_ids(table, think_end, (eos, other), t, s)
    assert {"thinking ended early", "solution ended on the extra id"} <= kinds, kinds


def test_standin_checkpoint_ends_on_both_eos_ids_vllm(ray_session, standin_model):
    """A vLLM rollout worker on the stand-in checkpoint (BPE, chat template, a generation config listing
    ``<|im_end|>`` and ``<|endoftext|>``, sharded, untied Llama): its end ids are both, read from the files;
    every request stops on both; whichever one ends a thinking or a solution, the sample is accounted the
    same (finish reason ``stop``, the id last and only there, thinking + marker + solution = response).
    The budget is forced in one request (test_every_end_id_ends_a_sample_vllm covers two calls). The random
    model almost never samples one of its 8k tokens, so each id is made frequent in turn with a logit bias
    (the stop logic never sees it)."""
    from transformers import AutoTokenizer

    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV
    from orchestrator.standin_model import END_THINK, ENDOFTEXT, IM_END

    def probe(worker, prompts, spec, bias):  # runs inside the rollout actor; nested so Ray ships it by value
        from orchestrator.rollout.engine import GenRequest

        engine, make = worker.engine, worker.engine._params
        out = {"worker_ends": worker.end_ids, "engine_ends": engine.end_token_ids,
               "stops": make(GenRequest([1, 2], 4), 1.0, 1.0).stop_token_ids, "tables": {}}
        for end in worker.end_ids:
            def biased(r, temperature, top_p, end=end):
                params = make(r, temperature, top_p)
                params.logit_bias = {end: bias}
                return params

            engine._params = biased
            out["tables"][end] = worker.generate(prompts, spec)  # the budget forced in one request
        return out

    tok = AutoTokenizer.from_pretrained(standin_model)
    im_end, endoftext, think_end = (tok.convert_tokens_to_ids(x) for x in (IM_END, ENDOFTEXT, END_THINK))
    env = dict(VLLM_CPU_ENV, VLLM_CPU_KVCACHE_SPACE="1")
    actor = ray_session.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        standin_model, engine="vllm", prompt_template="{prompt}", chat_template=True,
        engine_kwargs=dict(dtype="float32", max_model_len=256, seed=0))
    try:
        t, s = 16, 8
        spec = SamplingSpec(group_size=4, budget=Budget(t, s), temperature=1.0, seed=3)
        out = ray_session.get(actor.__ray_call__.remote(probe, _prompts(), spec, 8.0))
    finally:
        ray_session.kill(actor)
    assert out["worker_ends"] == out["engine_ends"] == (im_end, endoftext)  # the tokenizer's EOS first
    assert {im_end, endoftext} <= set(out["stops"])
    assert set(out["tables"]) == {im_end, endoftext}
    for end, table in out["tables"].items():
        kinds = _check_end_ids(table, think_end, (im_end, endoftext), t, s)
        which = "EOS" if end == im_end else "the extra id"
        assert {"thinking ended early", f"solution ended on {which}"} <= kinds, (end, kinds)
        for r in table.to_pylist():
            resp = r["response_token_ids"]
            assert len(resp) == r["thinking_tokens"] + r["injected"].count(True) + r["solution_tokens"], r
            assert r["finish_reason"] == ("stop" if resp[-1] == end else "length"), r
            assert tok.decode([end]) not in r["solution"]


# ---- the HF engine: sampled logprobs without the scores, strict weight loads ------------------------------


def test_hf_sampled_logprobs_are_the_models(hf_worker):
    """The logprob the HF engine records for each sampled token is the model's own (scored again without
    padding), at every step of left-padded rows, before temperature and top-p as vLLM's are."""
    from orchestrator.rollout.engine import GenRequest

    engine, tok = hf_worker.engine, hf_worker.tokenizer
    prompts = [tok(f"<s>{10 ** i}+{3 * i}=<think>", add_special_tokens=False)["input_ids"] for i in range(6)]
    assert len({len(p) for p in prompts}) > 3  # rows of different lengths: left padding
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        outs = engine.generate([GenRequest(p, 24, seed=11) for p in prompts], temperature, top_p)
        scored = engine.prompt_logprobs([p + o.token_ids for p, o in zip(prompts, outs)])
        for p, o, lp in zip(prompts, outs, scored):
            assert len(o.logprobs) == len(o.token_ids) > 0
            assert o.logprobs == pytest.approx(lp[len(p) - 1:], abs=1e-4)
        assert any(len(o.token_ids) > 12 for o in outs)


def test_vllm_bf16_budgets_and_weight_sync(ray_session, tiny_model):
    """vLLM in bf16 (model.dtype=auto's pick on CPUs with bf16 instructions, and on GPUs): the two-phase
    budgets hold, and after a bf16 learner step and an in-place sync of its bf16 payload the engine scores
    sequences as the learner does within 0.05 nats (the bound and why: the HF bf16 test below; measured 0.0068
    on an AVX-512 BF16/AMX Xeon, while the update moved the scores by 0.85-1.09 nats). One engine
    for both checks, started here: a second session-wide engine per xdist worker would cost every worker."""
    from orchestrator.learner.worker import Learner
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV

    env = dict(VLLM_CPU_ENV, VLLM_CPU_KVCACHE_SPACE="1")
    worker = ray_session.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        tiny_model, engine="vllm", prompt_template="<s>{prompt}<think>",
        engine_kwargs=dict(dtype="bfloat16", max_model_len=256, seed=0))
    try:
        t, s = 40, 6
        spec = SamplingSpec(group_size=8, budget=Budget(t, s), temperature=1.0, seed=1, train_forced_think_end=False)
        table = ray_session.get(worker.generate.remote(_prompts(), spec, step=3))
        assert table.num_rows == 64
        assert {"truncated", "closed"} <= _check_budgets(table, tiny_model, t, s, forced_trained=False)

        learner = Learner(tiny_model, lr=5e-2, micro_batch_size=64, seed=0, dtype="bfloat16")
        prompts, resps, seqs, before = _learner_step(
            lambda method, *args: ray_session.get(getattr(worker, method).remote(*args)), learner)
        payload = learner.sync_payload("bfloat16")
        assert set(payload.dtypes.values()) == {"bfloat16"} and "lm_head.weight" in payload.arrays
        ray_session.get(worker.update_weights.remote(ray_session.put(payload), 1))
        assert ray_session.get(worker.stats.remote())["last_reload"] == "inplace"
        after = ray_session.get(worker.prompt_logprobs.remote(seqs))
        for p, e, a, b in zip(prompts, learner.sequence_logprobs(prompts, resps), after, before):
            assert max(abs(x - y) for x, y in zip(a[len(p) - 1:], e)) < 0.05
            assert max(abs(x - y) for x, y in zip(a, b)) > 0.5  # the update changed the scores
    finally:
        ray_session.kill(worker)


def _learner_step(call, learner):
    """Sample 4 prompts x 4 on a rollout worker, score 3 of the sequences, and take one ``learner`` step on the
    samples: (prompts, responses, sequences, the engine's logprobs of them before any sync). ``call(method,
    *args)`` runs a worker method: in process (HF) or through Ray (vLLM)."""
    spec = SamplingSpec(group_size=4, budget=Budget(10, 4), temperature=1.0, seed=5)
    recs = call("generate", _prompts(4), spec)
    prompts, resps = recs["prompt_token_ids"].to_pylist()[:3], recs["response_token_ids"].to_pylist()[:3]
    seqs = [p + r for p, r in zip(prompts, resps)]
    before = call("prompt_logprobs", seqs)
    batch = recs.select(["prompt_token_ids", "response_token_ids", "loss_mask"]).append_column(
        "advantage", pa.array(np.tile([1.0, -1.0, 0.5, -0.5], 4).astype(np.float32)))
    learner.step(batch)
    return prompts, resps, seqs, before


def test_hf_weight_sync_is_strict_and_matches_learner_logprobs(hf_worker, tiny_model):
    """After a learner step and a sync, the HF engine scores sequences as the learner does; a missing or
    unexpected name, or a tied copy that disagrees, raises naming it and loads nothing; a tied lm_head
    may be left out (save_pretrained omits it)."""
    import torch

    from orchestrator.learner.worker import Learner

    learner = Learner(tiny_model, lr=5e-2, micro_batch_size=64, seed=0)
    base = learner.get_weights()
    prompts, resps, seqs, before = _learner_step(lambda method, *args: getattr(hf_worker, method)(*args), learner)
    engine = hf_worker.engine
    try:
        hf_worker.update_weights(learner.sync_payload(), 1)
        after = hf_worker.prompt_logprobs(seqs)
        for p, e, a, b in zip(prompts, learner.sequence_logprobs(prompts, resps), after, before):
            assert a[len(p) - 1:] == pytest.approx(e, abs=1e-4)
            assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3  # the update changed the scores

        state = learner.get_weights()
        bad = {"model.norm.weight": {k: v for k, v in state.items() if k != "model.norm.weight"},
               "model.nowhere.weight": {**state, "model.nowhere.weight": torch.zeros(3)},
               "lm_head.weight differs": {**state, "lm_head.weight": state["lm_head.weight"] + 1.0}}
        for name, weights in bad.items():
            with pytest.raises(ValueError, match=name):
                engine.load_weights({k: v * 0.5 if k == "model.embed_tokens.weight" else v for k, v in weights.items()})
        assert hf_worker.prompt_logprobs(seqs) == after  # nothing was loaded

        engine.load_weights({k: v for k, v in base.items() if k != "lm_head.weight"})
        restored = hf_worker.prompt_logprobs(seqs)
        assert all(a == pytest.approx(b, abs=1e-6) for a, b in zip(restored, before))
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    finally:
        hf_worker.update_weights(base, 0)


def test_hf_weight_sync_matches_bf16_learner_logprobs(hf_bf16_worker, tiny_model):
    """The same sync in bf16: a bf16 engine loaded with the bf16 payload of a learner that autocasts to bf16 over
    fp32 masters scores as the learner does, within 0.05 nats. Why 0.05: both sides' logits are bf16 (8
    significant bits), and at this model's logit sizes (up to ~10) one bf16 rounding step is 10 x 2^-8 = 0.04;
    the sides round at different places (autocast keeps norms and the softmax in fp32, the bf16 engine does
    not), so they may differ by about one step. Measured: 0.0076 (fp32: 5e-7). The update moves the scores by
    more than 1 nat, so the bound still tells a synced engine from a stale one."""
    from orchestrator.learner.worker import Learner

    worker = hf_bf16_worker
    learner = Learner(tiny_model, lr=5e-2, micro_batch_size=64, seed=0, dtype="bfloat16")
    base = learner.get_weights("bfloat16")
    prompts, resps, seqs, before = _learner_step(lambda method, *args: getattr(worker, method)(*args), learner)
    payload = learner.sync_payload("bfloat16")
    assert set(payload.dtypes.values()) == {"bfloat16"}
    try:
        worker.update_weights(payload, 1)
        after = worker.prompt_logprobs(seqs)
        for p, e, a, b in zip(prompts, learner.sequence_logprobs(prompts, resps), after, before):
            assert max(abs(x - y) for x, y in zip(a[len(p) - 1:], e)) < 0.05
            assert max(abs(x - y) for x, y in zip(a, b)) > 0.5  # the update changed the scores
    finally:
        worker.update_weights(base, 0)  # the shared bf16 worker back to the tiny model
