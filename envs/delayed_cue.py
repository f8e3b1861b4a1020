"""DelayedCue: remember which of ``n_cues`` cues was shown ``delay`` steps ago.

Timeline of one episode (``delay + 2`` steps):

- t = 0: the observation shows the cue (one-hot over the first ``n_cues`` channels);
- t = 1 .. delay: blank observations (zeros);
- t = delay + 1: the query flag (last channel) is on; the action must name the cue.

Reward: +1 if the action at the query step names the cue, 0 if it is wrong, 0 at every other step
(actions there are ignored). The episode then terminates. Optional Gaussian observation noise of std
``noise`` is added to every channel at every step.

Optimal return 1; a memoryless policy gets ``1 / n_cues`` in expectation.
Observation: ``Box(n_cues + 1)`` float32; action: ``Discrete(n_cues)``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_float, check_int

#: largest observation-noise std (float32 observations stay finite far beyond any useful noise level)
MAX_NOISE = 1e6


class DelayedCueTask(MemoryTask):
    defaults = {"delay": 10, "n_cues": 4, "noise": 0.0}
    presets = {
        "easy": {"delay": 5, "n_cues": 2},
        "medium": {"delay": 30, "n_cues": 4},
        "hard": {"delay": 200, "n_cues": 8, "noise": 0.1},
    }
    test_kwargs = {"delay": 3, "n_cues": 3, "noise": 0.1}
    invalid_kwargs = [{"delay": -1}, {"n_cues": 1}, {"noise": -0.5}]

    def __init__(self, num_envs=1, delay=None, n_cues=None, noise=None, difficulty=None):
        """Knobs (None = preset or default): ``delay`` >= 0 blank steps, ``n_cues`` >= 2, ``noise`` std in
        ``[0, MAX_NOISE]``; ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, delay=delay, n_cues=n_cues, noise=noise)
        super().__init__(num_envs)
        self.delay = check_int("delay", kw["delay"], low=0)
        self.n_cues = check_int("n_cues", kw["n_cues"], low=2)
        self.noise = check_float("noise", kw["noise"], low=0.0, high=MAX_NOISE,
                                 why="larger stds overflow the float32 observations")
        self.episode_length = self.delay + 2
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(self.n_cues + 1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(self.n_cues)
        self._rows = np.arange(num_envs)

    def sample_episode(self, rng):
        episode = {"cue": rng.integers(self.n_cues)}
        if self.noise > 0:
            noise = rng.normal(0.0, self.noise, size=(self.episode_length, self.n_cues + 1))
            episode["noise"] = noise.astype(np.float32)
        return episode

    def observe(self):
        t = np.minimum(self.t, self.episode_length - 1)
        obs = np.zeros((self.num_envs, self.n_cues + 1), dtype=np.float32)
        obs[self._rows, self.episode["cue"]] = t == 0
        obs[:, -1] = t == self.episode_length - 1
        if self.noise > 0:
            obs += self.episode["noise"][self._rows, t]
        return obs

    def step(self, action):
        query = self.t == self.episode_length - 1
        reward = (query & (action == self.episode["cue"])).astype(np.float64)
        self.t += 1
        return reward, query, np.zeros(self.num_envs, dtype=bool)

    def optimal_return(self):
        return 1.0

    def chance_return(self):
        return 1.0 / self.n_cues

    def oracle_action(self):
        return self.episode["cue"].astype(np.int64)


class DelayedCueEnv(TaskEnv):
    task_cls = DelayedCueTask


class DelayedCueVectorEnv(TaskVectorEnv):
    task_cls = DelayedCueTask
