"""Passive and active T-Maze (Memory-RL; Ni et al. 2023, "When do Transformers Shine in RL?").

The maze, with ``L = corridor_length`` and ``o`` the oracle offset (0 passive, 1 active)::

                      g(+1)
    O - S - . . . - J
                      g(-1)

``O`` (x = 0) is the oracle cell, ``S`` (x = o) the start, ``J`` (x = o + L) the junction, and the two
goal candidates sit above and below ``J`` (y = +1 / -1). Which one pays (``goal_y``) is drawn at reset.

- Passive (o = 0): the agent starts on the oracle, so the first observation shows the goal.
- Active (o = 1): the agent starts one step right of the oracle and must step left to see the goal.

Actions (``Discrete(4)``): 0 right, 1 up, 2 left, 3 down; moves into walls leave the agent in place.
Observations (``Box(2)`` float32, the ambiguous position encoding of the paper): ``[0, goal_y]`` on the
first visit to the oracle, ``[0, 0]`` on the corridor (and on later oracle visits), ``[1, y]`` at the
junction and the goal cells. The episode lasts exactly ``L + 2 o + 1`` steps (then terminates). Reward:
``penalty`` (default ``-1 / L``, so at most -1 in total) on every non-final step at which the agent is
behind the fastest schedule (``x < t - o`` after step ``t``); on the final step ``goal_reward`` if the
agent stands on the paying goal, else 0.

Optimal return ``goal_reward``. The best memoryless policy (run to the junction, always turn the same
way) gets ``goal_reward / 2``. The return of a uniformly random policy (``chance_return``) is computed
exactly by dynamic programming over the agent's position (:func:`random_policy_return`).
"""

from __future__ import annotations

from functools import lru_cache

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_float, check_int

RIGHT, UP, LEFT, DOWN = 0, 1, 2, 3
MOVES = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # (dx, dy) per action


def move(x: np.ndarray, y: np.ndarray, action: np.ndarray, junction: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions after ``action`` (all ``[N]``); cells: corridor ``y = 0, 0 <= x <= junction``, goals
    ``x = junction, y = +-1``. Invalid moves stay put."""
    nx, ny = x + MOVES[action, 0], y + MOVES[action, 1]
    valid = ((ny == 0) & (nx >= 0) & (nx <= junction)) | ((nx == junction) & (np.abs(ny) <= 1))
    return np.where(valid, nx, x), np.where(valid, ny, y)


@lru_cache(maxsize=64)
def random_policy_return(corridor_length: int, oracle_length: int, goal_reward: float, penalty: float) -> float:
    """Exact expected return of a uniformly random policy (the goal side is independent of its moves)."""
    junction = oracle_length + corridor_length
    n_steps = corridor_length + 2 * oracle_length + 1
    # cells 0..junction are the corridor (y = 0); junction + 1 / + 2 are the goals y = +1 / -1
    xs = np.concatenate([np.arange(junction + 1), [junction, junction]])
    ys = np.concatenate([np.zeros(junction + 1, dtype=np.int64), [1, -1]])
    # dest[a, i]: the cell reached from cell i by action a
    moved = [move(xs, ys, np.full(len(xs), a), junction) for a in range(4)]
    dest = np.stack([np.where(y == 0, x, junction + 1 + (y < 0)) for x, y in moved])
    p = np.zeros(len(xs))
    p[oracle_length] = 1.0
    expected = 0.0
    for t in range(1, n_steps + 1):
        p = np.bincount(dest.ravel(), weights=np.tile(p / 4, 4), minlength=len(xs))
        if t < n_steps:
            expected += penalty * p[xs < t - oracle_length].sum()
    return expected + goal_reward * 0.5 * (p[junction + 1] + p[junction + 2])


class TMazeTask(MemoryTask):
    """Shared core; subclasses set ``oracle_length`` (0 passive, 1 active)."""

    oracle_length: int
    defaults = {"corridor_length": 10, "goal_reward": 1.0, "penalty": None}
    presets = {
        "easy": {"corridor_length": 10},
        "medium": {"corridor_length": 100},
        "hard": {"corridor_length": 500},
    }
    test_kwargs = {"corridor_length": 4}
    invalid_kwargs = [{"corridor_length": 0}, {"goal_reward": 0.0}, {"penalty": 0.5}]

    def __init__(self, num_envs=1, corridor_length=None, goal_reward=None, penalty=None, difficulty=None):
        """Knobs (None = preset or default): ``corridor_length`` >= 1, ``goal_reward`` > 0, ``penalty`` <= 0
        per late step (None: ``-1 / corridor_length``); ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, corridor_length=corridor_length, goal_reward=goal_reward,
                            penalty=penalty)
        super().__init__(num_envs)
        self.corridor_length = check_int("corridor_length", kw["corridor_length"], low=1)
        self.goal_reward = check_float("goal_reward", kw["goal_reward"], low=0.0)
        if self.goal_reward == 0:  # nothing to remember for
            raise ValueError("goal_reward must be > 0, got 0.0")
        penalty = -1.0 / self.corridor_length if kw["penalty"] is None else kw["penalty"]
        self.penalty = check_float("penalty", penalty, high=0.0)
        self.junction = self.oracle_length + self.corridor_length
        self.episode_length = self.corridor_length + 2 * self.oracle_length + 1
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(4)
        # position and whether the oracle has been visited / shows the goal in the current observation
        self.x = np.zeros(num_envs, dtype=np.int64)
        self.y = np.zeros(num_envs, dtype=np.int64)
        self.visited = np.zeros(num_envs, dtype=bool)
        self.cue_shown = np.zeros(num_envs, dtype=bool)

    def sample_episode(self, rng):
        return {"goal_y": 2 * rng.integers(2) - 1}

    def reset_envs(self, idx, rngs):
        super().reset_envs(idx, rngs)
        self.x[idx], self.y[idx] = self.oracle_length, 0
        self.visited[idx] = self.cue_shown[idx] = self.oracle_length == 0

    def get_state(self):
        return {**super().get_state(), "x": self.x.copy(), "y": self.y.copy(), "visited": self.visited.copy()}

    def observe(self):
        obs = np.zeros((self.num_envs, 2), dtype=np.float32)
        at_junction = self.x == self.junction
        obs[:, 0] = at_junction
        obs[:, 1] = np.where(at_junction, self.y, np.where(self.cue_shown, self.episode["goal_y"], 0))
        return obs

    def step(self, action):
        self.x, self.y = move(self.x, self.y, action, self.junction)
        self.cue_shown = (self.x == 0) & ~self.visited  # only the first visit reveals the goal
        self.visited |= self.x == 0
        self.t += 1
        final = self.t >= self.episode_length
        late = self.x < self.t - self.oracle_length
        on_goal = self.y == self.episode["goal_y"]
        reward = np.where(final, np.where(on_goal, self.goal_reward, 0.0), np.where(late, self.penalty, 0.0))
        return reward, final, np.zeros(self.num_envs, dtype=bool)

    def optimal_return(self):
        return self.goal_reward

    def chance_return(self):
        return random_policy_return(self.corridor_length, self.oracle_length, self.goal_reward, self.penalty)

    def oracle_action(self):
        turn = np.where(self.episode["goal_y"] > 0, UP, DOWN)
        action = np.where(self.x < self.junction, RIGHT, turn)
        return np.where(~self.visited, LEFT, action)  # active: fetch the cue first


class TMazePassiveTask(TMazeTask):
    oracle_length = 0


class TMazeActiveTask(TMazeTask):
    oracle_length = 1


class TMazePassiveEnv(TaskEnv):
    task_cls = TMazePassiveTask


class TMazePassiveVectorEnv(TaskVectorEnv):
    task_cls = TMazePassiveTask


class TMazeActiveEnv(TaskEnv):
    task_cls = TMazeActiveTask


class TMazeActiveVectorEnv(TaskVectorEnv):
    task_cls = TMazeActiveTask
