"""Curricula: response prefixes are injected with loss weight 0; the difficulty-aware intervention.

Real engines (vLLM actor and HF in-process) for the prefix; a real two-stage recipe run (Ray, HF engine,
MLflow SQLite) for the trainer's curriculum hook and the shared generated-token budget.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from workloads.difficulty.curriculum import DifficultyConfig, DifficultyCurriculum, hint_steps

ROOT = Path(__file__).resolve().parents[1]


def _prompts(prefix):
    return pa.table({"prompt_id": ["a", "b"], "prompt": ["12+34=", "56+78="], "answer": ["46", "134"],
                     "task": ["addition"] * 2, "difficulty": pa.array([2, 2], pa.int32()), "domain": [None, None],
                     "reasoning": ["12+34: 2+4=6 1+3=4", "56+78: 6+8=14 5+7+1=13"],
                     "response_prefix": pa.array([prefix, None], pa.string())})


@pytest.mark.parametrize("engine", ["hf_worker", "vllm_worker"])
def test_response_prefix_is_injected_with_zero_loss_weight(engine, request, ray_session):
    from orchestrator.config import Budget
    from orchestrator.rollout.worker import SamplingSpec

    worker = request.getfixturevalue(engine)
    spec = SamplingSpec(group_size=3, budget=Budget(6, 4), temperature=1.0)
    gen = worker.generate if engine == "hf_worker" else (lambda *a: ray_session.get(worker.generate.remote(*a)))
    rows = gen(_prompts("12+34: 2+4=6 "), spec).to_pylist()
    tok_prefix = len("12+34: 2+4=6 ")  # the tiny tokenizer is character-level
    for r in rows[:3]:  # the prefixed prompt's samples
        inj, mask = r["injected"], r["loss_mask"]
        assert inj[:tok_prefix] == [True] * tok_prefix and mask[:tok_prefix] == [0] * tok_prefix
        assert r["thinking"].startswith("12+34: 2+4=6 ")
        assert r["thinking_tokens"] <= 6  # the prefix does not use the thinking budget
        assert sum(m for m, i in zip(mask, inj) if not i) == sum(1 for i in inj if not i)  # generated: trained
        assert len(r["response_logprobs"]) == len(r["response_token_ids"]) == len(mask)
    for r in rows[3:]:  # the other prompt has none
        assert not any(r["injected"][:-1]) or r["thinking_truncated"]


def test_hint_shrinks_as_pass_rate_rises_and_solved_prompts_drop():
    cfg = DifficultyConfig(hint_below=0.5, max_hint_fraction=0.5, min_observations=2)
    steps = [hint_steps(r, 10, cfg) for r in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9)]
    assert steps == sorted(steps, reverse=True) and steps[0] == 5 and steps[-2:] == [0, 0]
    cur = DifficultyCurriculum(cfg)
    records = pa.table({"prompt_id": ["a", "a", "b", "b"], "correct": [True, True, False, False]})
    cur.observe(records, 1)
    sel = cur.select(_prompts(None), 2).to_pylist()
    assert [r["prompt_id"] for r in sel] == ["b"]  # a: always solved -> dropped
    assert sel[0]["response_prefix"] == "56+78: 6+8=14 "  # b: never solved -> half of its 3 steps, rounded up
    m = cur.observe(pa.table({"prompt_id": ["b"], "correct": [True]}), 2)
    assert m["dropped_share"] == 0.5 and m["intervened_share"] == 1.0
    again = DifficultyCurriculum(cfg)
    again.restore(cur.state())
    assert again.rates == cur.rates and again.rates["b"][0] == pytest.approx(0.5)


def test_unseen_prompts_take_their_levels_rate_as_a_prior():
    """A prompt never drawn before gets a hint from its difficulty level's pass rate, is never dropped on
    it, and its own samples replace the prior; prior: none leaves it alone."""
    cfg = DifficultyConfig(hint_below=0.5, max_hint_fraction=0.5, min_observations=1)
    seen = pa.table({"prompt_id": ["x", "x", "y", "y"], "correct": [False, False, False, True],
                     "difficulty": pa.array([2, 2, 2, 2], pa.int32())})
    cur = DifficultyCurriculum(cfg)
    cur.observe(seen, 1)  # level 2: 1 of 4 right
    assert cur.levels["2"] == [0.25, 4.0] and "a" not in cur.rates
    sel = cur.select(_prompts(None), 2).to_pylist()
    assert [r["prompt_id"] for r in sel] == ["a", "b"]  # rate 0.25 < hint_below: hinted, not dropped
    assert sel[0]["response_prefix"] == "12+34: " and sel[1]["response_prefix"] == "56+78: "
    m = cur.observe(pa.table({"prompt_id": ["a", "a"], "correct": [True, True],
                              "difficulty": pa.array([2, 2], pa.int32())}), 2)
    assert m["prior_intervened_share"] == 1.0 and m["intervened_share"] == 1.0
    assert cur.levels["2"][0] == pytest.approx(0.625)  # 0.5 * 0.25 + 0.5 * 1.0
    sel = cur.select(_prompts(None), 3).to_pylist()
    assert [r["prompt_id"] for r in sel] == ["b"]  # a's own rate (1.0) drops it; b still uses the prior
    assert sel[0]["response_prefix"] is None  # level rate 0.625 >= hint_below
    again = DifficultyCurriculum(cfg)
    again.restore(cur.state())
    assert again.levels == cur.levels
    none = DifficultyCurriculum(DifficultyConfig(hint_below=0.5, prior="none"))
    none.observe(seen, 1)
    assert [r["response_prefix"] for r in none.select(_prompts(None), 2).to_pylist()] == [None, None]


def test_bad_curriculum_config_names_the_key():
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"curriculum\.ema=0: must be in \(0, 1\]"):
        DifficultyCurriculum(DifficultyConfig(ema=0))
    with pytest.raises(ConfigError, match=r"curriculum\.prior='level': must be difficulty or none"):
        DifficultyCurriculum(DifficultyConfig(prior="level"))


def test_curriculum_with_off_policy_rollouts_fails_before_any_work(tmp_path, tiny_model):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.trainer import train

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"model.path={tiny_model}", "trainer.off_policy_steps=1",
                                                             f"trainer.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"trainer\.off_policy_steps=1: a curriculum"):
        train(cfg, curriculum=DifficultyCurriculum(DifficultyConfig()))
    assert not (tmp_path / "out").exists()  # nothing written, no MLflow run, no Ray


def test_recipe_compares_at_equal_generated_tokens(ray_session, tmp_path, tiny_model):
    from mlflow import MlflowClient

    from workloads.difficulty.recipe import load, run

    root = Path(__file__).resolve().parents[1]
    doc = tmp_path / "difficulty.yaml"
    doc.write_text(f"""
base: {root / 'configs' / 'quickstart.yaml'}
name: diff-test
max_generated_tokens: 400
overrides: [model.path={tiny_model}, model.build_if_missing=none, warmstart.steps=0, rollout.engine=hf,
            rollout.group_size=2, trainer.steps=20, trainer.prompts_per_step=4, trainer.eval_every=2,
            trainer.log_samples_every=0, trainer.output_dir={tmp_path / 'out'}, eval.num_prompts=6,
            data.eval_size=6, data.train_size=32, "eval.budgets=[6x4]", eval.max_thinking=12, eval.max_solution=4,
            budget.thinking=6, budget.solution=4, learner.micro_batch_size=8, learner.num_threads=1,
            reward.num_workers=0, tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}, tracking.experiment=diff]
curriculum: {{preview_prompts: 8, preview_samples: 2, hint_below: 1.0, max_hint_fraction: 0.5}}
""")
    result = run(load(str(doc)), log=lambda *_: None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    s = result["summary"]
    for name in ("intervention", "baseline"):
        assert s[name]["generated_tokens"] >= 400  # each stopped by the shared budget ...
        assert s[name]["steps"] < 20  # ... before the step cap
    assert s["intervention"]["steps"] < s["baseline"]["steps"]  # the preview's tokens count toward its budget
    run_i = client.get_run(s["intervention"]["run_id"])
    assert run_i.data.metrics["curriculum/preview_prompts"] == 8
    assert client.get_metric_history(run_i.info.run_id, "curriculum/intervened_share")
    assert run_i.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    arts = {a.path for a in client.list_artifacts(result["parent_run_id"], "difficulty")}
    assert {"difficulty/curves.parquet", "difficulty/intervened_share.png",
            "difficulty/accuracy_vs_generated_tokens_6x4.png"} <= arts
    table = result["table"].to_pylist()
    assert {r["model"] for r in table} == {"intervention", "baseline"} and all(r["generated_tokens"] > 0
                                                                              for r in table if r["step"] > 0)
