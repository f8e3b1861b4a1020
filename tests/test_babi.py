"""The babi task (bAbI QA1-QA3 in BABILong-style filler): well-posed, hops matter, filler is inert, seeded,
knobs validated; the env ``rlmem/BabiQA-v0`` (the generic env suites in test_envs.py / test_fuzz.py also
run on it)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import rlmem  # noqa: F401  (registers the envs)
from rlmem.lm_tasks import build_task, solve
from rlmem.lm_tasks.solvers import BabiWorld, read_babi
from rlmem.lm_tasks.tasks import (BABI_ACTORS, BABI_FILLER, BABI_ID, BABI_LOCATIONS, BABI_OBJECTS, BABI_WORDS,
                                  BabiQA)

FILLER_IDS = {BABI_ID[w] for group in BABI_FILLER.values() for s in group for w in s if w != "."}
PERIOD, QMARK = BABI_ID["."], BABI_ID["?"]
FACTS = ("move", "grab", "drop")


def sample(seed=0, batch_size=500, **knobs):
    task = build_task("babi", **knobs)
    return (task, *task.sample(np.random.default_rng(seed), batch_size))


def story(row):
    """(facts, question) of one sample, as read by the solver's parser."""
    items = read_babi(row)
    assert items[-1][0].startswith("where") and all(f[0] in FACTS for f in items[:-1])
    return items[:-1], items[-1]


def words(tokens):
    return [BABI_WORDS[t] for t in tokens]


def encode(*sentences):
    """Hand-written stories: each sentence a list of words (multi-word tokens like "picked up" as one)."""
    return np.array([[BABI_ID[w] for s in sentences for w in s]])


# --- well-posedness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("knobs", [{}, {"n_actors": 2, "n_locations": 3, "n_objects": 2, "n_facts": 12,
                                        "seq_len": 96}, {"n_actors": 8, "n_locations": 8, "n_objects": 8}])
def test_solver_answers_every_question_on_many_seeds(hops, knobs):
    for seed in range(10):
        task, inputs, targets, mask = sample(seed, 100, hops=hops, **knobs)
        pred = solve(task, inputs)
        np.testing.assert_array_equal(pred[mask], targets[mask])
        assert (pred[~mask] == -1).all()


def test_the_solver_replays_a_hand_written_story_and_abstains_on_contradictions():
    task = build_task("babi", hops=3, seq_len=40, n_facts=4)
    s = encode(["mary", "went", "to", "kitchen", "."], ["a", "dog", "barked", "."],
               ["mary", "picked up", "the", "apple", "."], ["mary", "moved", "to", "garden", "."],
               ["mary", "dropped", "the", "apple", "."], ["john", "went", "to", "garden", "."],
               ["then"], ["john", "took", "the", "apple", "."], ["john", "journeyed", "to", "kitchen", "."],
               ["where", "was", "the", "apple", "before", "the", "kitchen", "?"])
    # history of the apple: kitchen, garden, kitchen: before the *last* kitchen it was in the garden
    assert BabiQA.decode(s[0]).startswith("mary went to kitchen. a dog barked. mary picked up the apple.")
    assert solve(task, s)[0, -1] == BABI_ID["garden"]
    questions = {"where is mary ?": "garden", "where is john ?": "kitchen", "where is the apple ?": "kitchen",
                 "where was the apple before the garden ?": "kitchen", "where is the milk ?": None,
                 "where was the apple before the hallway ?": None}
    for question, answer in questions.items():
        row = np.concatenate([s[0, :-8], encode(question.split())[0]])[None]
        assert solve(task, row)[0, -1] == (BABI_ID[answer] if answer else -1), question
    # a contradiction (john grabs the apple while mary holds it) makes the solver abstain
    bad = encode(["mary", "went", "to", "kitchen", "."], ["mary", "got", "the", "apple", "."],
                 ["john", "went", "to", "kitchen", "."], ["john", "got", "the", "apple", "."],
                 ["where", "is", "the", "apple", "?"])
    assert solve(task, bad)[0, -1] == -1
    far = encode(["mary", "went", "to", "kitchen", "."], ["mary", "got", "the", "apple", "."],
                 ["mary", "dropped", "the", "apple", "."], ["john", "went", "to", "office", "."],
                 ["john", "got", "the", "apple", "."], ["where", "is", "john", "?"])  # the apple is elsewhere
    assert solve(task, far)[0, -1] == -1


def test_questions_satisfy_their_conditions_and_answers_are_uniform_over_locations():
    for hops in (1, 2, 3):
        task, inputs, targets, _ = sample(1, 3000, hops=hops, n_locations=5)
        answers = targets[:, -1]
        counts = np.bincount(answers - BABI_ID[BABI_LOCATIONS[0]], minlength=5)
        assert len(counts) == 5, "only the first n_locations locations are used"
        # uniform: each count within 5 sigma of 3000 / 5
        assert np.all(np.abs(counts - 600) < 5 * np.sqrt(3000 * 0.2 * 0.8)), counts
        for row in inputs[:300]:
            facts, (kind, entity, where, pos) = story(row)
            assert pos == task.seq_len - 1 and len(facts) == task.n_facts
            world = BabiWorld()
            for fact in facts:
                world.tell(*fact[:3])
            assert world.consistent
            if hops == 1:
                assert kind == "where_actor" and entity in world.actor_at
            elif hops == 2:
                assert kind == "where_object" and entity in world.history
            else:
                assert kind == "where_before" and len(world.history[entity]) >= 3
                assert where in world.history[entity][1:]
                assert world.where_before(entity, where) != where


# --- hops matter -------------------------------------------------------------------------------------
def last_move_of(facts, actor):
    moves = [f[2] for f in facts if f[0] == "move" and f[1] == actor]
    return moves[-1] if moves else None


def one_fact_rule(facts, entity):
    """The location of the last sentence mentioning ``entity``; for an object (its sentences name no place)
    the location of the last move told at or before its last mention ("there")."""
    if entity in BABI_ACTORS:
        return last_move_of(facts, entity)
    last = max(i for i, f in enumerate(facts) if f[2] == entity)
    moves = [f[2] for f in facts[: last + 1] if f[0] == "move"]
    return moves[-1] if moves else None


def two_hop_rule(facts, obj):
    """Where the object is now: its last holder's (or dropper's) location at its last grab / drop."""
    world = BabiWorld()
    for f in facts:
        world.tell(*f[:3])
    return world.where_object(obj)


def accuracy(rule, hops, **knobs):
    task, inputs, targets, _ = sample(2, 1000, hops=hops, **knobs)
    right = []
    for row, target in zip(inputs, targets[:, -1]):
        facts, (_, entity, _, _) = story(row)
        right.append(rule(facts, entity) == BABI_WORDS[target])
    return float(np.mean(right))


@pytest.mark.parametrize("knobs", [{}, {"n_actors": 3, "n_locations": 4, "n_objects": 3, "n_facts": 12,
                                        "seq_len": 96}])
def test_hops_matter(knobs):
    # hops 1: one fact (the actor's last move) is enough
    assert accuracy(one_fact_rule, 1, **knobs) == 1.0
    # hops 2: one fact is not enough (measured 0.47 at the defaults); who holds it + where they are is
    assert accuracy(one_fact_rule, 2, **knobs) < 0.7
    assert accuracy(lambda facts, _: [f[2] for f in facts if f[0] == "move"][-1], 2, **knobs) < 0.7  # last place
    assert accuracy(two_hop_rule, 2, **knobs) == 1.0
    # hops 3: where the object is now is almost never where it was before the asked place (measured 0.12)
    assert accuracy(two_hop_rule, 3, **knobs) < 0.3
    assert accuracy(one_fact_rule, 3, **knobs) < 0.6
    # nor is it always where the object was first picked up (2 facts; measured 0.45)
    assert accuracy(lambda facts, obj: history_of(facts, obj)[0], 3, **knobs) < 0.7


def history_of(facts, obj):
    world = BabiWorld()
    for f in facts:
        world.tell(*f[:3])
    return world.history[obj]


# --- filler ------------------------------------------------------------------------------------------
def without_filler(row):
    """The sample with its filler removed: sentences made of filler words only, and a leading "then"."""
    kept, sentence = [], []
    for tok in row.tolist():
        sentence.append(tok)
        if tok in (PERIOD, QMARK):
            if any(t not in FILLER_IDS and t != PERIOD for t in sentence):
                kept += [t for t in sentence if t not in FILLER_IDS]
            sentence = []
    return np.array(kept)


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_filler_never_changes_the_answer(hops):
    task, inputs, targets, mask = sample(3, 300, hops=hops, seq_len=128)
    question_len = BabiQA.QUESTION_LEN[hops]
    gaps = []
    for row, target in zip(inputs, targets[:, -1]):
        bare = without_filler(row)
        assert len(bare) == 5 * task.n_facts + question_len  # exactly the facts and the question are left
        assert solve(task, bare[None])[0, -1] == target
        # every token outside the facts and the question is a filler word or a filler sentence's period
        covered = np.zeros(len(row), bool)
        for kind, *_, pos in read_babi(row):
            if kind.startswith("where"):
                covered[pos - question_len + 1 : pos + 1] = True
            else:
                covered[pos : pos + 5] = True
        assert set(row[~covered].tolist()) <= FILLER_IDS | {PERIOD}
        starts = [pos for kind, *_, pos in read_babi(row) if kind in FACTS]
        gaps.append(starts[0])
    # the facts really are spread through the filler (not all at the start)
    assert np.mean(gaps) > 5


def test_filler_words_are_disjoint_from_the_world():
    world = {BABI_ID[w] for w in (*BABI_ACTORS, *BABI_LOCATIONS, *BABI_OBJECTS, "to", "the", "where", "is", "was",
                                  "before", "?")}
    assert not FILLER_IDS & world
    assert len(BABI_WORDS) == build_task("babi").vocab_size == 87


# --- seeds and knobs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [1, 2, 3])
def test_deterministic_under_a_seed(hops):
    a, b, c = (sample(seed, 16, hops=hops)[1:] for seed in (7, 7, 8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"hops": 0}, r"hops must be in \[1, 3\]"),
        ({"hops": 4}, r"hops must be in \[1, 3\]"),
        ({"hops": 2.0}, r"hops must be an integer in \[1, 3\]"),
        ({"seq_len": 43}, r"seq_len must be in \[44, inf\] \(at least 5 \* n_facts \+ 4 with n_facts=8 and hops=1"),
        ({"hops": 3, "seq_len": 47}, r"seq_len must be in \[48, inf\]"),
        ({"hops": 3, "n_facts": 3}, r"n_facts must be in \[4, inf\] \(at least 4 with hops=3"),
        ({"hops": 2, "n_facts": 1}, r"n_facts must be in \[2, inf\]"),
        ({"n_actors": 0}, r"n_actors must be in \[1, 8\]"),
        ({"n_actors": 9}, r"n_actors must be in \[1, 8\]"),
        ({"n_locations": 1}, r"n_locations must be in \[2, 8\]"),
        ({"n_objects": 9}, r"n_objects must be in \[1, 8\]"),
        ({"n_facts": "8"}, r"n_facts must be an integer"),
    ],
)
def test_bad_knobs_raise_naming_the_valid_range(knobs, match):
    with pytest.raises(ValueError, match=match):
        build_task("babi", **knobs)


def test_knobs_round_trip_and_chance():
    task = build_task("babi", hops=2, n_locations=5)
    assert build_task("babi", **task.knobs()).knobs() == task.knobs() == {
        "hops": 2, "seq_len": 64, "n_facts": 8, "n_actors": 4, "n_locations": 5, "n_objects": 4}
    assert task.chance_accuracy() == pytest.approx(0.2) and task.n_answers == 1


def test_minimal_stories_have_no_filler_and_one_filler_token_is_then():
    task, inputs, _, _ = sample(0, 50, hops=3, seq_len=28, n_facts=4)
    assert not set(inputs.ravel().tolist()) & FILLER_IDS
    task, inputs, _, _ = sample(0, 50, hops=1, seq_len=10, n_facts=1)
    assert all(words(row).count("then") == 1 for row in inputs)


# --- the env ------------------------------------------------------------------------------------------
def test_env_spaces_returns_and_presets():
    env = gym.make("rlmem/BabiQA-v0")
    task = env.unwrapped.task
    assert env.action_space.n == 87 and env.observation_space.shape == (88,)
    assert task.optimal_return() == 1.0 and task.chance_return() == pytest.approx(1 / 87)
    hops = [gym.make("rlmem/BabiQA-v0", difficulty=d).unwrapped.knobs()["hops"] for d in ("easy", "medium", "hard")]
    lengths = [gym.make("rlmem/BabiQA-v0", difficulty=d).unwrapped.knobs()["seq_len"]
               for d in ("easy", "medium", "hard")]
    assert hops == [1, 2, 3] and lengths == sorted(lengths)


def test_env_rewards_only_the_right_location_at_the_question():
    env = gym.make("rlmem/BabiQA-v0", hops=2)
    for seed in range(5):
        env.reset(seed=seed)
        state = env.unwrapped.get_state()
        answer = int(state["targets"][-1])
        assert BABI_WORDS[answer] in BABI_LOCATIONS
        for t in range(len(state["inputs"]) - 1):
            _, r, term, _, _ = env.step(answer)  # the right word too early earns nothing
            assert r == 0.0 and not term
        wrong = gym.make("rlmem/BabiQA-v0", hops=2)
        wrong.reset(seed=seed)
        for _ in range(len(state["inputs"]) - 1):
            wrong.step(0)
        assert wrong.step((answer + 1) % 87)[1:3] == (0.0, True)
        assert env.step(answer)[1:3] == (1.0, True)
