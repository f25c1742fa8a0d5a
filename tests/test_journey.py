"""Journey learning: step judge, search trees, shortcut/journey pairs, SFT on Ray Train, the recipe end to end."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY
from workloads.journey.data import JOURNEY_SCHEMA, DataGenConfig, generate_pairs, length_summary
from workloads.journey.steps import ADDITION, columns
from workloads.journey.tree import ProgrammaticProposer, build_tree, journey, replay, shortcut

ROOT = Path(__file__).resolve().parents[1]
operand = st.integers(min_value=0, max_value=999_999)


@settings(max_examples=200, deadline=None)
@given(a=operand, b=operand)
def test_judge_accepts_every_reference_step(a, b):
    state = []
    for step in ADDITION.steps((a, b)):
        assert ADDITION.judge_step((a, b), state, step) == (True, "ok")
        state.append(step)
    assert ADDITION.verify(ADDITION.answer((a, b), state), str(a + b))


@settings(max_examples=200, deadline=None)
@given(a=operand, b=operand, data=st.data())
def test_judge_rejects_corrupted_steps(a, b, data):
    ref = ADDITION.steps((a, b))
    i = data.draw(st.integers(0, len(ref) - 1))
    for wrong in ADDITION.wrong_steps((a, b), ref[:i]):
        ok, reason = ADDITION.judge_step((a, b), ref[:i], wrong)
        assert not ok and reason and reason != "ok"
    # any single-character corruption that changes the step is rejected
    pos = data.draw(st.integers(0, len(ref[i]) - 1))
    ch = data.draw(st.sampled_from("0123456789+="))
    corrupted = ref[i][:pos] + ch + ref[i][pos + 1:]
    if corrupted != ref[i]:
        assert not ADDITION.judge_step((a, b), ref[:i], corrupted)[0]


def test_judge_reasons_name_the_mistake():
    p = (347, 586)  # 7+6=13 4+8+1=13 3+5+1=9
    s0 = ["7+6=13"]
    assert ADDITION.judge_step(p, s0, "4+8=12") == (False, "the carry 1 was dropped")
    assert ADDITION.judge_step(p, s0, "4+8+1=12") == (False, "4+8+1 is 13, not 12")
    assert ADDITION.judge_step(p, [], "7+6+1=14") == (False, "there is no carry here")
    assert ADDITION.judge_step(p, s0, "5+8+1=14") == (False, "the digits are 4 and 8")
    assert columns(p)[2].carry == 1


def test_tree_width_beam_and_correct_leaf():
    rng = random.Random(0)
    tree = build_tree(ADDITION, "4739+2865=", "7604", ProgrammaticProposer(), width=3, beam=2, rng=rng)
    assert tree.depth == 4
    for d in range(1, 5):
        level = [n for n in tree.nodes if n.depth == d]
        expanded = [n for n in tree.nodes if n.depth == d and n.children]
        assert len(expanded) <= 2 and all(len(n.children) <= 3 for n in tree.nodes)
        assert sum(not n.pruned for n in level) <= 2
    leaves = tree.correct_leaves(ADDITION)
    assert leaves and tree.steps(leaves[0]) == ADDITION.steps((4739, 2865))
    assert any(not n.ok for n in tree.nodes[1:])


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(DataGenConfig(n=60, seed=3, wrong_branches=2))


def test_journeys_have_wrong_step_reflection_backtrack_and_verified_answer(pairs):
    assert pairs.schema.equals(JOURNEY_SCHEMA) and pairs.num_rows == 120
    rows = pairs.to_pylist()
    by_id: dict[str, dict] = {}
    for r in rows:
        by_id.setdefault(r["prompt_id"], {})[r["kind"]] = r
    assert len(by_id) == 60
    for pid, pair in by_id.items():
        s, j = pair["shortcut"], pair["journey"]
        assert s["answer"] == j["answer"] and s["text"].endswith("</think>" + s["answer"])
        assert j["text"].endswith("</think>" + s["answer"])
        problem = ADDITION.parse(s["prompt"])
        ref = ADDITION.steps(problem)
        rs, rj = replay(ADDITION, s["prompt"], s["reasoning"]), replay(ADDITION, j["prompt"], j["reasoning"])
        assert rs.all_ok and rs.path == ref and not rs.wrong
        assert rj.all_ok, (pid, j["reasoning"])
        assert rj.path == ref  # journey = the shortcut's path plus detours
        assert 1 <= len(rj.wrong) == j["num_wrong"] <= 2
        for (wrong, reflection), back in zip(rj.wrong, rj.backtracks):
            assert f"{wrong} wait: {reflection}; back: {back}" in j["reasoning"]
            assert back in ref  # the backtrack continues with the right step of the same column
            i = ref.index(back)
            assert ADDITION.judge_step(problem, ref[:i], wrong) == (False, reflection)
        assert ADDITION.verify(rj.answer, s["answer"]) and ADDITION.verify(rs.answer, s["answer"])
        assert j["num_tokens"] > s["num_tokens"] and j["num_steps"] == s["num_steps"] + j["num_wrong"]


def test_reflection_is_the_judge_reason_at_that_step():
    rng = random.Random(1)
    tree = build_tree(ADDITION, "58+67=", "125", ProgrammaticProposer(), width=3, beam=2, rng=rng)
    j = journey(tree, ADDITION, rng)
    s = shortcut(tree, ADDITION)
    ref = s.reasoning.split()
    r = replay(ADDITION, "58+67=", j.reasoning)
    (wrong, reflection), = r.wrong
    i = ref.index(r.backtracks[0])
    assert ADDITION.judge_step((58, 67), ref[:i], wrong) == (False, reflection)
    assert j.answer == s.answer == "125"


def test_pairs_are_deterministic_by_seed(pairs):
    again = generate_pairs(DataGenConfig(n=60, seed=3, wrong_branches=2))
    assert again.equals(pairs)
    other = generate_pairs(DataGenConfig(n=60, seed=4, wrong_branches=2))
    assert other.column("text").to_pylist() != pairs.column("text").to_pylist()
    lengths = length_summary(pairs)
    assert lengths["journey/mean_num_tokens"] > lengths["shortcut/mean_num_tokens"]


def test_policy_proposer_on_the_tiny_model(tiny_model):
    """The policy proposer samples steps through a project rollout engine (HF here); with a random-init
    model the reference step is injected where no sample is right, so a pair still exists."""
    from orchestrator.rollout.engine import make_engine
    from transformers import AutoTokenizer

    from workloads.journey.tree import PolicyProposer

    prop = PolicyProposer(make_engine("hf", tiny_model, dtype="float32"), AutoTokenizer.from_pretrained(tiny_model))
    rng = random.Random(0)
    tree = build_tree(ADDITION, "58+67=", "125", prop, width=3, beam=2, rng=rng)
    assert prop.samples == 3 * (1 + 2) and tree.correct_leaves(ADDITION)
    j = journey(tree, ADDITION, rng)
    if j is not None:  # needs a wrong child on the correct path (any non-reference sample is one)
        assert replay(ADDITION, "58+67=", j.reasoning).all_ok and j.answer == "125"


def test_sft_on_ray_train_writes_a_loadable_checkpoint(ray_session, tiny_model, tmp_path, monkeypatch):
    """2 data-parallel workers (the recipe's 1-worker default runs in the end-to-end test), from a model
    path relative to the driver's cwd (Ray Train workers run elsewhere)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.learner.sft_ray import sft_train_ray

    examples = [(f"<s>{a}+{b}=<think>", f"{a + b}</think>{a + b}</s>") for a in range(8) for b in range(8)]
    out = tmp_path / "ckpt"
    monkeypatch.chdir(Path(tiny_model).parent)
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.Tracker.start(uri, "sft-ray", run_name="sft") as run:
        m = sft_train_ray(Path(tiny_model).name, out, examples, steps=25, batch_size=16, lr=3e-3, warmup_steps=2,
                          log_every=5, num_workers=2, num_threads=1, storage_path=tmp_path / "rt", tracker=run)
    assert m["num_workers"] == 2 and m["steps"] == 25
    # rank 0's curve came back to the driver, which logged it (the workers never see the tracking store)
    assert [p["step"] for p in m["history"]] == [5, 10, 15, 20, 25] and m["history"][-1]["loss"] == m["loss"]
    logged = run.client.get_metric_history(run.run_id, "sft/loss")
    assert sorted((x.step, x.value) for x in logged) == [(p["step"], p["loss"]) for p in m["history"]]
    assert m["loss"] < 0.7 * m["initial_loss"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(examples[0][0] + examples[0][1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_shipped_config_validates():
    from workloads.journey.recipe import load, sft_steps, train_config

    cfg = load(str(ROOT / "configs" / "journey" / "tiny.yaml"))
    tcfg = train_config(cfg)
    assert cfg.data.n == 327 and cfg.sft.num_workers == 1 and sft_steps(cfg) == 31
    assert "unconstrained" in tcfg.eval.budgets and tcfg.warmstart.steps > 0


@pytest.mark.parametrize("override, message", [("data.width=1", "width"), ("data.proposer=oracle", "proposer"),
                                               ("sft.num_workers=0", "num_workers"), ("nonsense=1", "nonsense")])
def test_bad_configs_fail_before_work(override, message):
    from orchestrator.config import ConfigError
    from workloads.journey.recipe import load, train_config

    with pytest.raises(ConfigError, match=message):
        train_config(load(str(ROOT / "configs" / "journey" / "tiny.yaml"), [override]))


def test_tiny_recipe_end_to_end(ray_session, tmp_path):
    from mlflow import MlflowClient

    from workloads.journey.recipe import MODELS, load, run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [f"model.path={tmp_path / 'tiny'}", "warmstart.steps=2", "warmstart.train_size=64",
            "warmstart.batch_size=16", f"trainer.output_dir={tmp_path / 'out'}", "eval.num_prompts=6",
            "data.eval_size=6", "data.train_size=32", "eval.budgets=[8x4,unconstrained]", "eval.max_thinking=24",
            "warmstart.num_threads=1", f"tracking.tracking_uri={uri}", "tracking.experiment=journey-test",
            "rollout.engine=hf"]  # the HF engine starts faster than vLLM; the real run uses vLLM
    base += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = load(str(ROOT / "configs" / "journey" / "tiny.yaml"),
               ["data.n=8", "sft.steps=3", "sft.batch_size=4", "sft.num_threads=1", "sft.log_every=1",
                "name=jt"])
    cfg.overrides = list(cfg.overrides) + base  # after the shipped config's own overrides
    out = run(cfg, log=lambda *_: None)
    client = MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["budgetrl.workload"] == "journey"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    stages = {c.data.tags["budgetrl.stage"]: c for c in children}
    assert set(stages) == {"base", "data", "sft_shortcut", "sft_journey", "eval"}
    assert all(c.info.status == "FINISHED" for c in children)
    for kind in ("shortcut", "journey"):
        tags = stages[f"sft_{kind}"].data.tags
        assert tags["budgetrl.source_checkpoint"] == out["checkpoints"]["base"]
        assert "budgetrl.dataset_digest" in tags
        assert (Path(out["checkpoints"][kind]) / "model.safetensors").is_file()
    assert stages["sft_shortcut"].data.params["steps"] == stages["sft_journey"].data.params["steps"] == "3"
    assert "sft/loss" in stages["sft_journey"].data.metrics
    assert stages["sft_journey"].data.metrics["sft/final_num_workers"] == 1
    arts = {a.path for a in client.list_artifacts(out["parent_run_id"], "journey")}
    assert {"journey/comparison.parquet", "journey/comparison.png", "journey/comparison.md",
            "journey/trajectory_lengths.parquet"} <= arts
    table = out["table"]
    assert set(table.column("model").to_pylist()) == set(MODELS)
    assert set(table.column("budget").to_pylist()) == {"8x4", "unconstrained"}
    data = pq.read_table(out["data_path"])
    assert data.num_rows == 16 and out["lengths"]["journey/mean_num_tokens"] > out["lengths"]["shortcut/mean_num_tokens"]
