"""POPGym's card memory tasks (Morad et al. 2023): RepeatPrevious, RepeatFirst, CountRecall, Autoencode.

Each episode deals, one card per step, a shuffled deck of ``52 * num_decks`` cards (13 ranks x 4 suits
per deck, so a card's suit, colour and rank are drawn without replacement, as in POPGym). The episode
lengths and reward scales are POPGym's: every scored step is worth ``+-1 / (number of scored steps)``,
so a perfect policy returns 1 and a wrong answer on every step -1. Difficulty presets are POPGym's
Easy / Medium / Hard classes, as the ``difficulty`` kwarg.

Cards are shown one-hot (float32) rather than as POPGym's integer ids. With ``C = 52 * num_decks`` cards
and ``c_0 .. c_{C-1}`` the deal order (``c_0`` is shown by reset, ``c_i`` after step ``i``):

- RepeatPrevious (``k``): ``C - 1`` steps; the action at step ``i >= k`` must name the suit of
  ``c_{i-k}``, the card shown ``k - 1`` observations before the latest one. Steps ``i < k`` score 0.
- RepeatFirst: ``C - 1`` steps; every action must name the suit of ``c_0``.
- CountRecall (``deck_type``): a value deck and an independent query deck are dealt together; each
  observation shows a value card and a query card (their colour, suit or rank). The action at step ``i``
  must say how many value cards so far (``c_0 .. c_{i-1}``, the one on show included) share the
  category of the query card on show.
- Autoencode: ``C - 1`` watch steps deal the cards, then ``C`` play steps must name their suits in
  reverse order. A flag channel turns on when playing starts (the step that deals the last card);
  during play the card channels are blank.

A uniformly random (memoryless) policy is right with probability ``1 / n_actions`` on every scored step,
so its expected return is ``2 / n_actions - 1``: -0.5 for the suit tasks.

Implementation: at reset, each new episode's observation and correct action at every step are laid out
in one batched pass over the reset rows; a step is then a few indexed reads.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_int

DECK_SIZE, N_SUITS, N_RANKS, N_COLORS = 52, 4, 13, 2


def card_categories(num_decks: int, deck_type: str) -> np.ndarray:
    """Category of every card id ``[52 * num_decks]``, laid out as ``popgym.core.deck.Deck`` does."""
    card = np.arange(DECK_SIZE * num_decks)
    if deck_type == "suits":
        return card % N_SUITS
    if deck_type == "ranks":
        return (card // N_SUITS) % N_RANKS
    if deck_type == "colors":
        return card % N_COLORS
    raise ValueError(f"deck_type must be one of ['colors', 'ranks', 'suits'], got {deck_type!r}")


class CardTask(MemoryTask):
    """Shared machinery. Subclasses draw the deal in ``sample_episode`` and define, for rows ``idx`` at
    reset, every step's observation (:meth:`observations`, ``[n, T + 1, obs_dim]``) and correct action
    (:meth:`targets`, ``[n, T]``); ``scored: [T]`` (0/1) marks the steps that earn +-``1 / n_scored``."""

    defaults = {"num_decks": 1}
    presets = {"easy": {"num_decks": 1}, "medium": {"num_decks": 2}, "hard": {"num_decks": 3}}
    test_kwargs = {"num_decks": 1}
    invalid_kwargs = [{"num_decks": 0}, {"num_decks": "two"}]

    def __init__(self, num_envs, num_decks, n_categories=N_SUITS):
        super().__init__(num_envs)
        self.num_decks = check_int("num_decks", num_decks, low=1)
        self.num_cards = DECK_SIZE * self.num_decks
        self.n_categories = n_categories
        self.suits = card_categories(self.num_decks, "suits")
        self._eye = np.eye(n_categories, dtype=np.float32)
        self._rows = np.arange(num_envs)

    def _setup(self, episode_length: int, scored: np.ndarray, obs_dim: int, n_actions: int) -> None:
        """Spaces and the per-step buffers, once the subclass knows its sizes."""
        self.episode_length = episode_length
        self.scored = scored.astype(bool)
        # reward by [step, wrong / right]: +-1 / n_scored on scored steps, exactly 0.0 elsewhere
        self._rewards = np.where(self.scored[:, None], np.array([-1.0, 1.0]) / self.scored.sum(), 0.0)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(n_actions)
        self.obs_seq = np.zeros((self.num_envs, episode_length + 1, obs_dim), dtype=np.float32)
        self.target = np.zeros((self.num_envs, episode_length), dtype=np.int64)
        # flat views and row offsets: ``take`` on a flat index is several times faster than [rows, t]
        self._obs_flat, self._obs_offset = self.obs_seq.reshape(-1, obs_dim), self._rows * (episode_length + 1)
        self._target_flat, self._target_offset = self.target.reshape(-1), self._rows * episode_length

    def sample_episode(self, rng):
        return {"cards": rng.permutation(self.suits)}  # suits in deal order

    def observations(self, idx: np.ndarray) -> np.ndarray:
        """Observation at every step ``t = 0 .. T`` of rows ``idx``: ``[n, T + 1, obs_dim]``."""
        return self._eye[self.episode["cards"][idx]]

    def targets(self, idx: np.ndarray) -> np.ndarray:
        """Correct action at every step ``t = 0 .. T - 1`` of rows ``idx`` (any value where unscored)."""
        raise NotImplementedError

    def reset_envs(self, idx, rngs):
        super().reset_envs(idx, rngs)
        self.obs_seq[idx] = self.observations(idx)
        self.target[idx] = self.targets(idx)

    def get_state(self):
        return {**super().get_state(), "target": self.oracle_action()}

    def observe(self):
        return self._obs_flat.take(self._obs_offset + np.minimum(self.t, self.episode_length), axis=0)

    def step(self, action):
        t = np.minimum(self.t, self.episode_length - 1)  # rows past their episode are discarded anyway
        correct = action == self._target_flat.take(self._target_offset + t)
        reward = self._rewards[t, correct.view(np.uint8)]  # as 0/1 column indices, not a mask
        self.t += 1
        return reward, self.t >= self.episode_length, np.zeros(self.num_envs, dtype=bool)

    def oracle_action(self):
        return self._target_flat.take(self._target_offset + np.minimum(self.t, self.episode_length - 1))

    def optimal_return(self):
        return 1.0

    def chance_return(self):
        return 2.0 / self.action_space.n - 1.0


class RepeatPreviousTask(CardTask):
    defaults = {"num_decks": 1, "k": 4}
    presets = {  # POPGym RepeatPreviousEasy / Medium / Hard
        "easy": {"num_decks": 1, "k": 4},
        "medium": {"num_decks": 2, "k": 32},
        "hard": {"num_decks": 3, "k": 64},
    }
    test_kwargs = {"num_decks": 1, "k": 2}
    invalid_kwargs = [{"k": 0}, {"k": 52}, {"num_decks": 0}]

    def __init__(self, num_envs=1, num_decks=None, k=None, difficulty=None):
        """Knobs (None = preset or default): ``num_decks`` >= 1, ``k`` in ``[1, 52 num_decks - 1]``;
        ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks, k=k)
        super().__init__(num_envs, kw["num_decks"])
        self.k = check_int("k", kw["k"], low=1, high=self.num_cards - 1,
                           why=f"at most 52 * num_decks - 1 with num_decks={self.num_decks}")
        steps = np.arange(1, self.num_cards)  # step i = t + 1 asks for card c_{i-k}
        self._setup(self.num_cards - 1, steps >= self.k, N_SUITS, N_SUITS)
        self._asked = np.maximum(steps - self.k, 0)

    def targets(self, idx):
        return self.episode["cards"][idx][:, self._asked]

    @property
    def memory_horizon(self) -> int:
        """The card shown k steps before the one that asks for it: k + 1 steps."""
        return self.k + 1


class RepeatFirstTask(CardTask):
    presets = {"easy": {"num_decks": 1}, "medium": {"num_decks": 8}, "hard": {"num_decks": 16}}

    def __init__(self, num_envs=1, num_decks=None, difficulty=None):
        """Knob (None = preset or default): ``num_decks`` >= 1; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks)
        super().__init__(num_envs, kw["num_decks"])
        self._setup(self.num_cards - 1, np.ones(self.num_cards - 1, dtype=bool), N_SUITS, N_SUITS)

    def targets(self, idx):
        return np.repeat(self.episode["cards"][idx, :1], self.episode_length, axis=1)


class CountRecallTask(CardTask):
    defaults = {"num_decks": 1, "deck_type": "colors"}
    presets = {  # POPGym CountRecallEasy / Medium / Hard
        "easy": {"num_decks": 1, "deck_type": "colors"},
        "medium": {"num_decks": 2, "deck_type": "suits"},
        "hard": {"num_decks": 4, "deck_type": "ranks"},
    }
    test_kwargs = {"num_decks": 1, "deck_type": "suits"}
    invalid_kwargs = [{"deck_type": "jokers"}, {"num_decks": -2}]

    def __init__(self, num_envs=1, num_decks=None, deck_type=None, difficulty=None):
        """Knobs (None = preset or default): ``num_decks`` >= 1, ``deck_type`` in colors / suits / ranks
        (what is counted); ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks, deck_type=deck_type)
        self.deck_type = kw["deck_type"]
        self.categories = card_categories(check_int("num_decks", kw["num_decks"], low=1), self.deck_type)
        n_categories = int(self.categories.max()) + 1
        super().__init__(num_envs, kw["num_decks"], n_categories)
        self.max_count = self.num_cards // n_categories  # copies of each category in the deck
        self._setup(self.num_cards - 1, np.ones(self.num_cards - 1, dtype=bool), 2 * n_categories,
                    self.max_count + 1)
        self._two_decks = np.stack([self.categories, self.categories])
        # observation of (value v, query q) is row v * D + q: one-hot v, then one-hot q
        self._obs_table = np.concatenate([np.repeat(self._eye, n_categories, axis=0),
                                          np.tile(self._eye, (n_categories, 1))], axis=1)

    def sample_episode(self, rng):
        # deal[0]: value cards, deal[1]: query cards, each deck shuffled independently
        return {"deal": rng.permuted(self._two_decks, axis=1)}

    def observations(self, idx):
        deal = self.episode["deal"][idx]
        return self._obs_table[deal[:, 0] * self.n_categories + deal[:, 1]]

    def targets(self, idx):
        # step t + 1 asks how many of values[0 .. t] match queries[t]
        values, queries = self.episode["deal"][idx, 0], self.episode["deal"][idx, 1]
        seen = np.cumsum(values[:, :, None] == np.arange(self.n_categories), axis=1)
        return np.take_along_axis(seen[:, :-1], queries[:, :-1, None], axis=2)[:, :, 0]


class AutoencodeTask(CardTask):
    def __init__(self, num_envs=1, num_decks=None, difficulty=None):
        """Knob (None = preset or default): ``num_decks`` >= 1; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks)
        super().__init__(num_envs, kw["num_decks"])
        n = self.num_cards
        self._setup(2 * n - 1, np.arange(2 * n - 1) >= n - 1, N_SUITS + 1, N_SUITS)
        # play step t >= n - 1 names card c_{2n-2-t}: the last dealt first
        self._asked = np.clip(2 * n - 2 - np.arange(2 * n - 1), 0, n - 1)

    def observations(self, idx):
        obs = np.zeros((len(idx), self.episode_length + 1, N_SUITS + 1), dtype=np.float32)
        obs[:, : self.num_cards, :N_SUITS] = self._eye[self.episode["cards"][idx]]  # dealt cards; blank in play
        obs[:, self.num_cards - 1 :, N_SUITS] = 1.0  # the play flag, on from the step dealing the last card
        return obs

    def targets(self, idx):
        return self.episode["cards"][idx][:, self._asked]


class RepeatPreviousEnv(TaskEnv):
    task_cls = RepeatPreviousTask


class RepeatPreviousVectorEnv(TaskVectorEnv):
    task_cls = RepeatPreviousTask


class RepeatFirstEnv(TaskEnv):
    task_cls = RepeatFirstTask


class RepeatFirstVectorEnv(TaskVectorEnv):
    task_cls = RepeatFirstTask


class CountRecallEnv(TaskEnv):
    task_cls = CountRecallTask


class CountRecallVectorEnv(TaskVectorEnv):
    task_cls = CountRecallTask


class AutoencodeEnv(TaskEnv):
    task_cls = AutoencodeTask


class AutoencodeVectorEnv(TaskVectorEnv):
    task_cls = AutoencodeTask
