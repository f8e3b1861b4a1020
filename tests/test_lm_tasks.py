"""The synthetic LM tasks: well-posed (a rule-based solver scores 100%), seeded, shaped as documented."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlmem  # noqa: F401  (registers the envs)
from rlmem.lm_tasks import IGNORE_INDEX, available_tasks, build_task, solve
from rlmem.lm_tasks.tasks import BLANK, sample_without_replacement

# per task: the defaults, edge cases (no delay, one item, minimal lengths, few queries) and a bigger one
CONFIGS = [
    ("copy_memory", {}),
    ("copy_memory", {"n_items": 1, "delay": 0, "vocab_size": 4}),
    ("copy_memory", {"n_items": 12, "delay": 40, "vocab_size": 30}),
    ("assoc_recall", {}),
    ("assoc_recall", {"seq_len": 3, "n_pairs": 1, "vocab_size": 4}),
    ("assoc_recall", {"seq_len": 20, "n_pairs": 8, "n_queries": 3, "vocab_size": 18}),
    ("assoc_recall", {"seq_len": 256, "n_pairs": 16, "vocab_size": 8192}),
    ("selective_copy", {}),
    ("selective_copy", {"seq_len": 2, "n_items": 1, "vocab_size": 4}),
    ("selective_copy", {"seq_len": 16, "n_items": 8, "vocab_size": 5}),
    ("induction_head", {}),
    ("induction_head", {"seq_len": 3, "vocab_size": 3}),
    ("induction_head", {"seq_len": 256, "vocab_size": 4}),
    ("babi", {}),
    ("babi", {"hops": 2}),
    ("babi", {"hops": 3}),
    ("babi", {"hops": 1, "seq_len": 9, "n_facts": 1, "n_actors": 1, "n_locations": 2, "n_objects": 1}),
    ("babi", {"hops": 2, "seq_len": 15, "n_facts": 2, "n_actors": 1, "n_locations": 2, "n_objects": 1}),
    ("babi", {"hops": 3, "seq_len": 28, "n_facts": 4, "n_actors": 1, "n_locations": 2, "n_objects": 1}),
    ("babi", {"hops": 3, "seq_len": 512, "n_facts": 80, "n_actors": 8, "n_locations": 8, "n_objects": 8}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]


def batches(task, n, batch_size=64, seed=0):
    stream = task.batches(batch_size, seed)
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize(("name", "knobs"), CONFIGS, ids=IDS)
def test_solver_scores_100_percent(name, knobs):
    task = build_task(name, **knobs)
    for inputs, targets, mask in batches(task, 20):
        pred = torch.from_numpy(solve(task, inputs))
        assert torch.equal(pred[mask], targets[mask]), f"{task}: solver wrong on {(pred[mask] != targets[mask]).sum()} answers"
        # the answer positions can be read off the input too (the solver claims nothing elsewhere)
        assert (pred[~mask] == -1).all()


@pytest.mark.parametrize(("name", "knobs"), CONFIGS, ids=IDS)
def test_shapes_dtypes_and_masks(name, knobs):
    task = build_task(name, **knobs)
    inputs, targets, mask = batches(task, 1, batch_size=16)[0]
    shape = (16, task.seq_len)
    assert inputs.shape == targets.shape == mask.shape == shape
    assert inputs.dtype == targets.dtype == torch.long and mask.dtype == torch.bool
    assert inputs.min() >= 0 and inputs.max() < task.vocab_size
    assert (mask.sum(1) == task.n_answers).all()
    assert (targets[~mask] == IGNORE_INDEX).all()
    assert targets[mask].min() >= 0 and targets[mask].max() < task.vocab_size
    assert 0 < task.chance_accuracy() < 1


@pytest.mark.parametrize("name", sorted({n for n, _ in CONFIGS}))
def test_deterministic_under_seed_and_different_across_seeds(name):
    task = build_task(name)
    a, b, c = batches(task, 3, 8, seed=5), batches(task, 3, 8, seed=5), batches(task, 3, 8, seed=6)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not all(torch.equal(x.inputs, z.inputs) for x, z in zip(a, c))
    # consecutive batches of one stream differ too
    assert not torch.equal(a[0].inputs, a[1].inputs)


def test_mqar_keys_unique_values_disjoint_queries_later():
    task = build_task("assoc_recall", seq_len=48, n_pairs=10, n_queries=6, vocab_size=32)
    n, half = task.n_pairs, task.vocab_size // 2
    for inputs, targets, mask in batches(task, 10):
        keys, values = inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2]
        assert ((keys >= 1) & (keys < half)).all() and (values >= half).all()
        for row in range(inputs.shape[0]):
            assert len(set(keys[row].tolist())) == n, "keys must be drawn without replacement"
            assert len(set(values[row].tolist())) == n
            queried = inputs[row][mask[row]].tolist()
            assert len(set(queried)) == task.n_queries and set(queried) <= set(keys[row].tolist())
            pair = dict(zip(keys[row].tolist(), values[row].tolist()))
            assert [pair[k] for k in queried] == targets[row][mask[row]].tolist()
        assert not mask[:, : 2 * n].any(), "queries come after the context"
        assert (inputs[:, 2 * n :][~mask[:, 2 * n :]] == BLANK).all()


def test_induction_trigger_occurs_once_before_the_end():
    task = build_task("induction_head", seq_len=40, vocab_size=5)
    for inputs, targets, _ in batches(task, 10):
        trigger = inputs[:, -1:]
        assert ((inputs[:, :-1] == trigger).sum(1) == 1).all()
        pos = (inputs[:, :-1] == trigger).long().argmax(1)
        assert (pos <= task.seq_len - 3).all()
        assert torch.equal(inputs[torch.arange(len(pos)), pos + 1], targets[:, -1])
        assert (targets[:, -1] != trigger[:, 0]).all()


def test_selective_copy_scatters_exactly_n_items():
    task = build_task("selective_copy", seq_len=30, n_items=6, vocab_size=8)
    inputs, targets, mask = batches(task, 1)[0]
    context = inputs[:, : task.seq_len - task.n_items]
    assert ((context >= 2).sum(1) == task.n_items).all()
    assert torch.equal(context[context >= 2].view(-1, task.n_items), targets[mask].view(-1, task.n_items))


def test_solvers_reject_ambiguous_inputs():
    """The seed repo's defects (a key drawn twice, a reused trigger) make the solvers abstain."""
    mqar = build_task("assoc_recall", seq_len=8, n_pairs=2, vocab_size=8)
    x = np.array([[1, 5, 1, 6, 0, 1, 0, 0]])  # key 1 paired with 5 and with 6
    assert solve(mqar, x)[0, 5] == -1
    ind = build_task("induction_head", seq_len=6, vocab_size=4)
    x = np.array([[2, 3, 2, 1, 0, 2]])  # trigger 2 occurs twice before the end
    assert solve(ind, x)[0, -1] == -1


@pytest.mark.parametrize(
    ("name", "knobs", "match"),
    [
        ("copy_memory", {"n_items": 0}, "n_items"),
        ("copy_memory", {"delay": -1}, "delay"),
        ("copy_memory", {"vocab_size": 3}, "vocab_size"),
        ("copy_memory", {"delay": 2.5}, "delay"),
        ("assoc_recall", {"n_pairs": 40, "vocab_size": 64}, "n_pairs"),  # only 31 keys
        ("assoc_recall", {"seq_len": 16, "n_pairs": 8}, "seq_len"),
        ("assoc_recall", {"n_queries": 0}, "n_queries"),
        ("assoc_recall", {"seq_len": 20, "n_pairs": 8, "n_queries": 5}, "n_queries"),  # 4 free slots
        ("selective_copy", {"seq_len": 15, "n_items": 8}, "seq_len"),
        ("induction_head", {"seq_len": 2}, "seq_len"),
        ("induction_head", {"vocab_size": 2}, "vocab_size"),
        ("copy_memory", {"seq_len": 10}, "valid: .*n_items"),
        ("babi", {"hops": 4}, r"hops must be in \[1, 3\]"),
        ("babi", {"hops": 3, "n_facts": 3}, r"n_facts must be in \[4, inf\] .*hops=3"),
        ("babi", {"seq_len": 43}, r"seq_len must be in \[44, inf\] .*n_facts=8"),
        ("babi", {"n_locations": 1}, r"n_locations must be in \[2, 8\]"),
        ("nope", {}, "valid choices: assoc_recall, babi, copy_memory"),
    ],
)
def test_invalid_knobs_raise_naming_the_valid_values(name, knobs, match):
    with pytest.raises(ValueError, match=match):
        build_task(name, **knobs)


def test_registry_and_round_trip():
    assert available_tasks() == ["assoc_recall", "babi", "copy_memory", "induction_head", "selective_copy"]
    task = build_task("assoc_recall", seq_len=40, n_pairs=5)
    assert build_task(task.name, **task.knobs()).knobs() == task.knobs() == {
        "seq_len": 40, "n_pairs": 5, "n_queries": 5, "vocab_size": 64,
    }


def test_sample_without_replacement():
    rng = np.random.default_rng(0)
    for population, k in [(10, 10), (100, 7), (5, 1)]:
        draws = sample_without_replacement(rng, 200, population, k)
        assert draws.shape == (200, k) and draws.min() >= 0 and draws.max() < population
        assert all(len(set(row)) == k for row in draws.tolist())
    # uniform over positions: every value shows up as the first draw
    assert set(sample_without_replacement(rng, 500, 10, 3)[:, 0].tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("env_id", "name"),
    [("rlmem/CopyMemory-v0", "copy_memory"), ("rlmem/AssocRecall-v0", "assoc_recall"),
     ("rlmem/SelectiveCopy-v0", "selective_copy"), ("rlmem/InductionHead-v0", "induction_head"),
     ("rlmem/BabiQA-v0", "babi")],
)
def test_env_episode_is_a_generator_sample_and_the_solver_solves_it(env_id, name):
    """The env draws its episode with the generator's rules; the solver, fed the observed tokens, earns
    the optimal return."""
    env = gym.make(env_id)
    task = env.unwrapped.task.lm
    assert task.name == name
    obs, _ = env.reset(seed=3)
    expected = task.sample(np.random.default_rng(3), 1)[0][0]
    np.testing.assert_array_equal(env.unwrapped.get_state()["inputs"], expected)
    tokens, total, done = [], 0.0, False
    while not done:
        tokens.append(int(obs[:-1].argmax()))
        pred = solve(task, np.array([tokens + [0] * (task.seq_len - len(tokens))]))[0, len(tokens) - 1]
        assert (pred != -1) == bool(obs[-1]), "the flag channel marks exactly the answer positions"
        obs, r, term, trunc, _ = env.step(max(int(pred), 0))
        total, done = total + r, term or trunc
    assert total == task.n_answers == env.unwrapped.task.optimal_return()
