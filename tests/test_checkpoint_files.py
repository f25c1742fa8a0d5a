"""Checkpoint files: the stand-in checkpoint, the one reader (single file or sharded), sharded learner
states, and bad checkpoints failing before Ray starts with an error naming the shard, key or id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator.config import ConfigError
from orchestrator.checkpoint_files import (
    CheckpointError,
    check_model_dir,
    load_tensors,
    require_checkpoint,
    save_tensors,
    weight_files,
)

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
# eval/train stop at their checks; if a regression lets one run, it is small.
_SMALL = ["rollout.engine=hf", "budgets=[4x4]", "eval.num_prompts=2", "data.eval_size=2", "data.train_size=8",
          "reward.num_workers=0", "warmstart.steps=0", "trainer.steps=1"]


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*-of-*.safetensors"))


# ---------------------------------------------------------------------------------------------- stand-in


def test_standin_checkpoint_is_shaped_like_a_real_chat_model(standin_model):
    from transformers import AutoConfig, AutoTokenizer

    d = Path(standin_model)
    shards = _shards(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert [p.name for p in weight_files(d)] == shards

    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) >= 8192, len(tok)
    ids = {}
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        ids[t] = tok.convert_tokens_to_ids(t)
        assert tok.encode(t, add_special_tokens=False) == [ids[t]], t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # merges were learned: a task prompt takes far fewer tokens than characters, and round-trips
    text = "Which assignment makes every formula true? 1234+5678="
    enc = tok.encode(text, add_special_tokens=False)
    assert len(enc) < len(text) / 2 and tok.decode(enc) == text

    msgs = [{"role": "user", "content": "12+34="}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert off == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == on

    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    conf = AutoConfig.from_pretrained(d)
    assert conf.tie_word_embeddings is False and conf.model_type == "llama" and conf.vocab_size >= len(tok)
    state = load_tensors(d)
    assert state["lm_head.weight"].shape == state["model.embed_tokens.weight"].shape
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert check_model_dir(d, think_end="</think>", chat_template=True)["architectures"] == ["LlamaForCausalLM"]


def test_budgeted_rollout_on_the_standin(standin_model):
    """The HF engine's two-phase rollout on the stand-in through its chat template: the prompt ends in the
    template's ``<think>``, the thinking budget holds, and ``</think>`` is forced as one injected token."""
    from orchestrator.config import Budget
    from orchestrator.rollout.worker import RolloutWorker, SamplingSpec

    worker = RolloutWorker(standin_model, engine="hf", chat_template=True, engine_kwargs={"dtype": "float32"})
    tok = worker.tokenizer
    assert worker.think_end_id == tok.convert_tokens_to_ids("</think>")
    # Every end of generation: the tokenizer's EOS, then the generation config's list (rollout/end_ids.py).
    assert list(worker.end_ids) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    prompts = pa.table({"prompt_id": ["a"], "prompt": ["12+34="], "task": ["addition"], "difficulty": [2],
                        "domain": ["arithmetic"], "answer": ["46"]})
    records = worker.generate(prompts, SamplingSpec(group_size=2, budget=Budget(6, 3),
                                                    temperature=1.0, seed=0)).to_pylist()
    assert len(records) == 2
    for r in records:
        assert tok.decode(r["prompt_token_ids"]).endswith("<|im_start|>assistant\n<think>\n")
        assert r["thinking_tokens"] <= 6 and r["solution_tokens"] <= 3
        forced = [t for t, inj in zip(r["response_token_ids"], r["injected"]) if inj]
        assert forced in ([], [worker.think_end_id]) and (forced or not r["thinking_truncated"]), r


def test_standin_build_is_deterministic_and_reused(standin_model, tmp_path):
    from orchestrator.cli import main

    other = tmp_path / "standin"
    assert main(["build-standin", str(other)]) == 0
    files = sorted(p.name for p in Path(standin_model).iterdir())
    assert files == sorted(p.name for p in other.iterdir())
    for name in files:
        assert (other / name).read_bytes() == (Path(standin_model) / name).read_bytes(), name
    stamp = (other / "model.safetensors.index.json").stat().st_mtime_ns
    assert main(["build-standin", str(other)]) == 0  # same arguments: reused, not rebuilt
    assert (other / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a stand-in build"):
        main(["build-standin", str(tmp_path / "mine")])


# ---------------------------------------------------------------------------------------------- reader


def test_reader_single_file_and_sharded(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from orchestrator.merge import load_state

    single = load_tensors(tiny_model)
    assert weight_files(tiny_model) == [Path(tiny_model) / "model.safetensors"]
    reference = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert single.keys() == reference.keys() and all(torch.equal(single[k], reference[k]) for k in single)

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    save_tensors(reference, sharded, "model.safetensors", max_shard_size="100KB")
    assert len(weight_files(sharded)) >= 3 and not (sharded / "model.safetensors").exists()
    for state in (load_tensors(sharded), load_state(sharded)):  # merge reads through the same reader
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)

    # an index whose weight_map names a tensor that its shard lacks
    index = sharded / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"]["model.extra.weight"] = next(iter(meta["weight_map"].values()))
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tensor 'model.extra.weight' is not in its shard"):
        load_tensors(sharded)
    # a stale single file next to an index: transformers would read one, vLLM the other
    shutil.copy(Path(tiny_model) / "model.safetensors", sharded / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        weight_files(sharded)


def test_learner_state_resumes_from_shards(tiny_model, tmp_path):
    """save_state with tiny shards (weights and optimizer moments), load_state in a fresh learner: the next
    step is the one the first learner takes."""
    from orchestrator.learner.worker import Learner

    rng = np.random.default_rng(0)
    batch = pa.table({
        "prompt_token_ids": pa.array([rng.integers(10, 90, 5).tolist() for _ in range(4)], pa.list_(pa.int32())),
        "response_token_ids": pa.array([rng.integers(10, 90, 6).tolist() for _ in range(4)], pa.list_(pa.int32())),
        "loss_mask": pa.array([[1] * 6] * 4, pa.list_(pa.int8())),
        "advantage": pa.array([1.0, -1.0, 0.5, -0.5], pa.float32()),
    })
    first = Learner(tiny_model, device="cpu", lr=1e-2, seed=0)
    first.step(batch)
    state = tmp_path / "state"
    state.mkdir()
    first.save_state(str(state), max_shard_size="100KB")
    assert len(_shards(state / "model")) >= 2 and not (state / "model" / "model.safetensors").exists()
    opt_shards = sorted(p.name for p in state.glob("optimizer-*-of-*.safetensors"))
    assert len(opt_shards) >= 2 and (state / "optimizer.safetensors.index.json").is_file()

    second = Learner(tiny_model, device="cpu", lr=1e-2, seed=0)
    assert second.load_state(str(state)) == 1
    a, b = first.get_weights(), second.get_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first.step(batch)
    second.step(batch)
    a, b = first.get_weights(), second.get_weights()
    assert all(torch.equal(a[k], b[k]) for k in a), "the moments or the step count did not come back"


# ---------------------------------------------------------------------------------------------- bad input


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("budgetrl_*.json"))
    return dst


def test_missing_shard_is_named_before_ray(standin_model, tmp_path, capsys, monkeypatch):
    import orchestrator.trainer as trainer
    from orchestrator.cli import main

    broken = _copy(standin_model, tmp_path / "broken")
    gone = _shards(broken)[1]
    (broken / gone).unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{gone}'.*missing"):
        require_checkpoint(str(broken))
    # every other reader says the same: registry, merge, the learner's load
    from orchestrator import registry
    from orchestrator.learner.checkpoint import load_policy
    from orchestrator.merge import MergeError, load_state

    with pytest.raises(registry.RegistryError, match=gone):
        registry.resolve_model_uri(str(broken))
    with pytest.raises(MergeError, match=gone):
        load_state(broken)
    with pytest.raises(CheckpointError, match=gone):
        load_policy(str(broken))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the checkpoint was checked")

    monkeypatch.setattr(trainer, "init_ray", no_ray)
    out = tmp_path / "out"
    for command in ("eval", "train"):  # train: quickstart's build_if_missing=tiny must not build over it
        code = main([command, QUICKSTART, f"model.path={broken}", f"trainer.output_dir={out}", *_SMALL])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"config error: model.path='{broken}'") and gone in err[0], err
    assert not (broken / "model.safetensors").exists() and not (broken / "budgetrl_tiny_model.json").exists()
    # a directory without a checkpoint still gets the tiny model built there
    from orchestrator.config import load_config
    from orchestrator.warmstart import ensure_base_model

    fresh = tmp_path / "fresh"
    cfg = load_config(QUICKSTART, [f"model.path={fresh}", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
                                   "model.tiny.intermediate_size=64"])
    assert ensure_base_model(cfg) == str(fresh) and (fresh / "budgetrl_tiny_model.json").is_file()


def test_chat_template_true_needs_a_template(tiny_model, standin_model):
    with pytest.raises(CheckpointError, match=r"^model.chat_template=True: the tokenizer at .* has no chat template"):
        require_checkpoint(tiny_model, chat_template=True)
    assert require_checkpoint(standin_model, chat_template=True) == standin_model


@pytest.mark.parametrize("think_end", ["</thinking>", "</answer>", " </think>"])
def test_think_end_must_be_one_token(standin_model, think_end):
    with pytest.raises(CheckpointError, match=f"^model.think_end='{think_end}': is not a single token"):
        require_checkpoint(standin_model, think_end=think_end)


def test_generation_config_eos_outside_vocabulary(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path / "bad_eos")
    vocab = json.loads((bad / "config.json").read_text())["vocab_size"]
    gen = json.loads((bad / "generation_config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"], vocab]}))
    with pytest.raises(CheckpointError, match=f"eos_token_id {vocab} is outside the vocabulary .*vocab_size={vocab}"):
        require_checkpoint(str(bad))
    gen["eos_token_id"] = vocab - 1
    (bad / "generation_config.json").write_text(json.dumps(gen))
    assert require_checkpoint(str(bad)) == str(bad)


def test_serve_registered_model_with_a_missing_shard_fails_before_ray(standin_model, tmp_path, capsys, monkeypatch):
    """``serve models:/NAME/VERSION`` checks the whole artifact (index and every shard, listed; the small files
    read; no weights downloaded) before Ray starts, as a local directory is checked."""
    import orchestrator.serve as serve
    from orchestrator import registry
    from orchestrator.cli import main

    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert registry.register_checkpoint(store, _copy(standin_model, tmp_path / "standin"), "standin") == 1
    track = f"model.tracking_uri={store}"
    conf = serve.load_serve_config(None, [track, "model.chat_template=true"], target="models:/standin/1")
    assert conf.model.max_model_len > 0
    with pytest.raises(ConfigError, match=r"^model.think_end='</thinking>': .*not a single token"):
        serve.load_serve_config(None, [track, "model.think_end=</thinking>"], target="models:/standin/1")
    stored = sorted((tmp_path / "mlruns").rglob("models/m-*/artifacts/model.safetensors.index.json"))  # its logged model
    assert len(stored) == 1, stored
    gone = _shards(stored[0].parent)[-1]
    (stored[0].parent / gone).unlink()

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the registered model was checked")

    monkeypatch.setattr(serve, "init_ray", no_ray)
    assert main(["serve", "models:/standin/1", track]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own INFO lines
    assert err.startswith("config error: model.path='models:/standin/1': the artifact at file://"), err
    assert "/models/m-" in err, err
    assert f"names shard '{gone}'" in err and "missing" in err and "budgetrl-check-" not in err, err


def test_an_eos_from_the_generation_config_alone_is_enough(standin_model, tmp_path):
    """The rollout worker ends a sample on the tokenizer's EOS or the generation config's: a model with either
    passes; one with neither fails naming both places."""
    d = _copy(standin_model, tmp_path / "no_tok_eos")
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(d)).eos_token_id is None
    assert require_checkpoint(str(d), chat_template=True) == str(d)  # generation_config.json's two ids
    for name in ("generation_config.json", "config.json"):
        conf = json.loads((d / name).read_text())
        conf.pop("eos_token_id", None)
        (d / name).write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"nothing ends a sample: its tokenizer has no eos_token and its "
                                              r"generation_config.json \(or config.json\) names no eos_token_id"):
        require_checkpoint(str(d), chat_template=True)
