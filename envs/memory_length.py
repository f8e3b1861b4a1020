"""MemoryLength: bsuite's memory_len / memory_size task (``MemoryChain``), with noise bits as distractors.

Timeline of one episode (``memory_length + 1`` steps, ``t = 0 .. memory_length``):

- t = 0: the ``num_bits`` bit channels show the context bits (each +-1, iid fair);
- t = 1 .. memory_length: the bit channels show fresh random +-1 noise bits, so the context can only
  be told apart from them by when it was shown;
- t = memory_length: besides the noise, a one-hot query picks one context bit; the action must name it
  (0 for -1, 1 for +1).

A time channel ``1 - t / memory_length`` is on at every step (as in bsuite). Reward (bsuite's): +1 for
the right bit at the query step, -1 for the wrong one, 0 at every other step (actions there are
ignored); the episode then terminates. Unlike bsuite's ``MemoryChain`` the context is shown once (bsuite
repeats it in the first step's observation) and the query is one-hot rather than an index.

Optimal return 1; a memoryless policy gets 0 in expectation.
Observation: ``Box(1 + 2 num_bits)`` float32 ``[time, query one-hot, bits]``; action: ``Discrete(2)``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_int


class MemoryLengthTask(MemoryTask):
    defaults = {"memory_length": 10, "num_bits": 1}
    presets = {
        "easy": {"memory_length": 5, "num_bits": 1},
        "medium": {"memory_length": 30, "num_bits": 3},
        "hard": {"memory_length": 100, "num_bits": 10},
    }
    test_kwargs = {"memory_length": 4, "num_bits": 2}
    invalid_kwargs = [{"memory_length": 0}, {"num_bits": 0}, {"num_bits": 1.5}]

    def __init__(self, num_envs=1, memory_length=None, num_bits=None, difficulty=None):
        """Knobs (None = preset or default): ``memory_length`` >= 1 steps from context to query,
        ``num_bits`` >= 1 context bits; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, memory_length=memory_length, num_bits=num_bits)
        super().__init__(num_envs)
        self.memory_length = check_int("memory_length", kw["memory_length"], low=1)
        self.num_bits = check_int("num_bits", kw["num_bits"], low=1)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1 + 2 * self.num_bits,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._rows = np.arange(num_envs)

    @property
    def memory_horizon(self) -> int:
        """The context at t = 0, the query at t = memory_length."""
        return self.memory_length + 1

    def sample_episode(self, rng):
        # bits[0] is the context, bits[1:] the noise shown afterwards
        bits = rng.integers(2, size=(self.memory_length + 1, self.num_bits), dtype=np.int8)
        return {"bits": bits, "query": rng.integers(self.num_bits)}

    def observe(self):
        t = np.minimum(self.t, self.memory_length)
        obs = np.zeros((self.num_envs, 1 + 2 * self.num_bits), dtype=np.float32)
        obs[:, 0] = 1.0 - t / self.memory_length
        obs[self._rows, 1 + self.episode["query"]] = t == self.memory_length
        obs[:, 1 + self.num_bits :] = 2 * self.episode["bits"][self._rows, t] - 1
        return obs

    def step(self, action):
        query = self.t == self.memory_length
        reward = np.where(query, np.where(action == self.oracle_action(), 1.0, -1.0), 0.0)
        self.t += 1
        return reward, query, np.zeros(self.num_envs, dtype=bool)

    def optimal_return(self):
        return 1.0

    def chance_return(self):
        return 0.0

    def oracle_action(self):
        return self.episode["bits"][self._rows, 0, self.episode["query"]].astype(np.int64)


class MemoryLengthEnv(TaskEnv):
    task_cls = MemoryLengthTask


class MemoryLengthVectorEnv(TaskVectorEnv):
    task_cls = MemoryLengthTask
