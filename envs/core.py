"""One numpy-batched core per memory task, two Gymnasium faces over it.

Every rlmem env is written once, as a :class:`MemoryTask`: ``num_envs`` copies of the task stepped
together with numpy. :class:`TaskEnv` (a ``gymnasium.Env``) runs one copy and :class:`TaskVectorEnv`
(a ``gymnasium.vector.VectorEnv``, the ``vector_entry_point``) runs many, so the single and the vector
env cannot drift apart.

Randomness: each episode's random draws are made at reset, by :meth:`MemoryTask.sample_episode`, from
that env's own generator (``self.np_random`` in the single env; generator ``i`` seeded ``seed + i`` in
the vector env, as ``SyncVectorEnv`` does). Steps are then pure batched numpy, so the vector env with
seed ``s`` gives exactly the episodes of single envs seeded ``s, s+1, ...``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlmem.validate import check_int


class MemoryTask:
    """Batched core: subclasses define spaces, ``sample_episode``, ``observe`` and ``step``.

    ``self.t: [N]`` is the step index within each row's episode; ``self.episode[k]: [N, ...]`` holds
    what :meth:`sample_episode` drew at the last reset of each row. Rows whose episode has ended may
    still be stepped (the vector env discards those results), so ``step`` must not fail on them.
    """

    #: knob defaults, and difficulty presets (name -> knob values); see :func:`resolve_kwargs`
    defaults: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    observation_space: gym.spaces.Box
    action_space: gym.spaces.Discrete

    def __init__(self, num_envs: int):
        self.num_envs = check_int("num_envs", num_envs, low=1)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.episode: dict[str, np.ndarray] = {}

    # --- what a task implements -------------------------------------------------------------
    def sample_episode(self, rng: np.random.Generator) -> dict[str, Any]:
        """All random draws of one new episode (arrays of fixed shape per key)."""
        raise NotImplementedError

    def observe(self) -> np.ndarray:
        """Observations of all rows at their current step: ``[N, *obs_shape]``."""
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every row by one step: ``action: [N]`` -> ``(reward [N], terminated [N], truncated [N])``."""
        raise NotImplementedError

    @property
    def memory_horizon(self) -> int | None:
        """Steps spanned by the longest dependency the task asks for (from the step whose observation must be
        remembered to the step that needs it, both included); None when unknown. Default: the episode
        length, when the task has one (what is shown first may be asked for last). PPO learns a dependency
        only from replayed slices of at least this many steps (``rlmem.env_factory.horizon_warning``)."""
        length = getattr(self, "episode_length", None)
        return None if length is None else int(length)

    def optimal_return(self) -> float:
        """Expected return of the best policy (documented, tested with an oracle)."""
        raise NotImplementedError

    def chance_return(self) -> float:
        """Expected return of a uniformly random (so memoryless) policy (documented, tested)."""
        raise NotImplementedError

    def oracle_action(self) -> np.ndarray:
        """Best actions ``[N]`` given the hidden state (used by tests to check ``optimal_return``)."""
        raise NotImplementedError

    # --- shared machinery ---------------------------------------------------------------------
    def reset_envs(self, idx: np.ndarray, rngs: list[np.random.Generator]) -> None:
        """Start new episodes in rows ``idx``, each drawn from its own generator."""
        for i, rng in zip(idx, rngs, strict=True):
            for key, value in self.sample_episode(rng).items():
                value = np.asarray(value)
                if key not in self.episode:
                    self.episode[key] = np.zeros((self.num_envs, *value.shape), dtype=value.dtype)
                self.episode[key][i] = value
        self.t[idx] = 0

    def get_state(self) -> dict[str, np.ndarray]:
        """The hidden Markov state of every row (copies)."""
        return {"t": self.t.copy(), **{k: v.copy() for k, v in self.episode.items()}}

    def knobs(self) -> dict[str, Any]:
        """The knob values in use after presets and defaults (keys: ``defaults``), as plain Python values.

        Knobs whose default is derived (e.g. T-maze ``penalty=None`` -> ``-1 / corridor_length``) show the
        derived value, so ``type(task)(num_envs, **task.knobs())`` rebuilds the same task.
        """
        return {name: plain_value(self.knob_value(name)) for name in self.defaults}

    def knob_value(self, name: str) -> Any:
        """The value in use of knob ``name`` (an attribute of the task unless a subclass says otherwise)."""
        return getattr(self, name)

    def check_action(self, action: Any, single: bool = False) -> np.ndarray:
        """``action`` as int64 ``[num_envs]`` in ``[0, n - 1]``, or a ValueError naming the valid range.

        Integers (numpy or Python) and integer-valued floats are accepted; a ``single`` env also accepts a
        scalar. Anything else (out of range, non-integer, NaN, strings, None, wrong shape) raises before
        the task is touched, so an invalid action never changes the env.
        """
        n = self.action_space.n

        def invalid() -> ValueError:  # built only on failure: repr of a large batch costs ~100 us per step
            what = "an integer action" if single else f"{self.num_envs} integer action(s) (shape ({self.num_envs},))"
            return ValueError(f"{type(self).__name__}: expected {what} in [0, {n - 1}] (Discrete({n})), got {action!r}")

        def out_of_range() -> ValueError:
            return ValueError(f"{type(self).__name__}: actions must be in [0, {n - 1}] (Discrete({n})), got {action!r}")

        try:
            arr = np.asarray(action)
        except (ValueError, TypeError):  # ragged nested sequences and the like
            raise invalid() from None
        if single and arr.shape == ():
            arr = arr.reshape(1)
        if arr.shape != (self.num_envs,):
            raise invalid()
        if arr.dtype == object:  # e.g. Python ints beyond int64, None, mixed types
            values = arr.tolist()
            if not all(isinstance(v, (int, np.integer)) for v in values):
                raise invalid()
            if any(v < 0 or v >= n for v in values):
                raise out_of_range()
            return np.array(values, dtype=np.int64)
        if arr.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                if not np.all(np.isfinite(arr) & (arr == np.floor(arr))):
                    raise invalid()
        elif arr.dtype.kind not in "iub":  # strings, complex, datetimes, ...
            raise invalid()
        if arr.min() < 0 or arr.max() >= n:  # compared before the cast, so huge values cannot wrap
            raise out_of_range()
        return arr if arr.dtype == np.int64 else arr.astype(np.int64)


def plain_value(value: Any) -> Any:
    """numpy scalars as the Python int / float / bool / str they hold; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def resolve_kwargs(cls: type[MemoryTask], difficulty: str | None, **explicit: Any) -> dict[str, Any]:
    """Knob values: explicit (non-None) kwargs > the ``difficulty`` preset > ``cls.defaults``.

    Unknown preset names raise naming the valid ones.
    """
    if difficulty is not None and (not isinstance(difficulty, str) or difficulty not in cls.presets):
        raise ValueError(f"{cls.__name__}: unknown difficulty {difficulty!r}; valid: {sorted(cls.presets)}")
    preset = cls.presets[difficulty] if difficulty is not None else {}
    given = {k: v for k, v in explicit.items() if v is not None}
    return {**cls.defaults, **preset, **given}


class TaskEnv(gym.Env):
    """A single Gymnasium env over a one-row :class:`MemoryTask`. Subclasses set ``task_cls``.

    ``render_mode="rgb_array"``: :meth:`render` returns a frame ``[H, W, 3]`` uint8 showing the observation,
    the hidden state (``get_state()``) and the last action (see :mod:`rlmem.envs.render`); with the
    default ``render_mode=None`` stepping does no render bookkeeping at all.
    """

    task_cls: ClassVar[type[MemoryTask]]
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"{type(self).__name__}: unknown render_mode {render_mode!r}; valid: None, "
                             + ", ".join(repr(m) for m in self.metadata["render_modes"]))
        self.render_mode = render_mode
        self.task = self.task_cls(num_envs=1, **kwargs)
        self.observation_space = self.task.observation_space
        self.action_space = self.task.action_space
        self._renderer = None  # built at the first render()
        self._last_step = None  # rlmem.envs.render.StepInfo, kept only when rendering

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task.reset_envs(np.array([0]), [self.np_random])
        if self.render_mode is not None:
            from rlmem.envs.render import StepInfo

            self._last_step = StepInfo()
        return self.task.observe()[0], {}

    def step(self, action):
        if not self.task.episode:
            raise RuntimeError("call reset() before step()")
        action = self.task.check_action(action, single=True)
        reward, terminated, truncated = self.task.step(action)
        if self.render_mode is not None:
            last = self._last_step
            last.action, last.reward = int(action[0]), float(reward[0])
            last.episode_return += last.reward
            last.done = bool(terminated[0] or truncated[0])
        return self.task.observe()[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> np.ndarray | None:
        """The current frame ``[H, W, 3]`` uint8 (``render_mode="rgb_array"``); None without a render mode."""
        if self.render_mode is None:
            gym.logger.warn(f"{type(self).__name__}.render() called without a render mode; make the env with "
                            "render_mode='rgb_array'")
            return None
        if not self.task.episode:
            raise RuntimeError("call reset() before render()")
        if self._renderer is None:
            from rlmem.envs.render import Renderer

            self._renderer = Renderer(self.spec.id if self.spec is not None else type(self).__name__)
        return self._renderer(self.task.observe()[0], self.get_state(), self._last_step)

    def get_state(self) -> dict[str, Any]:
        """The hidden Markov state (for analysis and oracle policies)."""
        return {k: v[0] for k, v in self.task.get_state().items()}

    def knobs(self) -> dict[str, Any]:
        """The knob values in use after presets and defaults (see :meth:`MemoryTask.knobs`)."""
        return self.task.knobs()


class TaskVectorEnv(VectorEnv):
    """``num_envs`` copies of a :class:`MemoryTask` in one numpy batch (the ``vector_entry_point``).

    ``autoreset_mode`` is a kwarg (``make_vec`` passes options only as kwargs): ``NEXT_STEP`` (Gymnasium's
    default), ``SAME_STEP`` (final obs in ``info["final_obs"]``) or ``DISABLED`` (reset rows with
    ``reset(options={"reset_mask": mask})``, which is what TorchRL's ``GymWrapper`` prefers).
    """

    task_cls: ClassVar[type[MemoryTask]]
    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, **kwargs):
        self.task = self.task_cls(num_envs=num_envs, **kwargs)
        self.num_envs = num_envs
        try:
            self.autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(
                f"unknown autoreset_mode {autoreset_mode!r}; valid: {[m.value for m in AutoresetMode]}"
            ) from None
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.single_observation_space = self.task.observation_space
        self.single_action_space = self.task.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._done = np.zeros(num_envs, dtype=bool)
        self._started = False

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
            for i, s in enumerate(seeds):
                if s is not None:
                    self._rngs[i] = seeding.np_random(s)[0]
        mask = (options or {}).get("reset_mask")
        if mask is None or not self._started:
            idx = np.arange(self.num_envs)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
            idx = np.flatnonzero(mask)
        self._reset_rows(idx)
        self._started = True
        return self.task.observe(), {}

    def _reset_rows(self, idx: np.ndarray) -> None:
        self.task.reset_envs(idx, [self._rngs[i] for i in idx])
        self._done[idx] = False

    def step(self, actions):
        if not self._started:
            raise RuntimeError("call reset() before step()")
        reward, terminated, truncated = self.task.step(self.task.check_action(actions))
        reward = reward.astype(np.float64)
        info: dict[str, Any] = {}
        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            restart = np.flatnonzero(self._done)
            if restart.size:
                self._reset_rows(restart)
                reward[restart] = 0.0
                terminated[restart] = truncated[restart] = False
            self._done = terminated | truncated
            return self.task.observe(), reward, terminated, truncated, info
        obs = self.task.observe()
        done = terminated | truncated
        if self.autoreset_mode is AutoresetMode.SAME_STEP and done.any():
            final_obs = np.empty(self.num_envs, dtype=object)
            for i in np.flatnonzero(done):
                final_obs[i] = obs[i].copy()
            self._reset_rows(np.flatnonzero(done))
            obs = self.task.observe()
            info = {"final_obs": final_obs, "_final_obs": done.copy(), "final_info": {}, "_final_info": done.copy()}
        return obs, reward, terminated, truncated, info

    def get_state(self) -> dict[str, np.ndarray]:
        """The hidden Markov state of every env, batched."""
        return self.task.get_state()

    def knobs(self) -> dict[str, Any]:
        """The knob values in use after presets and defaults (see :meth:`MemoryTask.knobs`)."""
        return self.task.knobs()
