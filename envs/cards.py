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
  must say how many value cards so far (``c_0 .. c_{i-1}``) share the category of the last query card.
- Autoencode: ``C - 1`` watch steps deal the cards, then ``C`` play steps must name their suits in
  reverse order. A flag channel turns on when playing starts (the step that deals the last card);
  during play the card channels are blank.

A uniformly random (memoryless) policy is right with probability ``1 / n_actions`` on every scored step,
so its expected return is ``2 / n_actions - 1``: -0.5 for the suit tasks.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.core import MemoryTask, TaskEnv, TaskVectorEnv, check_int, resolve_kwargs

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
    """Shared deck machinery: ``episode["cards"]: [N, C]`` holds each row's dealt suits in deal order."""

    defaults = {"num_decks": 1}
    presets = {"easy": {"num_decks": 1}, "medium": {"num_decks": 2}, "hard": {"num_decks": 3}}
    test_kwargs = {"num_decks": 1}
    invalid_kwargs = [{"num_decks": 0}, {"num_decks": "two"}]
    n_categories = N_SUITS

    def __init__(self, num_envs, num_decks):
        super().__init__(num_envs)
        self.num_decks = check_int("num_decks", num_decks, low=1)
        self.num_cards = DECK_SIZE * self.num_decks
        self.suits = card_categories(self.num_decks, "suits")
        self._rows = np.arange(num_envs)

    def sample_episode(self, rng):
        return {"cards": self.suits[rng.permutation(self.num_cards)]}

    def one_hot(self, category: np.ndarray) -> np.ndarray:
        """``[N]`` category ids -> ``[N, n_categories]`` float32 one-hot."""
        return np.eye(self.n_categories, dtype=np.float32)[category]

    def shown(self, key: str = "cards") -> np.ndarray:
        """The card of ``episode[key]`` shown now, ``[N]`` (rows past their episode keep the last card)."""
        return self.episode[key][self._rows, np.minimum(self.t, self.num_cards - 1)]

    def score(self, correct: np.ndarray, scored: np.ndarray, n_scored: int) -> np.ndarray:
        """POPGym's reward: ``+-1 / n_scored`` on scored steps, 0 elsewhere."""
        return np.where(scored, np.where(correct, 1.0, -1.0) / n_scored, 0.0)

    def optimal_return(self):
        return 1.0

    def chance_return(self):
        return 2.0 / self.action_space.n - 1.0

    def _spaces(self, obs_dim: int, n_actions: int) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(n_actions)


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
        self.k = check_int("k", kw["k"], low=1, high=self.num_cards - 1)
        self._spaces(N_SUITS, N_SUITS)

    def observe(self):
        return self.one_hot(self.shown())

    def step(self, action):
        i = self.t + 1  # the step being taken (1-based); the target is card c_{i-k}
        target = self.episode["cards"][self._rows, np.clip(i - self.k, 0, self.num_cards - 1)]
        reward = self.score(action == target, i >= self.k, self.num_cards - self.k)
        self.t += 1
        return reward, self.t >= self.num_cards - 1, np.zeros(self.num_envs, dtype=bool)

    def oracle_action(self):
        return self.episode["cards"][self._rows, np.clip(self.t + 1 - self.k, 0, self.num_cards - 1)]


class RepeatFirstTask(CardTask):
    presets = {"easy": {"num_decks": 1}, "medium": {"num_decks": 8}, "hard": {"num_decks": 16}}

    def __init__(self, num_envs=1, num_decks=None, difficulty=None):
        """Knob (None = preset or default): ``num_decks`` >= 1; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks)
        super().__init__(num_envs, kw["num_decks"])
        self._spaces(N_SUITS, N_SUITS)

    def observe(self):
        return self.one_hot(self.shown())

    def step(self, action):
        reward = self.score(action == self.episode["cards"][:, 0], True, self.num_cards - 1)
        self.t += 1
        return reward, self.t >= self.num_cards - 1, np.zeros(self.num_envs, dtype=bool)

    def oracle_action(self):
        return self.episode["cards"][:, 0]


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
        super().__init__(num_envs, kw["num_decks"])
        self.deck_type = kw["deck_type"]
        self.categories = card_categories(self.num_decks, self.deck_type)
        self.n_categories = int(self.categories.max()) + 1
        self.max_count = self.num_cards // self.n_categories  # copies of each category in the deck
        self._spaces(2 * self.n_categories, self.max_count + 1)

    def sample_episode(self, rng):
        values = self.categories[rng.permutation(self.num_cards)]
        queries = self.categories[rng.permutation(self.num_cards)]
        # answer[i] = how many of values[0 .. i] equal queries[i] (the count asked after showing card i)
        seen = np.cumsum(values[:, None] == np.arange(self.n_categories), axis=0)
        return {"values": values, "queries": queries, "answer": seen[np.arange(self.num_cards), queries]}

    def observe(self):
        return np.concatenate([self.one_hot(self.shown("values")), self.one_hot(self.shown("queries"))], axis=1)

    def step(self, action):
        reward = self.score(action == self.oracle_action(), True, self.num_cards - 1)
        self.t += 1
        return reward, self.t >= self.num_cards - 1, np.zeros(self.num_envs, dtype=bool)

    def oracle_action(self):
        return self.shown("answer")


class AutoencodeTask(CardTask):
    def __init__(self, num_envs=1, num_decks=None, difficulty=None):
        """Knob (None = preset or default): ``num_decks`` >= 1; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, num_decks=num_decks)
        super().__init__(num_envs, kw["num_decks"])
        self.episode_length = 2 * self.num_cards - 1
        self._spaces(N_SUITS + 1, N_SUITS)

    def observe(self):
        watching = self.t < self.num_cards - 1
        obs = np.zeros((self.num_envs, N_SUITS + 1), dtype=np.float32)
        obs[:, :N_SUITS] = self.one_hot(self.shown()) * (self.t <= self.num_cards - 1)[:, None]
        obs[:, N_SUITS] = ~watching
        return obs

    def step(self, action):
        playing = self.t >= self.num_cards - 1
        reward = self.score(action == self.oracle_action(), playing, self.num_cards)
        self.t += 1
        return reward, self.t >= self.episode_length, np.zeros(self.num_envs, dtype=bool)

    def oracle_action(self):
        # play step j = t - (C - 1) names c_{C-1-j}; during watching any action will do
        back = np.clip(2 * (self.num_cards - 1) - self.t, 0, self.num_cards - 1)
        return self.episode["cards"][self._rows, back]


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
