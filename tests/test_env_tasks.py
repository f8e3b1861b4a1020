"""Task-specific checks beyond the generic ones in ``test_envs.py``: T-maze cue / junction / penalty logic,
the card tasks step for step against POPGym on the same deal, CartPole physics against Gymnasium's
CartPole-v1, bsuite-style MemoryLength, the presets and the env configs."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import popgym.envs as popgym_envs
import pytest
import yaml

import rlmem  # noqa: F401  (registers the envs)
from rlmem.envs.cards import AutoencodeTask, CountRecallTask, RepeatFirstTask, RepeatPreviousTask
from rlmem.envs.cartpole import PositionOnlyCartPoleTask, random_policy_lengths
from rlmem.envs.tmaze import DOWN, LEFT, RIGHT, UP, random_policy_return
from rlmem.conf import CONF_DIR

CONF = CONF_DIR / "env"


def play(env_id, actions, seed=0, setup=None, **kwargs):
    """Observations (reset's first), rewards and terminated flags of ``actions`` played in one episode.

    ``setup(task)`` may overwrite the episode's hidden draws right after the reset.
    """
    env = gym.make(env_id, **kwargs).unwrapped
    env.reset(seed=seed)
    if setup is not None:
        setup(env.task)
    obs, rewards, terms = [env.task.observe()[0]], [], []
    for a in actions:
        o, r, term, trunc, _ = env.step(a)
        obs.append(o)
        rewards.append(r)
        terms.append(term)
        assert not trunc
    return np.array(obs), rewards, terms


def set_goal(goal_y):
    def setup(task):
        task.episode["goal_y"][:] = goal_y

    return setup


# --- T-maze -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("goal_y", [1, -1])
def test_tmaze_passive_cue_at_start_goal_reward_at_the_junction(goal_y):
    turn, wrong = (UP, DOWN) if goal_y == 1 else (DOWN, UP)
    obs, rewards, terms = play("rlmem/TMazePassive-v0", [RIGHT] * 3 + [turn], setup=set_goal(goal_y),
                               corridor_length=3)
    np.testing.assert_array_equal(obs, [[0, goal_y], [0, 0], [0, 0], [1, 0], [1, goal_y]])
    assert rewards == [0, 0, 0, 1.0] and terms == [False, False, False, True]
    _, rewards, terms = play("rlmem/TMazePassive-v0", [RIGHT] * 3 + [wrong], setup=set_goal(goal_y),
                             corridor_length=3)
    assert rewards[-1] == 0.0 and terms[-1]


def test_tmaze_passive_penalises_lagging_and_ends_on_time():
    # a left move at the oracle is a wall: the agent stays behind schedule for the rest of the episode
    obs, rewards, terms = play("rlmem/TMazePassive-v0", [LEFT, RIGHT, RIGHT, RIGHT, UP], setup=set_goal(1),
                               corridor_length=4, penalty=-0.25)
    np.testing.assert_array_equal(obs[1], [0, 0])  # the cue is only shown on the first visit
    assert rewards == [-0.25] * 4 + [0.0]  # never reaches the junction in time
    assert terms == [False] * 4 + [True]


def test_tmaze_active_cue_behind_an_exploration_step():
    actions = [LEFT] + [RIGHT] * 4 + [DOWN]
    obs, rewards, terms = play("rlmem/TMazeActive-v0", actions, setup=set_goal(-1), corridor_length=3)
    np.testing.assert_array_equal(obs[:3], [[0, 0], [0, -1], [0, 0]])  # start, oracle, back on the corridor
    np.testing.assert_array_equal(obs[-2:], [[1, 0], [1, -1]])
    assert rewards == [0, 0, 0, 0, 0, 1.0] and terms == [False] * 5 + [True]
    # skipping the oracle: no cue is ever shown, and the episode still lasts L + 3 steps
    obs, rewards, terms = play("rlmem/TMazeActive-v0", [RIGHT] * 5 + [DOWN], setup=set_goal(-1),
                               corridor_length=3)
    assert not np.any(obs[:, 1][obs[:, 0] == 0])
    assert rewards[:5] == [0.0] * 5 and terms == [False] * 5 + [True]


def test_tmaze_default_penalty_and_exact_chance_return():
    task = gym.make("rlmem/TMazePassive-v0", corridor_length=8).unwrapped.task
    assert task.penalty == pytest.approx(-1 / 8)
    # passive: x_t < t unless all t moves were "right" (prob 4^-t); the goal needs L rights then one turn
    length = 8
    closed_form = -(length - (1 - 4.0**-length) / 3) / length + 4.0**-length / 4
    assert random_policy_return(length, 0, 1.0, -1 / length) == pytest.approx(closed_form, rel=1e-12)


# --- cards: step for step against POPGym on the same deal ---------------------------------------------
class DealAs:
    """Stands in for ``np.random.Generator`` in ``sample_episode``: shuffles into POPGym's deal orders."""

    def __init__(self, *decks):
        self.orders = [deck.idx[::-1].copy() for deck in decks]  # POPGym deals from the end of ``idx``

    def permutation(self, cards):
        (order,) = self.orders
        return cards[order]

    def permuted(self, decks, axis):
        assert axis == 1 and len(decks) == len(self.orders)
        return np.stack([deck[order] for deck, order in zip(decks, self.orders)])


CARD_CASES = [  # (POPGym class, our task, our kwargs, the POPGym decks whose deal we replay)
    ("RepeatPreviousEasy", RepeatPreviousTask, {"k": 4}, ["deck"]),
    ("RepeatPreviousMedium", RepeatPreviousTask, {"difficulty": "medium"}, ["deck"]),
    ("RepeatFirstEasy", RepeatFirstTask, {}, ["deck"]),
    ("CountRecallEasy", CountRecallTask, {}, ["value_deck", "query_deck"]),
    ("CountRecallHard", CountRecallTask, {"difficulty": "hard"}, ["value_deck", "query_deck"]),
    ("AutoencodeEasy", AutoencodeTask, {}, ["deck"]),
]


def expected_obs(popgym_name, popgym_obs, task):
    """POPGym's integer observation in our one-hot layout (during Autoencode's play: blank cards, flag on)."""
    if popgym_name.startswith("CountRecall"):
        value, query = popgym_obs
        return np.concatenate([np.eye(task.n_categories)[value], np.eye(task.n_categories)[query]])
    if popgym_name.startswith("Autoencode"):
        watching, suit = popgym_obs
        played = task.t[0] >= task.num_cards  # POPGym shows a dummy suit 0 while playing; we blank it
        assert watching == (task.t[0] < task.num_cards - 1)  # POPGym's flag is ours, inverted
        return np.append(np.zeros(4) if played else np.eye(4)[suit], 1 - watching)
    return np.eye(4)[popgym_obs]


@pytest.mark.parametrize("popgym_name,task_cls,kwargs,decks", CARD_CASES)
def test_card_tasks_match_popgym_step_for_step(popgym_name, task_cls, kwargs, decks):
    ref = getattr(popgym_envs, popgym_name)()
    task = task_cls(num_envs=1, **kwargs)
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(2):
            ref_obs, _ = ref.reset(seed=seed)
            task.reset_envs(np.array([0]), [DealAs(*(getattr(ref, d) for d in decks))])
            for step in range(ref.max_episode_length + 1):
                want = expected_obs(popgym_name, ref_obs, task)
                np.testing.assert_array_equal(task.observe()[0], want, err_msg=f"step {step}")
                if step == ref.max_episode_length:
                    break
                # the right answer half the time so both reward signs are exercised
                action = task.oracle_action() if rng.random() < 0.5 else rng.integers(task.action_space.n, size=1)
                ref_obs, ref_r, ref_term, _, _ = ref.step(int(action[0]))
                r, term, _ = task.step(task.check_action(action))
                assert r[0] == pytest.approx(ref_r, abs=1e-12) and term[0] == ref_term, f"step {step}"
            assert term[0]


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
@pytest.mark.parametrize("name", ["RepeatPrevious", "RepeatFirst", "CountRecall", "Autoencode",
                                  "PositionOnlyCartPole"])
def test_presets_match_popgym(name, difficulty):
    ref = getattr(popgym_envs, name + difficulty.capitalize())()
    env = gym.make(f"rlmem/{name}-v0", difficulty=difficulty).unwrapped
    task = env.task
    assert env.action_space == ref.action_space
    if name == "PositionOnlyCartPole":
        assert task.max_episode_length == ref.max_episode_length
        assert env.observation_space == ref.observation_space
        return
    deck = ref.value_deck if name == "CountRecall" else ref.deck
    assert task.num_cards == deck.num_cards
    if name == "RepeatPrevious":
        assert task.k == ref.k
    if name == "CountRecall":
        assert task.n_categories == ref.num_distinct_cards


def test_count_recall_answer_counts_the_value_cards_dealt_so_far():
    task = CountRecallTask(num_envs=2, deck_type="ranks", num_decks=2)
    task.reset_envs(np.arange(2), [np.random.default_rng(s) for s in range(2)])
    values, queries = task.episode["deal"][:, 0], task.episode["deal"][:, 1]
    for t in range(task.num_cards - 1):
        want = [np.sum(values[i, : t + 1] == queries[i, t]) for i in range(2)]
        np.testing.assert_array_equal(task.oracle_action(), want)
        reward, term, _ = task.step(task.oracle_action())
        np.testing.assert_allclose(reward, 1 / (task.num_cards - 1))
    assert term.all() and task.action_space.n == 8 + 1 and task.chance_return() == pytest.approx(2 / 9 - 1)


# --- PositionOnlyCartPole ----------------------------------------------------------------------------
def test_cartpole_physics_equal_gymnasium_cartpole_v1():
    ours = gym.make("rlmem/PositionOnlyCartPole-v0", max_episode_length=300)
    ref = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    for seed in range(20):
        obs, _ = ours.reset(seed=seed)
        ref_obs, _ = ref.reset(seed=seed)
        np.testing.assert_array_equal(ours.unwrapped.get_state()["state"], ref.unwrapped.state)
        np.testing.assert_array_equal(obs, ref_obs[[0, 2]])
        done = False
        while not done:
            a = int(rng.integers(2))
            obs, r, term, trunc, _ = ours.step(a)
            ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(a)
            np.testing.assert_array_equal(ours.unwrapped.get_state()["state"], ref.unwrapped.state)
            np.testing.assert_array_equal(obs, ref_obs[[0, 2]])
            assert (r, term, trunc) == (ref_r, ref_term, ref_trunc)
            done = term or trunc


def test_cartpole_truncates_at_the_cap():
    env = gym.make("rlmem/PositionOnlyCartPole-v0", max_episode_length=250).unwrapped
    env.reset(seed=0)
    total, steps, trunc, term = 0.0, 0, False, False
    while not (term or trunc):
        _, r, term, trunc, _ = env.step(int(env.task.oracle_action()[0]))
        total, steps = total + r, steps + 1
    assert (steps, total, term, trunc) == (250, 250.0, False, True)


def test_cartpole_chance_return_is_the_measured_random_policy_mean():
    lengths = random_policy_lengths(20_000, seed=123)
    sem = lengths.std() / np.sqrt(len(lengths))
    assert lengths.mean() == pytest.approx(PositionOnlyCartPoleTask().chance_return(), abs=4 * sem)
    assert lengths.max() < 200  # so the caps allowed (>= 200) do not change it


def test_plain_cartpole_config_is_the_gymnasium_mdp():
    conf = yaml.safe_load((CONF / "cartpole.yaml").read_text())
    assert conf == {"id": "CartPole-v1"}
    assert gym.make(conf["id"]).observation_space.shape == (4,)


# --- MemoryLength ------------------------------------------------------------------------------------
def test_memory_length_context_noise_query_and_reward():
    env = gym.make("rlmem/MemoryLength-v0", memory_length=5, num_bits=3).unwrapped
    obs, _ = env.reset(seed=3)
    state = env.get_state()
    bits, query = state["bits"], state["query"]
    np.testing.assert_array_equal(obs, np.concatenate([[1.0], [0, 0, 0], 2 * bits[0] - 1]))
    for t in range(1, 6):
        obs, r, term, _, _ = env.step(0)
        assert r == 0.0 and not term
        assert obs[0] == pytest.approx(1 - t / 5)
        np.testing.assert_array_equal(obs[4:], 2 * bits[t] - 1)
        np.testing.assert_array_equal(obs[1:4], np.eye(3)[query] if t == 5 else 0)
    _, r, term, _, _ = env.step(int(1 - bits[0, query]))
    assert (r, term) == (-1.0, True)

