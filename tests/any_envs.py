"""Tiny Gymnasium envs with the spaces rlmem supports beyond Discrete actions and flat Box observations
(tests/test_any_env.py), registered as ``AnyEnvTest/<Name>-v0`` on import.

Each is a cue task: the cue shown at t = 0 must be named at the query step after ``delay`` blank steps
(reward 1 when right, 0 otherwise; the episode ends at the query), so greedy success needs memory and
a random policy succeeds with probability 1 / (number of cue values). Train one from the command line
with ``env.id=tests.any_envs:AnyEnvTest/ImageCue-v0`` (run from the repository root).

- ``ImageCue``: observation an 8x8 uint8 image ``[8, 8, 1]`` (``channels_first=True``: ``[1, 8, 8]``): the
  cue (0 or 1) lights the top or the bottom half at t = 0, blank frames follow, the query frame lights the
  border; action ``Discrete(2)``.
- ``DictCue``: observation ``{"image": the ImageCue frame, "query": Box(1) float64, "phase": Discrete(3)}``
  (the image carries the cue, ``query`` is 1 at the query step, ``phase`` is 0 / 1 / 2 for cue / blank /
  query); action ``Discrete(2)``.
- ``MultiCue``: observation a flat one-hot of the cue per dim (then zeros, then a query flag); the cue is
  ``len(nvec)`` values, action ``MultiDiscrete(nvec)``; reward 1 only when every dim is named right.
- ``MultiDiscreteObsCue``: observation ``MultiDiscrete([3, 3])``: ``[cue + 1 at t = 0 else 0, phase]``;
  action ``Discrete(2)``.
- ``TupleCue``: observation ``Tuple((Discrete(3) phase, Box(2) one-hot cue at t = 0, MultiDiscrete([3])
  the cue + 1 at t = 0))``; action ``Discrete(2)``.
- ``InfoCue``: a flat-Box cue whose ``reset()`` info holds keys its ``step()`` info does not (a numpy string
  array, a number) and whose step info holds a string and a nested dict.
- ``Unsupported``: any given spaces (for the error tests).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def cue_image(cue: int | None, query: bool = False) -> np.ndarray:
    """``[8, 8, 1]`` uint8: cue 0 lights rows 0-3, cue 1 rows 4-7; the query frame lights the border."""
    image = np.zeros((8, 8, 1), dtype=np.uint8)
    if cue is not None:
        image[4 * cue:4 * cue + 4] = 255
    if query:
        image[[0, -1]] = image[:, [0, -1]] = 255
    return image


class CueTask(gym.Env):
    """The shared cue-then-query timing; subclasses define spaces, ``_observe`` and ``_correct``."""

    def __init__(self, delay: int = 2):
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.cue = self._draw_cue()
        return self._observe(), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.t += 1
        if self.t <= self.delay:
            return self._observe(), 0.0, False, False, {}
        return self._observe(), float(self._correct(action)), True, False, {}

    @property
    def phase(self) -> int:
        return 0 if self.t == 0 else (2 if self.t > self.delay else 1)


class ImageCueEnv(CueTask):
    action_space = gym.spaces.Discrete(2)

    def __init__(self, delay: int = 2, channels_first: bool = False):
        super().__init__(delay)
        self.channels_first = channels_first
        shape = (1, 8, 8) if channels_first else (8, 8, 1)
        self.observation_space = gym.spaces.Box(0, 255, shape, dtype=np.uint8)

    def _draw_cue(self):
        return int(self.np_random.integers(2))

    def _observe(self):
        image = cue_image(self.cue if self.phase == 0 else None, query=self.phase == 2)
        return np.moveaxis(image, -1, 0).copy() if self.channels_first else image

    def _correct(self, action):
        return int(action) == self.cue


class DictCueEnv(ImageCueEnv):
    def __init__(self, delay: int = 2):
        super().__init__(delay)
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (8, 8, 1), dtype=np.uint8),
            "query": gym.spaces.Box(0.0, 1.0, (1,), dtype=np.float64),
            "phase": gym.spaces.Discrete(3),
        })

    def _observe(self):
        return {"image": cue_image(self.cue if self.phase == 0 else None), "query": np.array([float(self.phase == 2)]),
                "phase": self.phase}


class MultiCueEnv(CueTask):
    def __init__(self, delay: int = 2, nvec=(3, 5)):
        super().__init__(delay)
        self.nvec = np.asarray(nvec, dtype=np.int64)
        self.action_space = gym.spaces.MultiDiscrete(self.nvec)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (int(self.nvec.sum()) + 1,), dtype=np.float32)

    def _draw_cue(self):
        return np.array([self.np_random.integers(n) for n in self.nvec])

    def _observe(self):
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        if self.phase == 0:
            obs[np.cumsum(np.r_[0, self.nvec[:-1]]) + self.cue] = 1.0
        obs[-1] = float(self.phase == 2)
        return obs

    def _correct(self, action):
        return bool(np.all(np.asarray(action) == self.cue))


class MultiDiscreteObsCueEnv(ImageCueEnv):
    observation_space = gym.spaces.MultiDiscrete([3, 3])

    def __init__(self, delay: int = 2):
        super().__init__(delay)
        self.observation_space = gym.spaces.MultiDiscrete([3, 3])

    def _observe(self):
        return np.array([self.cue + 1 if self.phase == 0 else 0, self.phase], dtype=np.int64)


class TupleCueEnv(ImageCueEnv):
    def __init__(self, delay: int = 2):
        super().__init__(delay)
        self.observation_space = gym.spaces.Tuple((
            gym.spaces.Discrete(3),
            gym.spaces.Box(0.0, 1.0, (2,), dtype=np.float32),
            gym.spaces.MultiDiscrete([3]),
        ))

    def _observe(self):
        onehot = np.zeros(2, dtype=np.float32)
        if self.phase == 0:
            onehot[self.cue] = 1.0
        return self.phase, onehot, np.array([self.cue + 1 if self.phase == 0 else 0], dtype=np.int64)


class InfoCueEnv(ImageCueEnv):
    def __init__(self, delay: int = 2):
        super().__init__(delay)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (4,), dtype=np.float32)

    def _observe(self):
        obs = np.zeros(4, dtype=np.float32)
        if self.phase == 0:
            obs[self.cue] = 1.0
        obs[2 + (self.phase == 2)] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        obs, _ = super().reset(seed=seed, options=options)
        return obs, {"level": np.array(["easy", "hard"]), "seed_used": 7}

    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, {"note": "stepped", "stats": {"t": self.t}, "t": self.t}


class UnsupportedEnv(gym.Env):
    def __init__(self, observation_space=None, action_space=None):
        self.observation_space = observation_space or gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.action_space = action_space or gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


for _name, _cls, _steps in [("ImageCue", ImageCueEnv, 50), ("DictCue", DictCueEnv, 50),
                            ("MultiCue", MultiCueEnv, 50), ("MultiDiscreteObsCue", MultiDiscreteObsCueEnv, 50),
                            ("TupleCue", TupleCueEnv, 50), ("InfoCue", InfoCueEnv, 50),
                            ("Unsupported", UnsupportedEnv, 10)]:
    if f"AnyEnvTest/{_name}-v0" not in gym.registry:
        gym.register(f"AnyEnvTest/{_name}-v0", entry_point=_cls, max_episode_steps=_steps)
