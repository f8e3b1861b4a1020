"""A user's own Gymnasium envs, registered on import: one that trains, one that needs a missing package."""

import gymnasium as gym

from rlmem.envs.delayed_cue import DelayedCueEnv


class NeedsBox2D(gym.Env):
    def __init__(self):
        raise gym.error.DependencyNotInstalled('Box2D is not installed, run `pip install "gymnasium[box2d]"`')


gym.register("MyCue-v0", entry_point=lambda: DelayedCueEnv(delay=1), max_episode_steps=50)
gym.register("NeedsBox2D-v0", entry_point=NeedsBox2D)
