"""PositionOnlyCartPole: Gymnasium's CartPole-v1 with the velocities hidden (POPGym's masked CartPole).

The physics, the initial state (each of ``x, x_dot, theta, theta_dot`` uniform in ``[-0.05, 0.05]``),
the termination rule (``|x| > 2.4`` or ``|theta| > 12 deg``) and the reward (+1 on every step, the
terminating one included) are those of ``gymnasium.envs.classic_control.CartPoleEnv``, computed in
float64 on a ``[N, 4]`` batch. Only the observation differs: ``[x, theta]`` (float32), so the agent has
to infer both velocities from the history. The episode is truncated after ``max_episode_length`` steps
(POPGym's name for the cap; ``max_episode_steps`` would be swallowed by ``gymnasium.make``'s own kwarg).

Optimal return ``max_episode_length`` (the oracle, a linear state-feedback controller that reads the
full state through ``get_state()``, balances the pole indefinitely). A uniformly random policy
survives :data:`RANDOM_POLICY_MEAN_LENGTH` steps on average (measured, see the constant); its
length almost never exceeds 200 steps, so that is its expected return for every allowed cap.
Observation: ``Box(2)`` float32; action: ``Discrete(2)`` (0 pushes left, 1 pushes right).
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_int

#: Mean episode length of a uniformly random policy: ``random_policy_lengths(2_000_000).mean()``
#: (standard error 0.008; ``scripts/bench_envs.py --measure-chance`` reruns it). The longest of those
#: 2M episodes lasted 186 steps, so every cap >= MIN_EPISODE_LENGTH leaves this expectation unchanged.
RANDOM_POLICY_MEAN_LENGTH = 22.25
#: caps below this would cut random-policy episodes short and change the chance return
MIN_EPISODE_LENGTH = 200

# Gymnasium CartPole-v1 constants
GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE_MAG, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = MASSPOLE + MASSCART
FORCES = np.array([-FORCE_MAG, FORCE_MAG])  # by action
POLEMASS_LENGTH = MASSPOLE * LENGTH
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4


def cartpole_step(state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """One Euler step of CartPole-v1: ``state: [N, 4]`` float64, ``action: [N]`` in {0, 1} -> new ``[N, 4]``.

    Same operations in the same order as ``CartPoleEnv.step``, so results match it bit for bit.
    """
    x, x_dot, theta, theta_dot = state.T
    force = FORCES[action]
    costheta = np.cos(theta)
    sintheta = np.sin(theta)
    temp = (force + POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / TOTAL_MASS
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * np.square(costheta) / TOTAL_MASS)
    )
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
    # Euler: every component is ``s + tau * ds``, done in one batched op (elementwise the same as Gymnasium)
    return state + TAU * np.stack([x_dot, xacc, theta_dot, thetaacc], axis=1)


def failed(state: np.ndarray) -> np.ndarray:
    """CartPole-v1's termination ``[N]``: cart out of ``+-2.4`` or pole beyond ``+-12`` degrees."""
    return (np.abs(state[:, 0]) > X_THRESHOLD) | (np.abs(state[:, 2]) > THETA_THRESHOLD)


def random_policy_lengths(n_episodes: int, seed: int = 0, cap: int = 500, batch: int = 200_000) -> np.ndarray:
    """Episode lengths ``[n_episodes]`` of a uniformly random policy (the chance-return measurement)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_episodes, batch):
        n = min(batch, n_episodes - start)
        state = rng.uniform(-0.05, 0.05, size=(n, 4))
        alive, length = np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
        for _ in range(cap):
            state = cartpole_step(state, rng.integers(2, size=n))
            length += alive
            alive &= ~failed(state)
            if not alive.any():
                break
        out.append(length)
    return np.concatenate(out)


class PositionOnlyCartPoleTask(MemoryTask):
    defaults = {"max_episode_length": 200}
    presets = {  # POPGym's PositionOnlyCartPole Easy / Medium / Hard episode lengths
        "easy": {"max_episode_length": 200},
        "medium": {"max_episode_length": 400},
        "hard": {"max_episode_length": 600},
    }
    test_kwargs = {"max_episode_length": 200}
    invalid_kwargs = [{"max_episode_length": 10}, {"max_episode_length": 2.5}]

    def __init__(self, num_envs=1, max_episode_length=None, difficulty=None):
        """Knob (None = preset or default): ``max_episode_length`` >= 200 (the truncation cap);
        ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, max_episode_length=max_episode_length)
        super().__init__(num_envs)
        self.max_episode_length = check_int("max_episode_length", kw["max_episode_length"], low=MIN_EPISODE_LENGTH)
        high = np.array([X_THRESHOLD * 2, THETA_THRESHOLD * 2], dtype=np.float32)
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.state = np.zeros((num_envs, 4), dtype=np.float64)  # x, x_dot, theta, theta_dot

    def sample_episode(self, rng):
        return {"init_state": rng.uniform(low=-0.05, high=0.05, size=(4,))}

    def reset_envs(self, idx, rngs):
        super().reset_envs(idx, rngs)
        self.state[idx] = self.episode["init_state"][idx]

    def get_state(self):
        return {**super().get_state(), "state": self.state.copy()}

    def observe(self):
        return self.state[:, ::2].astype(np.float32)  # x and theta

    def step(self, action):
        self.state = cartpole_step(self.state, action)
        self.t += 1
        return np.ones(self.num_envs), failed(self.state), self.t >= self.max_episode_length

    def optimal_return(self):
        return float(self.max_episode_length)

    def chance_return(self):
        return RANDOM_POLICY_MEAN_LENGTH

    def oracle_action(self):
        # push towards where the pole (and, more weakly, the cart) should be: a hand-tuned linear
        # state feedback that keeps every start state of CartPole-v1 balanced and near x = 0
        gains = np.array([0.5, 1.0, 20.0, 3.0])
        return (self.state @ gains > 0).astype(np.int64)


class PositionOnlyCartPoleEnv(TaskEnv):
    task_cls = PositionOnlyCartPoleTask


class PositionOnlyCartPoleVectorEnv(TaskVectorEnv):
    task_cls = PositionOnlyCartPoleTask
