"""The algorithm registries: hand-computed advantages, losses, gradients, KL, filters and shaping on tiny
batches; the presets and their config errors; the ``algorithms`` command. No Ray here."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator import algorithms
from orchestrator.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, fill_batch, kl_penalty, resolve
from orchestrator.algorithms.filters import zero_variance
from orchestrator.algorithms.losses import masked_aggregate
from orchestrator.algorithms.shaping import group_length_reward, kl_reward_penalty, overlong_penalty
from orchestrator.config import ConfigError, load_config
from test_learner import make_batch, model_dir, random_batch  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

# Three groups: a (1, 0, 0), b constant (1, 1), c (2, 0, 1, 1).
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 0.0, 1.0, 1.0])
GROUPS = np.array(["a", "a", "a", "b", "b", "c", "c", "c", "c"])
S3, S23 = math.sqrt(1 / 3), math.sqrt(2 / 3)  # group std (ddof=1) of a and of c
EXPECTED = {
    "grpo": [2 / 3 / S3, -1 / 3 / S3, -1 / 3 / S3, 0, 0, 1 / S23, -1 / S23, 0, 0],
    "dr_grpo": [2 / 3, -1 / 3, -1 / 3, 0, 0, 1, -1, 0, 0],
    "rloo": [1, -0.5, -0.5, 0, 0, 4 / 3, -4 / 3, 0, 0],
    # centered rewards have batch mean 0 and sum of squares 8/3: std (ddof=1) = sqrt(8/3 / 8) = sqrt(1/3)
    "reinforce_pp": [2 / 3 / S3, -1 / 3 / S3, -1 / 3 / S3, 0, 0, 1 / S3, -1 / S3, 0, 0],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_advantage_estimators_known_values(name):
    adv = ADVANTAGES.get(name)(REWARDS, GROUPS)
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, EXPECTED[name], rtol=1e-5, atol=1e-7)
    assert np.all(adv[3:5] == 0.0)  # the constant group carries no signal, exactly
    assert np.all(ADVANTAGES.get(name)(np.full(3, 0.1), np.zeros(3)) == 0.0)  # float noise of a flat group: 0
    assert ADVANTAGES.get(name)(np.zeros(0), np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="group_index"):
        ADVANTAGES.get(name)(REWARDS, GROUPS[:3])


def test_every_registered_estimator_is_tested():
    assert set(ADVANTAGES.names()) == set(EXPECTED)


def test_aggregations_known_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = {"token_mean": 7 / 3, "seq_mean_token_sum": 3.5, "seq_mean_token_mean": 2.75,
                "seq_mean_token_sum_norm": (3 + 4) / 4 / 2}  # norm_length 4: the token sum over a constant
    assert set(AGGREGATIONS.names()) == set(expected)
    for agg, value in expected.items():
        assert masked_aggregate(values, mask, agg, norm_length=4).item() == pytest.approx(value)
    with pytest.raises(ValueError, match="algorithm.norm_length"):
        masked_aggregate(values, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="registered: token_mean, seq_mean_token_sum"):
        masked_aggregate(values, mask, "mean")


def test_dr_grpo_normalizer_does_not_depend_on_the_sample_length():
    # Two sequences with the same per-token values: token_mean weighs by tokens, the constant normalizer
    # gives each token the same weight 1 / (B * L) whatever its sequence's length.
    values = torch.ones(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    masked_aggregate(values, mask, "seq_mean_token_sum_norm", norm_length=8).backward()
    assert torch.allclose(values.grad, mask / 16.0)


def test_ppo_clip_values_and_gradient_by_hand():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.1, -0.5]], requires_grad=True)  # ratios e^0.1 = 1.105 and e^-0.5 = 0.607
    loss, m = POLICY_LOSSES.get("ppo_clip")(new, old, torch.tensor([1.0]), torch.ones(1, 2),
                                            clip_low=0.2, clip_high=0.05)
    # token 1: ratio 1.105 > 1 + 0.05 with A > 0: clipped at 1.05, no gradient; token 2: ratio 0.607 < 0.8
    # with A > 0: min(r A, clip(r) A) = r A, unclipped, gradient -r / 2 (token_mean over 2 tokens)
    r2 = math.exp(-0.5)
    assert loss.item() == pytest.approx((-1.05 - r2) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -r2 / 2]]))
    assert m["clip_frac"] == pytest.approx(0.5) and m["tokens"] == 2.0
    assert m["ratio_mean"] == pytest.approx((math.exp(0.1) + r2) / 2, rel=1e-6)
    # clip-higher: the same token-1 ratio passes unclipped under DAPO's 0.28
    loss_hi, m_hi = POLICY_LOSSES.get("ppo_clip")(new.detach(), old, torch.tensor([1.0]), torch.ones(1, 2),
                                                  clip_low=0.2, clip_high=0.28)
    assert loss_hi.item() == pytest.approx((-math.exp(0.1) - r2) / 2, rel=1e-6) and m_hi["clip_frac"] == 0.0


def test_gspo_sequence_ratio_values_and_gradient_by_hand():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, -0.5, 5.0], [0.3, 0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the 5.0 is masked: it must not enter the ratio
    loss, m = POLICY_LOSSES.get("gspo")(new, old, torch.tensor([1.0, 1.0]), mask)
    s1 = math.exp((0.1 - 0.5) / 2)  # 0.8187 < 1 - 3e-4 with A > 0: the unclipped branch is the max
    # s2 = exp(0.2) = 1.2214 > 1 + 4e-4 with A > 0: clipped at 1.0004, no gradient
    assert loss.item() == pytest.approx((-s1 - 1.0004) / 2, rel=1e-6)  # seq_mean_token_mean by default
    loss.backward()
    # d(-s1)/d lp_t = -s1 / 2 for each of its 2 tokens, then / 2 sequences
    torch.testing.assert_close(new.grad, torch.tensor([[-s1 / 4, -s1 / 4, 0.0], [0.0, 0.0, 0.0]]))
    assert m["clip_frac"] == pytest.approx(0.5)  # 2 of the 4 counted tokens belong to the clipped sequence
    with pytest.raises(ValueError, match="one advantage per sequence"):
        POLICY_LOSSES.get("gspo")(new, old, torch.ones(2, 3), mask)


def test_kl_estimators_known_values():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(ln2)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1)
    assert kl_reward_penalty([0.5, -0.2], 0.1) == pytest.approx([-0.05, 0.02])


def test_overlong_shaping_known_values():
    # limit 10, buffer 0.2 x 10 = 2 tokens: no penalty up to 8, then a ramp to -penalty at the limit
    pen = overlong_penalty([7, 8, 9, 10, 12], [10] * 5, 0.2, penalty=1.0)
    np.testing.assert_allclose(pen, [0, 0, -0.5, -1, -1])
    np.testing.assert_allclose(overlong_penalty([9], [10], 0.2, penalty=0.5), [-0.25])
    assert np.all(overlong_penalty([10], [10], 0.0) == 0.0)


def _records(groups: dict[str, list[float]], think=(3,), limit=(8, 4)) -> pa.Table:
    rows = [(pid, r) for pid, rewards in groups.items() for r in rewards]
    n = len(rows)
    return pa.table({"prompt_id": [p for p, _ in rows], "reward": pa.array([r for _, r in rows], pa.float32()),
                     "prompt_token_ids": [[1, 2]] * n, "response_token_ids": [[3, 4, 5]] * n,
                     "loss_mask": [[1, 1, 1]] * n, "thinking_tokens": [think[i % len(think)] for i in range(n)],
                     "solution_tokens": [2] * n, "budget_thinking": [limit[0]] * n, "budget_solution": [limit[1]] * n})


def test_zero_variance_filter_and_refill():
    first = _records({"p1": [1, 0], "p2": [1, 1], "p3": [0, 0]})
    assert zero_variance(first).tolist() == [True, True, False, False, False, False]
    more = [_records({"p4": [0, 1], "p5": [0, 0], "p6": [1, 0], "p7": [0, 1]})]
    kept, m = fill_batch(first, lambda: more.pop(), {"name": "dapo"})
    assert list(dict.fromkeys(kept["prompt_id"].to_pylist())) == ["p1", "p4", "p6"]  # cut to 3 groups
    assert m == {"dynamic_sampling/tries": 2.0, "dynamic_sampling/dropped_groups": 3.0,
                 "dynamic_sampling/kept_groups": 3.0, "dynamic_sampling/padded_groups": 0.0}


def test_dynamic_sampling_bounded_tries_pad_with_dropped_groups():
    first = _records({"p1": [1, 0], "p2": [1, 1], "p3": [0, 0]})
    calls = []

    def flat():
        calls.append(1)
        return _records({f"q{len(calls)}": [0, 0]})

    kept, m = fill_batch(first, flat, {"name": "dapo", "dynamic_sampling": {"max_tries": 3}})
    assert len(calls) == 2 and m["dynamic_sampling/tries"] == 3.0  # the first generation counts
    assert list(dict.fromkeys(kept["prompt_id"].to_pylist())) == ["p1", "p2", "p3"]  # padded with p2, p3
    assert m["dynamic_sampling/padded_groups"] == 2.0 and m["dynamic_sampling/dropped_groups"] == 4.0
    all_flat, m = fill_batch(_records({"p2": [1, 1], "p3": [0, 0]}), flat, {"name": "dapo",
                             "dynamic_sampling": {"max_tries": 1}})  # nothing kept: the batch is all padding
    assert all_flat["prompt_id"].to_pylist() == ["p2"] * 2 + ["p3"] * 2 and m["dynamic_sampling/padded_groups"] == 2
    same, none = fill_batch(first, flat, {"name": "grpo"})  # off: untouched, no draw
    assert same is first and none == {} and len(calls) == 2


def test_group_length_reward_known_values():
    # group a: lengths 10..30, lam = 0.5, 0, -0.5; group b all as long: lam 0
    got = group_length_reward([10, 20, 30, 10, 20, 8, 8], [True, True, True, False, False, True, False],
                              ["a", "a", "a", "a", "a", "b", "b"], weight=0.5)
    np.testing.assert_allclose(got, [0.25, 0.0, -0.25, 0.0, 0.0, 0.0, 0.0])
    wrong_long = group_length_reward([10, 30], [False, False], [0, 0], 1.0)
    assert wrong_long.tolist() == [0.0, -0.5]  # a wrong answer is never paid for being short
    # on="correct": wrong answers get nothing, so an all-wrong group has no reason to be short
    assert group_length_reward([10, 30], [False, False], [0, 0], 1.0, on="correct").tolist() == [0.0, 0.0]
    np.testing.assert_allclose(group_length_reward([10, 20, 30], [True, False, True], [0, 0, 0], 1.0, on="correct"),
                               [0.5, 0.0, -0.5])
    with pytest.raises(ValueError, match="must match"):
        group_length_reward([1, 2], [True], [0, 0], 1.0)


def test_learner_batch_length_reward_prefers_the_shorter_correct_answer():
    recs = _records({"p1": [1, 1], "p2": [1, 0]}, think=(3, 7))  # lengths 5, 9 in each group
    recs = recs.append_column("correct", pa.array([True, True, True, False]))
    batch, m = algorithms.learner_batch(recs, {"name": "dr_grpo", "norm_length": 12})
    assert batch["advantage"].to_pylist()[:2] == [0.0, 0.0]  # same reward: no signal without it
    batch, m = algorithms.learner_batch(recs, {"name": "dr_grpo", "norm_length": 12, "length_reward": 0.4})
    # p1: 1.2 vs 0.8 -> +-0.2; p2: 1.2 (short, correct) vs -0.2 (long, wrong) -> +-0.7
    assert batch["advantage"].to_pylist() == pytest.approx([0.2, -0.2, 0.7, -0.7])
    assert m["length_reward_mean"] == pytest.approx((0.2 - 0.2 + 0.2 - 0.2) / 4)
    with pytest.raises(ValueError, match="algorithm.length_reward=2"):
        algorithms.resolve({"length_reward": 2})
    with pytest.raises(ValueError, match="algorithm.length_reward_on='wrong'"):
        algorithms.resolve({"length_reward_on": "wrong"})


def test_learner_batch_shapes_rewards_before_the_advantage():
    recs = _records({"p1": [1, 0]}, think=(3, 7))  # lengths 5 and 9 of a limit of 12
    batch, m = algorithms.learner_batch(recs, {"name": "dr_grpo", "norm_length": 12})
    assert batch["advantage"].to_pylist() == pytest.approx([0.5, -0.5])
    # overlong: buffer 0.5 x 12 = 6, the 9-token sample is 3 into it: -0.5; dr_grpo's advantage sees 1 vs -0.5
    batch, m = algorithms.learner_batch(recs, {"name": "dr_grpo", "norm_length": 12,
                                               "overlong": {"buffer_fraction": 0.5}})
    assert batch["advantage"].to_pylist() == pytest.approx([0.75, -0.75])
    assert m["overlong_fraction"] == 0.5
    # KL as a reward penalty: 0.1 x summed k1 (0 and 5) off the rewards -> 1 vs -0.5 again
    batch, m = algorithms.learner_batch(recs, {"name": "dr_grpo", "norm_length": 12, "kl_coef": 0.1,
                                               "kl_mode": "reward", "kl_estimator": "k1"},
                                        sequence_kl=lambda b: np.array([0.0, 5.0]))
    assert batch["advantage"].to_pylist() == pytest.approx([0.75, -0.75]) and m["kl_reward_mean"] == 2.5
    assert batch.column_names == ["prompt_token_ids", "response_token_ids", "loss_mask", "advantage"]


def test_learner_sequence_kl_is_the_summed_k1_to_the_reference(model_dir):  # noqa: F811
    from orchestrator.learner.worker import Learner

    batch = make_batch(*random_batch(n=4, seed=3))
    learner = Learner(model_dir, device="cpu", lr=5e-2, micro_batch_size=3,
                      algorithm={"kl_coef": 0.1, "kl_mode": "reward", "kl_estimator": "k1"})
    prompts, responses = batch["prompt_token_ids"].to_pylist(), batch["response_token_ids"].to_pylist()
    masks = batch["loss_mask"].to_pylist()
    ref = learner.sequence_logprobs(prompts, responses)
    assert np.all(learner.sequence_kl(batch.drop_columns(["advantage"])) == 0.0)  # policy == reference
    metrics = learner.step(batch)
    assert metrics["kl"] == 0.0  # in the reward, not in the loss
    new = learner.sequence_logprobs(prompts, responses)
    expected = [sum((a - b) * m for a, b, m in zip(n, r, mk)) for n, r, mk in zip(new, ref, masks)]
    np.testing.assert_allclose(learner.sequence_kl(batch), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3
    with pytest.raises(ValueError, match="algorithm.name='ppo': unknown preset; presets: grpo"):
        Learner(model_dir, device="cpu", algorithm={"name": "ppo"})
    with pytest.raises(ValueError, match="sequence_kl: no reference model"):
        Learner(model_dir, device="cpu").sequence_kl(batch)


# ---- presets and config errors --------------------------------------------------------------------


def test_presets_fill_unset_keys_and_explicit_keys_win():
    assert resolve({"name": "dapo"}).clip_high == 0.28 and resolve({"name": "dapo"}).dynamic_sampling.enabled
    assert resolve({"name": "dapo", "clip_high": 0.3}).clip_high == 0.3
    g = resolve({"name": "gspo"})
    assert (g.policy_loss, g.loss_agg, g.clip_low, g.clip_high) == ("gspo", "seq_mean_token_mean", 3e-4, 4e-4)
    d = resolve(None)
    assert (d.advantage, d.policy_loss, d.loss_agg, d.clip_low, d.clip_high) == ("grpo", "ppo_clip", "token_mean",
                                                                                  0.2, 0.2)
    assert not d.dynamic_sampling.enabled and d.overlong.buffer_fraction == 0.0
    assert resolve(resolve({"name": "rloo"})) == resolve({"name": "rloo"})  # idempotent


@pytest.mark.parametrize("override, expected", [
    ("algorithm.name=ppo", "algorithm.name='ppo': unknown preset; presets: grpo, dr_grpo, dapo, rloo, reinforce_pp, gspo"),
    ("algorithm.advantage=gae", "algorithm.advantage='gae': unknown advantage estimator; registered: grpo, dr_grpo, "
                                "rloo, reinforce_pp"),
    ("algorithm.policy_loss=cispo", "algorithm.policy_loss='cispo': unknown policy loss; registered: ppo_clip, gspo"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg='mean': unknown loss aggregation; registered: token_mean"),
    ("algorithm.kl_estimator=k9", "algorithm.kl_estimator='k9': unknown KL estimator; registered: k1, k2, k3"),
    ("algorithm.kl_mode=both", "algorithm.kl_mode='both': must be one of loss, reward"),
    ("algorithm.dynamic_sampling.filter=any", "algorithm.dynamic_sampling.filter='any': unknown dynamic sampling"),
    ("algorithm.dynamic_sampling.max_tries=0", "algorithm.dynamic_sampling.max_tries=0"),
    ("algorithm.overlong.buffer_fraction=1.5", "algorithm.overlong.buffer_fraction=1.5"),
    ("algorithm.clip_high=-1", "algorithm.clip_high=-1"),
    ("algorithm.normalize_std=false", "algorithm.normalize_std"),  # gone: dr_grpo is the no-std estimator
])
def test_unknown_names_fail_in_config_validation(cfg_file, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, [override])
    assert expected in str(info.value)


def test_loaded_config_holds_the_resolved_preset(cfg_file):
    cfg = load_config(cfg_file, ["algorithm.name=dr_grpo"])
    assert cfg.algorithm.advantage == "dr_grpo" and cfg.algorithm.loss_agg == "seq_mean_token_sum_norm"
    assert cfg.algorithm.norm_length == 16 + 1 + 8  # the longest training response
    cfg = load_config(cfg_file, ["algorithm.kl_mode=reward", "algorithm.kl_estimator=k1", "algorithm.kl_coef=0.1"])
    assert cfg.algorithm.kl_estimator == "k1"  # k1 is fine as a reward penalty


def test_algorithms_command_lists_every_name_with_its_doc():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "algorithms"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for reg in algorithms.REGISTRIES:
        assert f"{reg.title} ({reg.key}):" in out.stdout
        for name, doc in reg.docs():
            assert doc and any(line.split() == [name, *doc.split()] for line in out.stdout.splitlines()), name
    for preset in ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "gspo"):
        assert any(line.split()[:2] == [preset, f"advantage={algorithms.PRESETS[preset]['advantage']}"]
                   for line in out.stdout.splitlines()), preset
