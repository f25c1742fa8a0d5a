"""Budget schedules (orchestrator/budget_schedule.py) and the budget hint (orchestrator/prompt_hint.py):
the draws (distribution, reproducible by seed, one per prompt, resumable), config errors naming the key,
the per-budget metrics, the hint in training, eval and serving prompts, and the example configs."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from orchestrator.budget_schedule import budget_metrics, build_schedule
from orchestrator.config import Budget, ConfigError, load_config, largest_train_budget
from orchestrator.prompt_hint import budget_hint, hint_messages

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_CONFIGS = sorted((ROOT / "configs" / "elastic" / "schedules").glob("*.yaml"))


def _budget_cfg(cfg_file, *overrides):
    return load_config(cfg_file, list(overrides)).budget


def _prompts(n: int, start: int = 0) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(start, start + n)], "prompt": ["1+1="] * n})


def _records(prompts: pa.Table, correct: bool, group: int = 2) -> pa.Table:
    """Scored records of ``group`` samples per prompt at the prompts' assigned budgets."""
    rows = [{**r, "correct": correct, "reward": float(correct), "thinking_tokens": 3, "solution_tokens": 1,
             "thinking_truncated": False} for r in prompts.to_pylist() for _ in range(group)]
    return pa.Table.from_pylist(rows)


def _assigned(schedule, prompts, step) -> dict[str, tuple[int, int]]:
    t = schedule.assign(prompts, step)
    return {p: (a, b) for p, a, b in zip(t["prompt_id"].to_pylist(), t["budget_thinking"].to_pylist(),
                                         t["budget_solution"].to_pylist())}


# ---------------------------------------------------------------------------------------------- draws


def test_fixed_is_the_budget_for_every_prompt(cfg_file):
    b = _budget_cfg(cfg_file)
    assert b.schedule.kind == "fixed"
    assert set(_assigned(build_schedule(b), _prompts(10), 3).values()) == {(16, 8)}


def test_mixture_draws_follow_the_weights_and_are_reproducible(cfg_file):
    b = _budget_cfg(cfg_file, "budget.schedule.kind=mixture", "budget.schedule.thinking.values=[8,16,32]",
                    "budget.schedule.thinking.weights=[1,1,2]")
    s = build_schedule(b, seed=3)
    drawn = Counter(t for step in range(1, 5) for t, _ in _assigned(s, _prompts(1000), step).values())
    total = sum(drawn.values())
    assert set(drawn) == {8, 16, 32}
    for value, share in ((8, 0.25), (16, 0.25), (32, 0.5)):
        assert abs(drawn[value] / total - share) < 0.03, drawn  # 4000 draws: 3 sigma is about 0.02
    prompts = _prompts(200)
    first = _assigned(s, prompts, 7)
    # the same seed, step and prompt give the same budget: in another order, from a new schedule (resume)
    assert _assigned(build_schedule(b, seed=3), prompts.take(np.arange(199, -1, -1)), 7) == first
    assert _assigned(build_schedule(b, seed=4), prompts, 7) != first  # another seed, other draws
    assert _assigned(s, prompts, 8) != first  # another step, other draws
    assert {sol for _, sol in first.values()} == {8}  # no solution draw: budget.solution


def test_mixture_range_is_inclusive_and_uniform(cfg_file):
    b = _budget_cfg(cfg_file, "budget.schedule.kind=mixture", "budget.schedule.solution.range=[4,6]")
    drawn = Counter(sol for t, sol in _assigned(build_schedule(b), _prompts(3000), 1).values())
    assert set(drawn) == {4, 5, 6} and min(drawn.values()) > 900, drawn
    assert largest_train_budget(b) == Budget(16, 6)


def test_stages_switch_after_their_steps(cfg_file):
    b = _budget_cfg(cfg_file, "budget.schedule.kind=stages",
                    "budget.schedule.stages=[{steps: 2, thinking: 16, solution: 16},{steps: 0, thinking: 32, solution: 4}]")
    s = build_schedule(b)
    got = [set(_assigned(s, _prompts(3), step).values()) for step in (1, 2, 3, 50)]
    assert got == [{(16, 16)}, {(16, 16)}, {(32, 4)}, {(32, 4)}]
    assert s.observe(_records(s.assign(_prompts(2), 3), True), 3) == {"thinking": 32.0, "solution": 4.0, "stage": 1.0}
    assert largest_train_budget(b) == Budget(32, 4)  # the longest: 36 tokens


def test_curriculum_tightens_once_the_window_reaches_the_threshold_and_resumes_exactly(cfg_file):
    b = _budget_cfg(cfg_file, "budget.schedule.kind=curriculum", "budget.schedule.ladder=[32x8,16x8,8x4]",
                    "budget.schedule.threshold=0.5", "budget.schedule.window=2")
    s = build_schedule(b)

    def step(n, correct):
        p = s.assign(_prompts(4), n)
        return set(zip(p["budget_thinking"].to_pylist(), p["budget_solution"].to_pylist())), \
            s.observe(_records(p, correct), n)

    assert step(1, False)[0] == {(32, 8)}
    assert step(2, True)[1]["window_accuracy"] == 0.5  # window full at 0.5: the next step moves on
    assert step(3, False)[0] == {(16, 8)}
    saved = s.state()
    resumed = build_schedule(b)
    resumed.restore(OmegaConf.to_container(OmegaConf.create(saved)))  # JSON-able: survives the state file
    assert resumed.state() == saved
    for n in (4, 5, 6):  # both decide alike from here
        budgets, metrics = step(n, True)
        p = resumed.assign(_prompts(4), n)
        assert set(zip(p["budget_thinking"].to_pylist(), p["budget_solution"].to_pylist())) == budgets
        assert resumed.observe(_records(p, True), n) == metrics
    assert budgets == {(8, 4)} and metrics["rung"] == 2.0  # the last rung stays
    assert largest_train_budget(b) == Budget(32, 8)


def test_curriculum_with_a_prefetched_step_moves_one_step_later(cfg_file):
    """Off-policy, step n+1's prompts are drawn before step n is observed: a change applies from n+2, so a
    resumed run (which draws step n+1 again after observing step n) draws the budgets the first run used."""
    b = _budget_cfg(cfg_file, "budget.schedule.kind=curriculum", "budget.schedule.ladder=[32x8,16x8]",
                    "budget.schedule.window=1")
    s = build_schedule(b, lag=1)
    s.observe(_records(s.assign(_prompts(2), 1), True), 1)
    assert [set(_assigned(s, _prompts(2), n).values()) for n in (2, 3)] == [{(32, 8)}, {(16, 8)}]


# ---------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, expected", [
    (["budget.schedule.kind=ladder"], "budget.schedule.kind='ladder'"),
    (["budget.schedule.kind=mixture", "budget.schedule.thinking.values=[8,16]", "budget.schedule.thinking.weights=[1]"],
     "budget.schedule.thinking.weights=[1.0]"),
    (["budget.schedule.kind=mixture", "budget.schedule.thinking.values=[8,16]", "budget.schedule.thinking.weights=[1,-1]"],
     "budget.schedule.thinking.weights"),
    (["budget.schedule.kind=mixture", "budget.schedule.thinking.values=[8,0]"], "budget.schedule.thinking.values[1]=0"),
    (["budget.schedule.kind=mixture", "budget.schedule.solution.range=[8,4]"], "budget.schedule.solution.range=[8, 4]"),
    (["budget.schedule.kind=mixture", "budget.schedule.thinking.values=[8]", "budget.schedule.thinking.range=[1,2]"],
     "budget.schedule.thinking.range"),
    (["budget.schedule.kind=stages"], "budget.schedule.stages=[]"),
    (["budget.schedule.kind=stages", "budget.schedule.stages=[{steps: 0, thinking: 8, solution: 4},{thinking: 4, solution: 4}]"],
     "budget.schedule.stages[0].steps=0"),
    (["budget.schedule.kind=curriculum", "budget.schedule.ladder=[16x8]"], "budget.schedule.ladder"),
    (["budget.schedule.kind=curriculum", "budget.schedule.ladder=[16x8,32x8]"], "32x8 after 16x8"),
    (["budget.schedule.kind=curriculum", "budget.schedule.ladder=[16x8,tight]"], "budget.schedule.ladder: 'tight'"),
    (["budget.schedule.kind=curriculum", "budget.schedule.ladder=[16x8,8x8]", "budget.schedule.threshold=0"],
     "budget.schedule.threshold=0"),
    (["budget.prompt_hint='<budget {tokens}>'"], "budget.prompt_hint='<budget {tokens}>'"),
    # the schedule's largest budget must fit the context (the config's max_model_len is 256)
    (["budget.schedule.kind=mixture", "budget.schedule.thinking.values=[16,300]"], "model.max_model_len=256"),
])
def test_bad_schedules_name_the_key(cfg_file, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, overrides)
    assert expected in str(info.value)


# ---------------------------------------------------------------------------------------------- metrics


def test_budget_metrics_per_budget():
    t = pa.table({"prompt_id": ["a", "a", "b", "b", "c", "c"], "budget_thinking": pa.array([8, 8, 8, 8, 16, 16], pa.int32()),
                  "budget_solution": pa.array([4] * 6, pa.int32()), "correct": [True, False, True, True, False, False],
                  "reward": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], "thinking_tokens": [2, 4, 6, 8, 16, 16],
                  "solution_tokens": [1] * 6, "thinking_truncated": [False, False, False, False, True, False]})
    m = budget_metrics(t)
    assert m["8x4/accuracy"] == 0.75 and m["8x4/prompts"] == 2 and m["8x4/samples"] == 4 and m["8x4/mean_tokens"] == 6
    assert m["16x4/accuracy"] == 0 and m["16x4/truncation_rate"] == 0.5 and m["16x4/prompts"] == 1


def test_plan_restates_the_largest_training_budget(cfg_file):
    from orchestrator.plan import _longest_train_budget

    for overrides in ([], ["budget.schedule.kind=mixture", "budget.schedule.thinking.range=[4,40]"],
                      ["budget.schedule.kind=curriculum", "budget.schedule.ladder=[64x8,16x4]"],
                      ["budget.schedule.kind=stages", "budget.schedule.stages=[{steps: 1, thinking: 8, solution: 30},"
                       "{steps: 0, thinking: 40, solution: 4}]"]):
        b = _budget_cfg(cfg_file, *overrides)
        assert _longest_train_budget(b) == largest_train_budget(b).total, overrides


# ------------------------------------------------------------------------------------------ budget hint


def test_hint_renders_each_budget_and_goes_before_the_prompt():
    from orchestrator.rollout.worker import render_prompt

    assert budget_hint("", Budget(16, 8)) == ""
    assert budget_hint("<b {thinking}+{solution}={total}> ", Budget(16, 8)) == "<b 16+8=24> "
    assert render_prompt("<s>{prompt}<think>", "1+1=", hint="[think 8] ") == "<s>[think 8] 1+1=<think>"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}]
    assert [m["content"] for m in hint_messages(msgs, "[8] ")] == ["s", "q1", "a", "[8] q2"]
    assert msgs[3]["content"] == "q2"  # the request's own messages are not changed


def test_schedules_name_every_budget_they_can_assign(cfg_file):
    assert build_schedule(_budget_cfg(cfg_file)).support() == ([16], [8])
    mixture = _budget_cfg(cfg_file, "budget.schedule.kind=mixture", "budget.schedule.thinking.values=[32,8,16]",
                          "budget.schedule.thinking.weights=[1,0,1]", "budget.schedule.solution.range=[4,6]")
    assert build_schedule(mixture).support() == ([16, 32], [4, 5, 6])  # a zero weight is never drawn
    stages = _budget_cfg(cfg_file, "budget.schedule.kind=stages",
                         "budget.schedule.stages=[{steps: 3, thinking: 16, solution: 16}, {thinking: 32, solution: 8}]")
    assert build_schedule(stages).support() == ([16, 32], [8, 16])
    ladder = _budget_cfg(cfg_file, "budget.schedule.kind=curriculum", "budget.schedule.ladder=[64x8,32x8,16x4]")
    assert build_schedule(ladder).support() == ([16, 32, 64], [4, 8])


def test_hinted_warm_start_tells_each_example_a_budget_its_reference_fits(cfg_file, tiny_model):
    """With budget.prompt_hint on, every SFT example's prompt carries a budget drawn from the schedule's values and
    the unconstrained one that its reasoning (and answer) fit in; without it, prompts are as before."""
    from transformers import AutoTokenizer

    from orchestrator.warmstart import _key, hint_budgets, sft_examples, told_budgets

    assert told_budgets([(5, 2), (20, 2), (99, 9)], [8, 16, 32], [4, 8], seed=0)[2] == Budget(32, 8)  # none fits
    drawn = told_budgets([(10, 3)] * 200, [8, 16, 32, 64], [4], seed=0)
    assert {b.thinking for b in drawn} == {16, 32, 64} and {b.solution for b in drawn} == {4}
    over = [f"model.path={tiny_model}", "warmstart.train_size=64", "budget.schedule.kind=mixture",
            "budget.schedule.thinking.values=[8,16,32]"]
    plain = load_config(cfg_file, over)
    hinted = load_config(cfg_file, over + ["budget.prompt_hint='[think {thinking}] '"])
    assert hint_budgets(hinted) == ([8, 16, 32, hinted.eval.max_thinking], [8, hinted.eval.max_solution])
    assert _key(hinted) != _key(plain) == _key(load_config(cfg_file, over[:2]))  # no hint: the key as before
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = sft_examples(hinted, tok)
    told = set()
    for (prompt, target), (plain_prompt, plain_target) in zip(examples, sft_examples(plain, tok)):
        assert target == plain_target and prompt.startswith("<s>[think ") and prompt.endswith(plain_prompt[3:])
        t = int(prompt.split("[think ")[1].split("]")[0])
        reasoning = target.split(hinted.model.think_end)[0]
        assert len(tok(reasoning, add_special_tokens=False)["input_ids"]) < t or t == max(hint_budgets(hinted)[0])
        told.add(t)
    assert len(told) >= 2, told


def test_serving_tells_the_requests_budget(tiny_model):
    from orchestrator.serve import BudgetedServer, load_serve_config

    cfg = load_serve_config(str(ROOT / "configs" / "serve.yaml"), ["model.engine=hf", "budget.prompt_hint='[think {thinking}] '"],
                            target=tiny_model)
    server = BudgetedServer(cfg, cfg.model.path)
    job = server.prepare("completion", {"prompt": "12+34", "thinking_budget": 5, "solution_budget": 4})
    assert job.prompt_ids[0] == server.tokenizer("<s>[think 5] 12+34<think>", add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="budget.prompt_hint"):
        load_serve_config(str(ROOT / "configs" / "serve.yaml"), ["budget.prompt_hint={x}"], target=tiny_model)


# --------------------------------------------------------------------------------------- example configs


@pytest.mark.parametrize("path", SCHEDULE_CONFIGS, ids=lambda p: p.stem)
def test_schedule_configs_are_the_quickstart_but_for_the_budget(path):
    quick = load_config(ROOT / "configs" / "quickstart.yaml", check_paths=False)
    cfg = load_config(path, check_paths=False)
    assert cfg.budget.schedule.kind != "fixed"
    assert replace(cfg, budget=quick.budget, trainer=replace(cfg.trainer, run_name=quick.trainer.run_name)) == quick
    assert cfg.trainer.run_name != quick.trainer.run_name  # its own outputs and MLflow run
