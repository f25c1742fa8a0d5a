"""Budget forcing against each vLLM model runner's logits-processor contract, with vLLM's own objects.

V1 (``vllm.v1.sample.logits_processor``): the processor is built by vLLM's V1 loader and fed vLLM's
``BatchUpdateBuilder`` updates (added, removed, moved rows) with live output lists, as V1's input batch does.
V2 (``vllm.v1.worker.gpu``): the processor is built by V2's loader over a real ``RequestState`` and
runs inside vLLM's real ``Sampler``; tokens are committed by vLLM's own ``post_update`` and request
writes flushed by its ``StagedWriteTensor``. Those two are Triton kernels and this CPU build has no Triton
backend, so they run under Triton's interpreter (the same kernel source, executed on the CPU), and the
request buffers use vLLM's CPU ``UvaBuffer`` as its CPU worker does (``vllm/v1/worker/cpu/shm.py``).

Both runners drive the same deterministic "model" (seeded logits per request and output index, greedy)
and must give the tokens of the rule written out in ``_expected``; ``rollout/budget.py`` then splits them.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from orchestrator.config import Budget
from orchestrator.rollout.budget import _split_forced
from orchestrator.rollout.vllm_runner import BUDGET_FORCING

VOCAB, THINK_END, EOS = 48, 5, 2


@pytest.fixture(autouse=True)
def _environment():
    """Building a ``VllmConfig`` sets process variables for vLLM's workers (``LD_PRELOAD`` among them, by
    vllm/platforms/cpu.py): put them back so later tests' subprocesses start as before."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _logits(rid: int, k: int, marker_at: int | None, eos_at: int | None) -> torch.Tensor:
    """The model's logits for request ``rid`` at output index ``k``: seeded noise, plus a sure
    end-of-thinking marker at ``marker_at`` and a sure EOS at ``eos_at``."""
    x = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 * rid + k))
    x[[THINK_END, EOS]] -= 10.0  # neither ends anything by chance
    if k == marker_at:
        x[THINK_END] = 20.0
    if k == eos_at:
        x[EOS] = 20.0
    return x


# (rid, t, s, marker_at, eos_at): thinking runs out / closes early / EOS while thinking / EOS in solution
CASES = [(0, 6, 3, None, None), (1, 6, 4, 2, None), (2, 8, 3, None, 4), (3, 5, 5, 1, 4), (4, 1, 1, None, None)]


def _expected(rid, t, s, marker_at, eos_at) -> tuple[list[int], list[int]]:
    """The budget rule, token by token: force the marker at thinking index t, EOS s tokens after it.
    Returns the output and the indices of its forced tokens."""
    out, forced, closed = [], [], -1
    while True:
        n = len(out)
        if (closed < 0 and n == t) or (closed >= 0 and n == closed + 1 + s):
            tok = THINK_END if closed < 0 else EOS
            forced.append(n)
        else:
            tok = int(_logits(rid, n, marker_at, eos_at).argmax())
        out.append(tok)
        if tok == THINK_END and closed < 0:
            closed = n
        if tok == EOS or len(out) == t + s + 2:
            return out, forced


def _params(t=None, s=None, temperature=0.0):
    from vllm import SamplingParams

    extra = None if t is None else {"budget_forcing": [THINK_END, t, EOS, s]}
    return SamplingParams(max_tokens=(t or 8) + (s or 8) + 2, temperature=temperature, extra_args=extra)


def _check_accounting(out: list[int], t: int, s: int, marker_at, eos_at) -> None:
    """``budget.py`` splits the forced output into the phases, within budget and exact."""
    smp = _split_forced(out, [0.0] * len(out), "stop", Budget(t, s), THINK_END, EOS)
    if eos_at is not None and eos_at < t and (marker_at is None or eos_at < marker_at):
        assert smp is None  # EOS before the marker: budget.py gives it a second phase
        return
    assert smp is not None
    assert len(smp.thinking_ids) <= t and len(smp.solution_ids) <= s
    assert smp.forced_think_end == (marker_at is None or marker_at >= t)
    if smp.forced_think_end:
        assert len(smp.thinking_ids) == t and THINK_END not in smp.thinking_ids
    else:
        assert smp.thinking_ids[-1] == THINK_END and len(smp.thinking_ids) == marker_at + 1
    solution_eos = eos_at is not None and eos_at > out.index(THINK_END)
    assert smp.finish_reason == ("stop" if solution_eos else "length")


def test_expected_rule_covers_every_path():
    outs = {c[0]: _expected(*c)[0] for c in CASES}
    assert outs[0][6] == THINK_END and outs[0][-1] == EOS and len(outs[0]) == 6 + 1 + 3 + 1
    assert outs[1].index(THINK_END) == 2 and len(outs[1]) == 3 + 4 + 1
    assert outs[2][-1] == EOS and len(outs[2]) == 5 and THINK_END not in outs[2]
    assert outs[3].index(THINK_END) == 1 and outs[3][4] == EOS and len(outs[3]) == 5
    assert outs[4][1] == THINK_END and outs[4][3] == EOS and len(outs[4]) == 4
    for case in CASES:
        _check_accounting(outs[case[0]], *case[1:])


# ------------------------------------------------------------------------------------------- the loaders


def test_each_runner_loads_only_its_own_processor():
    """The failure a GPU run hit: V2's loader refuses the V1 class at engine start (and V1's the V2 one)."""
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs

    from orchestrator.rollout.budget_forcing import BudgetForcing
    from orchestrator.rollout.budget_forcing_v2 import BudgetForcingV2

    assert _load_custom_logitsprocs([BUDGET_FORCING["v1"]]) == [BudgetForcing]
    assert _load_v2_logitsprocs([BUDGET_FORCING["v2"]]) == [BudgetForcingV2]
    with pytest.raises(ValueError, match="not a subclass of vllm.v1.worker.gpu.sample.logits_processor"):
        _load_v2_logitsprocs([BUDGET_FORCING["v1"]])
    with pytest.raises(ValueError, match="must be a subclass of LogitsProcessor"):
        _load_custom_logitsprocs([BUDGET_FORCING["v2"]])


def test_both_validators_refuse_a_bad_spec():
    """vLLM's frontend validators (one per runner) reject a malformed budget spec at admission."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    v2 = build_custom_logits_processors_params_validator([BUDGET_FORCING["v2"]])
    v1 = lambda p: validate_logits_processors_parameters([BUDGET_FORCING["v1"]], p)  # noqa: E731
    for validate in (v1, v2):
        validate(_params(4, 2))
        validate(SamplingParams(max_tokens=4))
        for bad in ([THINK_END, 0, EOS, 2], [THINK_END, 4, EOS], "4,2"):
            with pytest.raises(VLLMValidationError, match="budget_forcing"):
                validate(SamplingParams(max_tokens=8, extra_args={"budget_forcing": bad}))


def test_planned_runner_is_vllms_own_choice(tiny_model, monkeypatch):
    """The engine asks vLLM's own config which runner it will start: V1 on this CPU (no Triton backend),
    V2 once Triton has one (as on a CUDA GPU) unless ``VLLM_USE_V2_MODEL_RUNNER=0`` asks for V1."""
    import vllm.config.vllm as vllm_config

    from orchestrator.rollout.vllm_runner import planned_model_runner

    kwargs = dict(model=tiny_model, dtype="float32", max_model_len=256, enforce_eager=True,
                  distributed_executor_backend="uni", logits_processors=["not.loaded:AtAll"])
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert planned_model_runner(kwargs) == "v1"
    monkeypatch.setattr(vllm_config, "HAS_TRITON", True)  # what a GPU's Triton build reports
    assert planned_model_runner(kwargs) == "v2"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert planned_model_runner(kwargs) == "v1"


# ------------------------------------------------------------------------------------------------ V1


class V1Batch:
    """V1's persistent batch as ``gpu_input_batch.InputBatch`` keeps it for logits processors: added rows
    fill the lowest freed index, the batch is condensed by moving the last rows into holes."""

    def __init__(self):
        from vllm.config import VllmConfig
        from vllm.v1.sample.logits_processor import build_logitsprocs
        from vllm.v1.sample.logits_processor.state import BatchUpdateBuilder

        from orchestrator.rollout.budget_forcing import BudgetForcing

        procs = build_logitsprocs(VllmConfig(), torch.device("cpu"), False, False, [BUDGET_FORCING["v1"]])
        self.proc = next(p for p in procs.all if isinstance(p, BudgetForcing))
        self.builder = BatchUpdateBuilder()
        self.rows: list[int | None] = []  # request id per batch index
        self.outputs: dict[int, list[int]] = {}

    def add(self, rid: int, params, output: list[int] | None = None) -> None:
        self.outputs[rid] = list(output or [])
        index = self.builder.pop_removed()
        if index is None:
            index = len(self.rows)
            self.rows.append(rid)
        else:
            self.rows[index] = rid
        self.builder.added.append((index, params, [1, 3], self.outputs[rid]))

    def remove(self, rid: int) -> None:
        index = self.rows.index(rid)
        self.rows[index] = None
        self.builder.removed_append(index)

    def _condense(self) -> None:
        from vllm.v1.sample.logits_processor.interface import MoveDirectionality

        while None in self.rows:
            hole = self.rows.index(None)
            last = len(self.rows) - 1
            if hole != last:
                self.rows[hole] = self.rows[last]
                self.builder.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            self.rows.pop()

    def step(self, model) -> dict[int, int]:
        self._condense()
        self.proc.update_state(self.builder.get_and_reset(len(self.rows)))
        raw = torch.stack([model(rid, len(self.outputs[rid])) for rid in self.rows])
        sampled = self.proc.apply(raw.clone()).argmax(-1).tolist()
        for rid, tok in zip(self.rows, sampled):
            self.outputs[rid].append(tok)
        return dict(zip(self.rows, sampled))


# ------------------------------------------------------------------------------------------------ V2


def _interpreted(kernel):
    """A vLLM Triton kernel (left undecorated by vLLM's placeholder when Triton has no backend) under
    Triton's interpreter, ``tl`` bound to the real ``triton.language``."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    scope = dict(kernel.__globals__, tl=tl, triton=triton)
    return InterpretedFunction(types.FunctionType(kernel.__code__, scope, kernel.__name__, kernel.__defaults__,
                                                  kernel.__closure__))


@pytest.fixture
def v2_kernels(monkeypatch):
    import vllm.v1.worker.cpu.buffer_utils as cpu_buffers
    import vllm.v1.worker.gpu.buffer_utils as buffers
    import vllm.v1.worker.gpu.input_batch as input_batch

    monkeypatch.setattr(buffers, "UvaBuffer", cpu_buffers.UvaBuffer)  # as vllm/v1/worker/cpu/shm.py does
    monkeypatch.setattr(buffers, "_apply_write_kernel", _interpreted(buffers._apply_write_kernel))
    monkeypatch.setattr(input_batch, "_post_update_kernel", _interpreted(input_batch._post_update_kernel))


class V2Batch:
    """What ``vllm/v1/worker/gpu/model_runner.py`` does around the sampler each step: admit requests into
    ``RequestState`` slots and the ``Sampler``, flush staged writes, sample over rows in any order, commit
    the tokens with ``post_update``; a preempted request is removed and re-admitted with its output."""

    def __init__(self, max_num_reqs: int = 6, max_model_len: int = 64):
        from vllm.config import VllmConfig
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors
        from vllm.v1.worker.gpu.sample.sampler import Sampler
        from vllm.v1.worker.gpu.states import RequestState

        cpu, config = torch.device("cpu"), VllmConfig()
        self.req = RequestState(max_num_reqs, max_model_len, 256, 0, VOCAB, cpu)
        self.procs = build_custom_logits_processors(config, self.req, False, [BUDGET_FORCING["v2"]])
        self.sampler = Sampler(config, max_num_reqs, VOCAB, cpu, self.req, custom_logits_processors=self.procs)
        self.prompt = [1, 3, 7]
        self.outputs: dict[int, list[int]] = {}
        self.chunked: set[int] = set()  # requests whose next step is a prefill chunk (no token kept)
        self.rows: list[tuple[int, int, bool, bool]] = []  # (request, output index, one finite logit, unchanged)

    def add(self, rid: int, params, output: list[int] | None = None, chunked: bool = False) -> None:
        self.outputs[rid] = list(output or [])
        self.req.add_request(str(rid), len(self.prompt), self.prompt + self.outputs[rid], 0, params.max_tokens)
        self.sampler.add_request(self.req.req_id_to_index[str(rid)], params)
        self.req.apply_staged_writes()
        if chunked:
            self.chunked.add(rid)

    def remove(self, rid: int) -> None:
        self.req.remove_request(str(rid))

    def step(self, model, order: list[int]) -> dict[int, int]:
        from vllm.v1.worker.gpu.input_batch import post_update

        self.sampler.apply_staged_writes()
        slots = np.array([self.req.req_id_to_index[str(r)] for r in order], dtype=np.intp)
        idx = torch.from_numpy(slots).to(torch.int64)
        raw = torch.stack([model(rid, len(self.outputs[rid])) for rid in order])
        with torch.inference_mode():
            logits = self.sampler.apply_sampling_params(
                raw, idx, idx, slots, torch.zeros(len(order), dtype=torch.int64), torch.zeros_like(idx),
                torch.zeros(len(order), dtype=torch.int32), np.full(len(order), 64, dtype=np.int32),
                skip_top_k_top_p=True)
            sampled = logits.argmax(-1)
            kept = torch.tensor([0 if r in self.chunked else 1 for r in order], dtype=torch.int32)
            post_update(idx, self.req.num_computed_tokens.gpu, self.req.last_sampled_tokens,
                        self.sampler.penalties_state.output_bin_counts, sampled.view(-1, 1), kept,
                        torch.zeros_like(kept), None, self.req.all_token_ids.gpu, self.req.total_len.gpu)
        for i, rid in enumerate(order):
            finite = torch.isfinite(logits[i])
            one = int(finite.sum()) == 1 and float(logits[i, sampled[i]]) == 0.0
            self.rows.append((rid, len(self.outputs[rid]), one, torch.equal(raw[i], logits[i])))
        result = {}
        for rid, tok, keep in zip(order, sampled.tolist(), kept.tolist()):
            if keep:
                self.outputs[rid].append(tok)
                result[rid] = tok
        self.chunked -= set(order)
        return result


def _model(cases):
    table = {rid: (marker_at, eos_at) for rid, _, _, marker_at, eos_at in cases}
    return lambda rid, k: _logits(rid, k, *table.get(rid, (None, None)))


def _run(batch, cases, *, order=lambda ids, step: ids, extra_steps=None) -> dict[int, list[int]]:
    """Step ``batch`` until every request ended (EOS or max_tokens); a request that ends leaves the batch."""
    model, limits = _model(cases), {rid: t + s + 2 for rid, t, s, _, _ in cases}
    live = [rid for rid, *_ in cases if rid in batch.outputs]  # those admitted so far
    step = 0
    while live:
        kw = {} if isinstance(batch, V1Batch) else {"order": order(list(live), step)}
        for rid, tok in batch.step(model, **kw).items():
            if rid in limits and (tok == EOS or len(batch.outputs[rid]) == limits[rid]):
                live.remove(rid)
                batch.remove(rid)
        if extra_steps:
            live += extra_steps(batch, step)
        step += 1
    return {rid: batch.outputs[rid] for rid, *_ in cases}


def test_v1_processor_forces_the_budget():
    batch = V1Batch()
    for rid, t, s, *_ in CASES:
        batch.add(rid, _params(t, s))
    outs = _run(batch, CASES)
    for case in CASES:
        assert outs[case[0]] == _expected(*case)[0], case
        _check_accounting(outs[case[0]], *case[1:])


def test_v2_processor_forces_the_budget(v2_kernels):
    """Greedy requests (for which vLLM skips logits processing unless a processor claims them), rows
    reordered every step, a first step that is a prefill chunk, and a request without a budget. A forced
    row keeps one finite logit, so temperature, top-p or min-p after it still yield the forced token."""
    batch = V2Batch()
    for rid, t, s, *_ in CASES:
        batch.add(rid, _params(t, s), chunked=rid == 1)
    batch.add(9, _params())
    outs = _run(batch, CASES, order=lambda ids, step: [int(i) for i in np.random.default_rng(step).permutation(ids + [9])])
    for case in CASES:
        out, forced = _expected(*case)
        assert outs[case[0]] == out, case
        _check_accounting(out, *case[1:])
        rows = [(k, one, same) for rid, k, one, same in batch.rows if rid == case[0]]
        assert sorted(k for k, one, _ in rows if one) == forced
        assert all(same for k, one, same in rows if k not in forced)  # a free row keeps its logits
    assert {same for rid, _, _, same in batch.rows if rid == 9} == {True}


def test_v2_processor_resumes_and_recycles_slots(v2_kernels):
    """Requests preempted after their marker and while thinking are re-admitted with prompt + output
    (prefill_len > prompt_len) and keep counting from their output; a slot freed by a finished request
    serves a new one with fresh state."""
    cases = [(0, 3, 6, None, None), (1, 7, 3, 2, None), (2, 9, 2, None, None), (3, 4, 3, 1, None)]
    params = {rid: _params(t, s) for rid, t, s, *_ in cases}
    batch = V2Batch(max_num_reqs=3)
    for rid, *_ in cases[:3]:
        batch.add(rid, params[rid])
    seen = {}

    def preempt(b, step):
        if step == 4:  # 0 has its forced marker at 3 and one solution token; 2 is still thinking
            assert b.outputs[0][3] == THINK_END and THINK_END not in b.outputs[2]
            for rid in (0, 2):
                b.remove(rid)
                b.add(rid, params[rid], b.outputs[rid])
                seen[rid] = int(b.req.prefill_len.np[b.req.req_id_to_index[str(rid)]])
        if 3 not in b.outputs and len(b.req.free_indices) == 1:  # 1 finished: 3 takes its slot
            seen["freed"] = b.req.free_indices[0]
            b.add(3, params[3])
            seen["slot"] = b.req.req_id_to_index["3"]
            return [3]
        return []

    outs = _run(batch, cases, extra_steps=preempt)
    assert seen[0] == seen[2] == 3 + 5 and seen["slot"] == seen["freed"]
    for case in cases:
        assert outs[case[0]] == _expected(*case)[0], case
        _check_accounting(outs[case[0]], *case[1:])


# ----------------------------------------------------------------------------- scripts/gpu_check_vllm.py


def _gpu_check_vllm():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_vllm.py"
    spec = importlib.util.spec_from_file_location("gpu_check_vllm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_vllm_judges_forced_outputs():
    check = _gpu_check_vllm().forced_output_error
    t, s = 3, 2
    assert check([7, 7, 7, THINK_END, 8, 8, EOS], t, s, THINK_END, EOS) is None  # forced marker and EOS
    assert check([7, THINK_END, 8, EOS], t, s, THINK_END, EOS) is None  # closed early, EOS sampled
    assert check([7, EOS], t, s, THINK_END, EOS) is None  # EOS while thinking: a second phase follows
    assert "no 5 by index 3" in check([7, 7, 7, 7, THINK_END, EOS], t, s, THINK_END, EOS)
    assert "budget 2" in check([7, THINK_END, 8, 8, 8], t, s, THINK_END, EOS)
    assert "budget 2" in check([THINK_END, 8, 8, 8, EOS], t, s, THINK_END, EOS)


def test_gpu_check_vllm_runs_its_checks_on_the_shared_engine(ray_session, vllm_worker):
    """The script's checks, on the suite's vLLM engine (Model Runner V1 on this CPU): all PASS; the wrapper
    is valid bash. (Its V2 dry run, ``--interpret-triton``, starts an engine of its own: not in the suite.)"""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check_vllm.sh")]).returncode == 0
    path = str(root / "scripts" / "gpu_check_vllm.py")

    def checks(worker) -> tuple[bool, str]:  # runs inside the rollout actor; nested so Ray ships it by value
        import contextlib
        import importlib.util
        import io

        spec = importlib.util.spec_from_file_location("gpu_check_vllm", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ok = module.run_checks(worker.engine, worker.tokenizer, expect="v1", n=16, t=8, s=4)
        return ok, out.getvalue()

    ok, text = ray_session.get(vllm_worker.__ray_call__.remote(checks))
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in text.splitlines()}
    assert ok and status == {"engine": "PASS", "think-end": "PASS", "budget": "PASS", "two-calls": "PASS"}, text
    assert "BudgetForcing'" in text and "model runner v1" in text
