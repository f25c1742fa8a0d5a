"""The stand-in quickstart's pieces, fast: its config validates (and its new keys fail with the key named),
``train`` builds the stand-in where the config says and never over another directory, and a served chat
request reaches the chat template's ``enable_thinking`` switch (HF engine, in-process, no Ray).

The whole run (warm start, GRPO, eval grid, served chat, SIGKILL and resume) is
``bash scripts/standin_quickstart.sh``; its timed result is in the README."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "standin" / "quickstart.yaml"
SERVE_CONFIG = str(ROOT / "configs" / "standin" / "serve.yaml")


def test_standin_config_validates_and_names_bad_values():
    cfg = load_config(CONFIG, check_paths=False)
    assert cfg.model.build_if_missing == "standin"
    assert cfg.model.chat_template and cfg.model.think_end == "</think>"
    assert cfg.learner.max_shard_size == "1MB" and cfg.trainer.state_every > 0
    assert load_config(None, ["model.path=x", "model.build_if_missing=tiny"]).learner.max_shard_size == "5GB"
    with pytest.raises(ConfigError, match="^model.build_if_missing='tiny_model': must be one of none, tiny, standin$"):
        load_config(CONFIG, ["model.build_if_missing=tiny_model"], check_paths=False)
    with pytest.raises(ConfigError, match="Did you mean: 'build_if_missing'"):  # the two booleans it replaced are gone
        load_config(CONFIG, ["model.build_tiny_if_missing=true"], check_paths=False)
    with pytest.raises(ConfigError, match=r"learner.max_shard_size='5 gigs': must be a size"):
        load_config(CONFIG, ["learner.max_shard_size=5 gigs"], check_paths=False)
    with pytest.raises(ConfigError, match="model.build_if_missing=standin for the stand-in"):
        load_config(CONFIG, ["model.build_if_missing=none", "model.path=/nonexistent/standin"])


def test_train_builds_the_standin_where_asked_and_never_over_another_dir(tmp_path, standin_model):
    from orchestrator.checkpoint_files import CheckpointError, read_weight_map
    from orchestrator.warmstart import ensure_base_model

    cfg = load_config(CONFIG, [f"model.path={tmp_path / 'standin'}"])
    built = Path(ensure_base_model(cfg))
    assert len(set(read_weight_map(built).values())) == 3  # the stand-in's shards, checked
    assert (built / "tokenizer.json").read_bytes() == (Path(standin_model) / "tokenizer.json").read_bytes()
    mtime = (built / "config.json").stat().st_mtime_ns
    assert ensure_base_model(cfg) == str(built) and (built / "config.json").stat().st_mtime_ns == mtime  # reused
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"model.path=.*mine.*not a stand-in build"):
        ensure_base_model(load_config(CONFIG, [f"model.path={other}"]))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_served_chat_follows_enable_thinking(standin_model):
    from orchestrator.serve import APIError, BudgetedServer, load_serve_config

    cfg = load_serve_config(SERVE_CONFIG, ["model.engine=hf", "sampling.temperature=1.0"], target=standin_model)
    server = BudgetedServer(cfg, cfg.model.path)
    ask = {"messages": [{"role": "user", "content": "47+38="}], "thinking_budget": 6, "solution_budget": 4, "seed": 3}
    on = server.handle("chat", {**ask, "chat_template_kwargs": {"enable_thinking": True}})
    c = on["choices"][0]
    assert on["budget"] == {"thinking": 6, "solution": 4} and 1 <= c["thinking_tokens"] <= 6
    assert c["thinking_tokens"] + c["solution_tokens"] == on["usage"]["completion_tokens"]
    assert on["usage"]["prompt_tokens"] == 14  # the template's prompt, ending in "<think>\n"
    off = server.handle("chat", {**ask, "chat_template_kwargs": {"enable_thinking": False}})
    c = off["choices"][0]
    assert off["budget"]["thinking"] == 0 and c["thinking_tokens"] == 0 and c["message"]["reasoning_content"] == ""
    assert 1 <= c["solution_tokens"] <= 4 and not c["forced_think_end"]
    closed = server.tokenizer.apply_chat_template(ask["messages"], tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)
    assert closed.endswith("<think>\n\n</think>\n\n")  # the template wrote an empty thinking block
    assert off["usage"]["prompt_tokens"] == len(server.tokenizer(closed, add_special_tokens=False)["input_ids"]) > 14
    for body, param in (({**ask, "chat_template_kwargs": "no"}, "chat_template_kwargs"),
                        ({**ask, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
                        ({"prompt": "1+1", "chat_template_kwargs": {}}, "chat_template_kwargs")):
        with pytest.raises(APIError) as err:
            server.handle("completion" if "prompt" in body else "chat", body)
        assert err.value.param == param


def test_learner_max_shard_size_shards_states_and_checkpoints(tiny_model, tmp_path):
    """``learner.max_shard_size`` reaches the Learner: its states (weights and optimizer moments) and its
    checkpoints are sharded without the caller naming a size (the trainer names none)."""
    from orchestrator.checkpoint_files import read_weight_map
    from orchestrator.learner.worker import Learner

    import pyarrow as pa

    learner = Learner(tiny_model, device="cpu", max_shard_size="100KB")
    learner.step(pa.table({  # one update, so that AdamW has moments to save
        "prompt_token_ids": pa.array([[5, 6, 7]] * 2, pa.list_(pa.int32())),
        "response_token_ids": pa.array([[8, 9]] * 2, pa.list_(pa.int32())),
        "loss_mask": pa.array([[1, 1]] * 2, pa.list_(pa.int8())),
        "advantage": pa.array([1.0, -1.0], pa.float32())}))
    (tmp_path / "state").mkdir()
    learner.save_state(str(tmp_path / "state"))
    assert len(set(read_weight_map(tmp_path / "state" / "model").values())) >= 2
    assert len(set(read_weight_map(tmp_path / "state", "optimizer.safetensors").values())) >= 2
    learner.save(str(tmp_path / "ckpt"))
    assert len(set(read_weight_map(tmp_path / "ckpt").values())) >= 2
    assert read_weight_map(Learner(tiny_model, device="cpu").save(str(tmp_path / "whole"))) is None  # 5GB default


def test_thinking_off_samples_skip_phase_one_and_keep_their_order():
    """A thinking budget of 0 (a chat template with ``enable_thinking: false``) generates the solution only, in
    one request with the solution budget; samples with thinking keep both phases; the output keeps the input order."""
    from orchestrator.config import Budget
    from orchestrator.rollout.budget import two_phase_generate
    from orchestrator.rollout.engine import GenOutput

    class Recorder:  # an engine that echoes each request's first prompt id, then EOS (id 2)
        budget_forcing = False

        def __init__(self):
            self.calls = []

        def generate(self, requests, temperature, top_p):
            self.calls.append([(r.prompt_token_ids[0], r.max_tokens, list(r.stop_token_ids)) for r in requests])
            return [GenOutput([r.prompt_token_ids[0], 2], [-0.1, -0.2], "stop") for r in requests]

    engine = Recorder()
    out = two_phase_generate(engine, [[10], [11], [12]], [Budget(0, 5), Budget(4, 3), Budget(0, 7)], think_end_id=9, end_ids=[2],
                             temperature=1.0)
    assert engine.calls[0] == [(10, 5, [2]), (12, 7, [2])]  # thinking off: solution budget, EOS only
    assert engine.calls[1] == [(11, 4, [9, 2])]  # thinking on: phase 1 stops at </think> or EOS
    assert [s.thinking_ids for s in out] == [[], [11], []] and [s.solution_ids for s in out] == [[10, 2], [11, 2], [12, 2]]
    assert not out[0].forced_think_end and out[1].forced_think_end  # phase 1 ended on EOS: </think> forced
    with pytest.raises(ValueError, match="thinking=-1"):
        two_phase_generate(engine, [[10]], [Budget(-1, 5)], think_end_id=9, end_ids=[2], temperature=1.0)


class _Killed(BaseException):
    """Stands in for a SIGKILL of the driver: nothing in the trainer catches it."""


def test_standin_trains_through_its_chat_template_and_resumes_from_a_sharded_state(
        tmp_path, standin_model, ray_session, monkeypatch):
    """A few HF-engine steps on the stand-in through its chat template; the driver dies right after a state
    is written (sharded: weights and optimizer moments), and the same call continues the same MLflow run
    from it, every step logged once."""
    from mlflow import MlflowClient

    from orchestrator import trainer
    from orchestrator.checkpoint_files import read_weight_map

    out = tmp_path / "out" / "standin"
    overrides = [
        f"model.path={standin_model}", "model.build_if_missing=none", "warmstart.steps=0",
        "rollout.engine=hf", "trainer.steps=3", "trainer.state_every=1", "trainer.log_samples_every=1",
        "trainer.prompts_per_step=2", "rollout.group_size=2", "learner.max_shard_size=200KB",
        f"trainer.output_dir={tmp_path / 'out'}", "trainer.run_name=standin", "eval.num_prompts=2", "data.eval_size=2",
        "data.train_size=16", "budgets=[6x4]", "eval.max_thinking=12", "eval.max_solution=4", "budget.thinking=6",
        "budget.solution=4", "learner.micro_batch_size=8", "learner.num_threads=1", "reward.num_workers=0",
        "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=0.5",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=standin"]
    seen = {}
    commit = trainer._Run.commit_state

    def commit_then_die(self):
        commit(self)
        state = out / "state"
        if (state / "trainer_state.json").is_file() and "shards" not in seen:
            seen["step"] = json.loads((state / "trainer_state.json").read_text())["step"]
            seen["shards"] = (len(set(read_weight_map(state / "model").values())),
                              len(set(read_weight_map(state, "optimizer.safetensors").values())))
            raise _Killed()

    monkeypatch.setattr(trainer._Run, "commit_state", commit_then_die)
    with pytest.raises(_Killed):
        trainer.train(load_config(CONFIG, overrides), log=lambda *_: None)
    assert seen["step"] == 1 and min(seen["shards"]) >= 2, seen
    first = json.loads((out / "state" / "trainer_state.json").read_text())["run_id"]
    from transformers import AutoTokenizer

    row = pq.read_table(out / "rollouts" / "step_00001.parquet", columns=["prompt", "prompt_token_ids"]).to_pylist()[0]
    rendered = AutoTokenizer.from_pretrained(standin_model).decode(row["prompt_token_ids"])
    assert rendered == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n<think>\n"  # the template

    result = trainer.train(load_config(CONFIG, overrides), log=lambda *_: None)
    assert result.run_id == first and result.resumed_from == 1 and result.steps == 3
    steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(first, "train/reward")]
    assert sorted(steps) == [1, 2, 3], steps
