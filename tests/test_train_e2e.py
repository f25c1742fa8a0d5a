"""One short end-to-end training run: real Ray, real vLLM, real MLflow (SQLite), real artifacts."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import TINY
from orchestrator.config import load_config
from orchestrator.tiny_model import END_THINK, SPECIAL_TOKENS
from orchestrator.step_stats import StepTimer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    from orchestrator.trainer import train

    tmp = tmp_path_factory.mktemp("e2e")
    overrides = [f"model.path={tmp / 'tiny'}", "warmstart.steps=4", "warmstart.train_size=256",
                 "warmstart.batch_size=32", "trainer.steps=2", "trainer.prompts_per_step=4", "rollout.group_size=4",
                 f"trainer.output_dir={tmp / 'out'}", "trainer.run_name=e2e", "trainer.log_samples_every=1",
                 "trainer.checkpoint_every=1",  # a periodic checkpoint at step 1 (an external logged model)
                 "trainer.state_every=0",  # no states: each step's metrics go out during the next step's rollout
                 "eval.num_prompts=12", "data.eval_size=12", "data.train_size=64", "budgets=[6x4,unconstrained]",
                 "eval.max_thinking=24", "budget.thinking=6", "budget.solution=4", "learner.micro_batch_size=8",
                 "learner.num_threads=1", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                 "tracking.experiment=e2e", "reward.num_workers=1", "rollout.num_workers=2",
                 "rollout.cpus_per_worker=0.5",
                 # each prompt's budget drawn (shared by its group) and told to the model, in training and eval
                 "budget.schedule.kind=mixture", "budget.schedule.thinking.values=[4,6]",
                 "budget.prompt_hint='[think {thinking}] '"]
    overrides += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    result = train(cfg, log=lambda *_: None)
    return cfg, result, tmp


def test_run_logged_to_mlflow(trained):
    from mlflow import MlflowClient

    cfg, result, tmp = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/reward", "train/accuracy", "train/thinking_tokens", "train/truncation_rate",
                "time/generate", "time/reward", "time/learn", "time/sync", "learner/loss"):
        hist = client.get_metric_history(result.run_id, key)
        assert [m.step for m in hist] == [1, 2], key
    assert client.get_metric_history(result.run_id, "eval/6x4/accuracy")
    # synchronous (trainer.off_policy_steps=0): every step learns from its own policy's samples, also
    # step 2, whose rollout was submitted during step 1's update and ran after step 1's weight sync
    assert [m.value for m in client.get_metric_history(result.run_id, "train/policy_lag")] == [0.0, 0.0]
    first = {k: client.get_metric_history(result.run_id, k)[0].value for k in ("time/generate", "time/generate_engine")}
    assert 0 < first["time/generate_engine"] < first["time/generate"]  # step 1 generated inside the step
    m = run.data.metrics  # the learner's own time is inside the step's parts
    assert 0 < m["learner/seconds"] < m["time/learn"]
    assert 0 < m["time/overhead"] < m["time/step"] and 0 < m["time/overhead_share"] < 1
    tags = run.data.tags
    assert tags["budgetrl.rollout.weight_load"] == "inplace"  # vLLM on CPU loaded the syncs in place
    for tag in ("budgetrl.config_hash", "budgetrl.dataset_digest", "budgetrl.source_checkpoint"):
        assert tags.get(tag), tag
    assert "warmstart" in tags["budgetrl.source_checkpoint"]
    assert run.data.params["budget.thinking"] == "6"
    arts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert "eval/step_0000_frontier.png" in arts and "eval/step_0002_summary.parquet" in arts
    # The checkpoints are MLflow 3 logged models of the run: the final one holds the weights and the final eval.
    from orchestrator import logged_model

    final = logged_model.find_checkpoint_model(client, result.run_id)
    assert "model.safetensors" in logged_model.checkpoint_model_artifacts(client, final)
    assert {m.key for m in final.metrics if m.step == 2} >= {"eval/6x4/accuracy", "eval/unconstrained/mean_tokens"}
    assert final.tags["budgetrl.checkpoint"] == result.checkpoint
    periodic = logged_model.find_checkpoint_model(client, result.run_id, "checkpoint-00001")
    assert periodic.tags["mlflow.model.isExternal"] == "true" and not periodic.metrics  # no eval at step 1
    assert {(o.model_id, o.step) for o in run.outputs.model_outputs} == {(final.model_id, 2), (periodic.model_id, 1)}


def test_two_rollout_workers_split_batches_and_get_every_sync(trained):
    from mlflow import MlflowClient

    cfg, result, _ = trained
    m = MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id).data.metrics
    # 2 steps x 4 prompts x 4 samples, plus 2 evals (before, after) x 12 prompts x 2 budgets, split evenly
    for i in (0, 1):
        assert m[f"rollout/worker_{i}/weight_syncs"] == 2  # every sync reached every worker
        assert m[f"rollout/worker_{i}/policy_version"] == 2
        assert m[f"rollout/worker_{i}/samples"] == (2 * 4 * 4 + 2 * 12 * 2) / 2


def test_rollout_records_respect_budgets(trained):
    from orchestrator.data.schema import ROLLOUT_SCHEMA

    cfg, result, tmp = trained
    out = Path(result.output_dir)
    train_files = sorted((out / "rollouts").glob("*.parquet"))
    assert len(train_files) == 2
    for f in train_files:
        t = pq.read_table(f)
        assert t.schema.names == ROLLOUT_SCHEMA.names
        assert t.num_rows == 16
        assert max(t["thinking_tokens"].to_pylist()) <= 6 and max(t["solution_tokens"].to_pylist()) <= 4
        assert all(r is not None for r in t["reward"].to_pylist())
    ev = pq.read_table(out / "eval" / "step_0002.parquet")
    assert ev.num_rows == 24  # 12 prompts x 2 budgets
    for row in ev.to_pylist():
        assert row["thinking_tokens"] <= row["budget_thinking"] and row["solution_tokens"] <= row["budget_solution"]
    assert {r["budget_thinking"] for r in ev.to_pylist()} == {6, 24}


def test_budget_schedule_gives_each_group_one_budget_and_logs_each_budget(trained):
    """budget.schedule: one drawn budget per prompt, its whole group at it and told it (budget.prompt_hint);
    budget/* metrics per budget and schedule/* each step; the eval grid tells each grid budget."""
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    cfg, result, tmp = trained
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    out, seen = Path(result.output_dir), set()
    for f in sorted((out / "rollouts").glob("*.parquet")):
        by_prompt: dict[str, set] = {}
        for r in pq.read_table(f).to_pylist():
            budget = (r["budget_thinking"], r["budget_solution"])
            by_prompt.setdefault(r["prompt_id"], set()).add(budget)
            assert r["thinking_tokens"] <= budget[0]
            hint = tok(f"<s>[think {budget[0]}] ", add_special_tokens=False)["input_ids"]
            assert r["prompt_token_ids"][:len(hint)] == hint
        assert all(len(b) == 1 for b in by_prompt.values()), by_prompt
        seen |= set().union(*by_prompt.values())
    assert seen == {(4, 4), (6, 4)}  # 8 seeded draws (2 steps x 4 prompts) from {4, 6}
    client = MlflowClient(cfg.tracking.tracking_uri)
    prompts = {b: [m.value for m in client.get_metric_history(result.run_id, f"budget/{b}x4/prompts")] for b in (4, 6)}
    assert sum(map(sum, prompts.values())) == 8
    for key in ("budget/4x4/accuracy", "budget/6x4/mean_tokens", "schedule/thinking"):
        assert client.get_metric_history(result.run_id, key), key
    assert [m.step for m in client.get_metric_history(result.run_id, "schedule/thinking")] == [1, 2]
    for r in pq.read_table(out / "eval" / "step_0002.parquet").to_pylist():  # 6x4 and unconstrained (24)
        hint = tok(f"<s>[think {r['budget_thinking']}] ", add_special_tokens=False)["input_ids"]
        assert r["prompt_token_ids"][:len(hint)] == hint


def test_checkpoint_is_hf_directory(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result, _ = trained
    ckpt = Path(result.checkpoint)
    assert (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("*.bin"))
    AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)
    # The checkpoint carries the tokenizer it was trained with: </think> is one token with the base model's
    # id (an unknown token gets the unk id, never None, so compare ids).
    tok, base = AutoTokenizer.from_pretrained(ckpt), AutoTokenizer.from_pretrained(cfg.model.path)
    think_end = tok.convert_tokens_to_ids("</think>")
    assert think_end == base.convert_tokens_to_ids("</think>") == SPECIAL_TOKENS.index(END_THINK)
    assert think_end != tok.unk_token_id and tok("</think>", add_special_tokens=False)["input_ids"] == [think_end]


def test_eval_command_on_trained_checkpoint(trained):
    """`eval CONFIG checkpoint=... budgets=...` writes records and per-budget metrics to a new run."""
    from mlflow import MlflowClient

    from orchestrator.evaluation import run_eval

    cfg, result, tmp = trained
    overrides = [f"checkpoint={result.checkpoint}", "budgets=[4x4,12x4]", "model.build_if_missing=none",
                 f"trainer.output_dir={tmp / 'out'}", "trainer.run_name=e2e-eval", "eval.num_prompts=8",
                 f"tracking.tracking_uri={cfg.tracking.tracking_uri}", "tracking.experiment=e2e",
                 "eval.max_thinking=24", "data.eval_size=12",
                 "rollout.engine=hf"]  # the command's bookkeeping is under test; the run above evaluates on vLLM
    ecfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    run_id, summary = run_eval(ecfg)
    assert summary.column("budget_label").to_pylist() == ["4x4", "12x4"]
    assert summary.column("samples").to_pylist() == [8, 8]
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["budgetrl.source_checkpoint"] == result.checkpoint
    assert "eval/4x4/accuracy" in run.data.metrics and "eval/12x4/mean_tokens" in run.data.metrics
    records = pq.read_table(tmp / "out" / "e2e-eval" / "eval" / "eval.parquet")
    assert records.num_rows == 16
    assert all(r["thinking_tokens"] <= r["budget_thinking"] for r in records.to_pylist())


def test_step_timer_adds_laps_and_counts_overhead_outside_engine_and_learner(monkeypatch):
    """Laps of one name add up (generate is the rollout plus the wait for an off-policy prefetch); the
    overhead is the step less the learner's seconds and the engine time the step waited for."""
    from orchestrator import step_stats

    clock = iter([0.0, 2.0, 2.5, 6.0, 7.0, 7.5])
    monkeypatch.setattr(step_stats.time, "perf_counter", lambda: next(clock))
    timer = StepTimer()
    for name in ("generate", "reward", "learn", "generate", "sync"):
        timer.lap(name)
    sync = timer.metrics(engine_s=1.5, learner_s=3.0, off_policy=False)
    assert sync["time/generate"] == 3.0 and sync["time/reward"] == 0.5 and sync["time/learn"] == 3.5
    assert sync["time/sync"] == 0.5 and sync["time/step"] == 7.5
    assert sync["time/overhead"] == 7.5 - 3.0 - 1.5 and sync["time/overhead_share"] == 3.0 / 7.5
    off = timer.metrics(engine_s=1.5, learner_s=3.0, off_policy=True)  # only the waits count off-policy
    assert off["time/overhead"] == 7.5 - 3.0 - 3.0
