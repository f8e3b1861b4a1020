"""PositionOnlyPendulum: Gymnasium's Pendulum-v1 with the angular velocity hidden (POPGym's Position-only Pendulum).

The dynamics (``g = 10``, ``m = l = 1``, ``dt = 0.05``, torque clipped to ``[-2, 2]``, speed clipped to
``[-8, 8]``), the initial state (angle uniform in ``[-pi, pi]``, angular velocity uniform in ``[-1, 1]``)
and the reward ``-(angle^2 + 0.1 * velocity^2 + 0.001 * torque^2)`` (angle normalized to ``[-pi, pi)``,
0 = upright) are those of ``gymnasium.envs.classic_control.PendulumEnv``, computed in float64 on ``[N]``
batches with the same operations in the same order, so a single env seeded ``s`` matches
``gym.make("Pendulum-v1")`` seeded ``s`` step for step, bit for bit (tests/test_any_env.py compares them).
Only the observation differs: ``[cos(angle), sin(angle)]`` (float32), so the agent has to infer the
velocity from the history. Rewards are Pendulum-v1's own, not POPGym's rescaling to ``[-1, 1]`` per
episode, so returns compare directly with Pendulum-v1's. The episode is truncated after
``max_episode_length`` steps (200 like Pendulum-v1; POPGym's presets: Easy 200, Medium 150, Hard 100 -- a
shorter episode leaves less time after the swing-up to earn back its cost).

Action: ``Box(-2, 2, (1,))`` float32. As in Pendulum-v1, finite torques outside ``[-2, 2]`` are clipped;
non-finite, non-numeric or wrongly shaped actions raise a ValueError naming the valid range.

Returns (never above 0): :meth:`chance_return` and :meth:`optimal_return` are Monte-Carlo means with a
fixed seed: a uniformly random torque, and the oracle (:func:`oracle_torque`, energy-pumping swing-up
then a PD balance, reading the full state from ``get_state()``) -- a strong controller, not a proven
optimum. For the preset lengths they are :data:`MEASURED` (100k episodes); other lengths are computed once
per process from :data:`MC_EPISODES` episodes. Length 200 (Pendulum-v1's): random -1228.3 (std 288),
oracle -149.65 (std 92; the oracle has swung up and holds within 100 steps, so its return is the same for
every preset).
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.validate import check_int

# Gymnasium Pendulum-v1 constants
MAX_SPEED, MAX_TORQUE, DT, G, M, L = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0
INIT_HIGH = np.array([np.pi, 1.0])  # PendulumEnv.reset's DEFAULT_X, DEFAULT_Y

#: episodes of the Monte-Carlo chance / oracle returns of lengths not in MEASURED (standard errors ~2 and ~0.7)
MC_EPISODES = 20_000
#: ``policy_returns(policy, length, 100_000).mean()`` (standard errors: random 0.5-0.9, oracle 0.29)
MEASURED = {("random", 200): -1228.31, ("oracle", 200): -149.65, ("random", 150): -922.91,
            ("oracle", 150): -149.65, ("random", 100): -616.44, ("oracle", 100): -149.65}


def angle_normalize(x):
    return ((x + np.pi) % (2 * np.pi)) - np.pi


def pendulum_step(state: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of Pendulum-v1: ``state: [N, 2]`` float64 (angle, velocity), ``u: [N]`` torques ->
    ``(new state [N, 2], reward [N])``. Same operations in the same order as ``PendulumEnv.step``
    (``u`` keeps its dtype, as there), so results match it bit for bit."""
    th, thdot = state[:, 0], state[:, 1]
    u = np.clip(u, -MAX_TORQUE, MAX_TORQUE)
    costs = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * (u**2)
    newthdot = thdot + (3 * G / (2 * L) * np.sin(th) + 3.0 / (M * L**2) * u) * DT
    newthdot = np.clip(newthdot, -MAX_SPEED, MAX_SPEED)
    newth = th + newthdot * DT
    return np.stack([newth, newthdot], axis=1), -costs


def oracle_torque(state: np.ndarray) -> np.ndarray:
    """A swing-up controller ``state [N, 2] -> torque [N]`` (float32) reading the full state.

    Far from upright it pumps energy: ``E = velocity^2 / 2 + 15 cos(angle)`` (15 = 3g/2l) changes at rate
    ``3 * torque * velocity``, so full torque along the velocity while ``E`` is below the upright rest
    energy 15, against it above. Near upright (``cos(angle) > 0.85``) a PD law ``-(10 angle + 2 velocity)``
    (clipped) holds it: the linearized closed loop ``angle'' = -15 angle - 6 angle'`` is stable.
    """
    th, thdot = angle_normalize(state[:, 0]), state[:, 1]
    energy = 0.5 * thdot**2 + 15.0 * np.cos(th)
    direction = np.where(thdot >= 0, 1.0, -1.0)
    pump = np.where(energy < 15.0, MAX_TORQUE, -MAX_TORQUE) * direction
    hold = np.clip(-(10.0 * th + 2.0 * thdot), -MAX_TORQUE, MAX_TORQUE)
    return np.where(np.cos(th) > 0.85, hold, pump).astype(np.float32)


def policy_returns(policy: str, length: int, n_episodes: int = MC_EPISODES, seed: int = 0) -> np.ndarray:
    """Returns ``[n_episodes]`` of ``"random"`` (uniform torques) or ``"oracle"`` over ``length`` steps."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(low=-INIT_HIGH, high=INIT_HIGH, size=(n_episodes, 2))
    total = np.zeros(n_episodes)
    for _ in range(length):
        if policy == "random":
            u = rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=n_episodes).astype(np.float32)
        else:
            u = oracle_torque(state)
        state, reward = pendulum_step(state, u)
        total += reward
    return total


@functools.lru_cache(maxsize=None)
def mc_return(policy: str, length: int) -> float:
    """The Monte-Carlo mean return of ``policy`` (fixed seed, so the same number every time)."""
    if (policy, length) in MEASURED:
        return MEASURED[policy, length]
    return float(policy_returns(policy, length).mean())


class PositionOnlyPendulumTask(MemoryTask):
    defaults = {"max_episode_length": 200}
    presets = {  # POPGym's PositionOnlyPendulum Easy / Medium / Hard episode lengths
        "easy": {"max_episode_length": 200},
        "medium": {"max_episode_length": 150},
        "hard": {"max_episode_length": 100},
    }
    test_kwargs = {"max_episode_length": 200}
    invalid_kwargs = [{"max_episode_length": 0}, {"max_episode_length": 2.5}]

    def __init__(self, num_envs=1, max_episode_length=None, difficulty=None):
        """Knob (None = preset or default): ``max_episode_length`` >= 1 (the truncation cap);
        ``difficulty`` in ``presets``."""
        kw = resolve_kwargs(type(self), difficulty, max_episode_length=max_episode_length)
        super().__init__(num_envs)
        self.max_episode_length = check_int("max_episode_length", kw["max_episode_length"], low=1)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-MAX_TORQUE, MAX_TORQUE, shape=(1,), dtype=np.float32)
        self.state = np.zeros((num_envs, 2), dtype=np.float64)  # angle, angular velocity

    def sample_episode(self, rng):
        return {"init_state": rng.uniform(low=-INIT_HIGH, high=INIT_HIGH)}

    def reset_envs(self, idx, rngs):
        super().reset_envs(idx, rngs)
        self.state[idx] = self.episode["init_state"][idx]

    def get_state(self):
        return {**super().get_state(), "state": self.state.copy()}

    def observe(self):
        th = self.state[:, 0]
        return np.stack([np.cos(th), np.sin(th)], axis=1).astype(np.float32)

    def step(self, action):
        self.state, reward = pendulum_step(self.state, action)
        self.t += 1
        return reward, np.zeros(self.num_envs, dtype=bool), self.t >= self.max_episode_length

    def check_action(self, action, single=False):
        """``action`` as torques ``[num_envs]`` (float32/float64 kept, so the arithmetic matches Pendulum-v1),
        or a ValueError naming the valid form. Single env: shape ``(1,)`` or a scalar; vector env:
        ``(num_envs, 1)``. Finite values outside ``[-2, 2]`` are clipped by the step, as in Pendulum-v1."""
        expected = "a torque of shape (1,)" if single else f"torques of shape ({self.num_envs}, 1)"

        def invalid() -> ValueError:
            return ValueError(f"{type(self).__name__}: expected {expected} in [-2.0, 2.0] "
                              f"(Box(-2.0, 2.0, (1,), float32); finite values outside are clipped), got {action!r}")

        try:
            arr = np.asarray(action)
        except (ValueError, TypeError):
            raise invalid() from None
        if arr.dtype.kind not in "fiub":
            raise invalid()
        if single and arr.shape == ():
            arr = arr.reshape(1, 1)
        shape = (1,) if single else (self.num_envs, 1)
        if arr.shape != shape:
            raise invalid()
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise invalid()
        return arr.reshape(self.num_envs)

    def optimal_return(self):
        return mc_return("oracle", self.max_episode_length)

    def chance_return(self):
        return mc_return("random", self.max_episode_length)

    def oracle_action(self):
        return oracle_torque(self.state)[:, None]


class PositionOnlyPendulumEnv(TaskEnv):
    task_cls = PositionOnlyPendulumTask

    def step(self, action):
        out = super().step(action)
        if self._last_step is not None:  # rendering: show the torque, not TaskEnv's int() of it
            self._last_step.action = round(float(np.asarray(action, dtype=np.float64).reshape(-1)[0]), 3)
        return out


class PositionOnlyPendulumVectorEnv(TaskVectorEnv):
    task_cls = PositionOnlyPendulumTask
