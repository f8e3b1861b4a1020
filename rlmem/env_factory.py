"""Build vectorized envs from an env config (``{"id": ..., **kwargs}``) for training and evaluation.

rlmem's own envs come from their native ``vector_entry_point`` with ``autoreset_mode=DISABLED`` (the
mode TorchRL's ``GymWrapper`` prefers: it resets finished rows itself). Any other Gymnasium id is run in
a ``SyncVectorEnv`` with ``SAME_STEP`` autoreset, which ``GymWrapper`` also accepts.

An id may name the module that registers it, Gymnasium's ``"my_module:MyEnv-v0"`` convention: the module
is imported first (from ``sys.path`` or the working directory).

Spaces (:func:`check_spaces`): actions ``Discrete``, ``MultiDiscrete`` or a 1-d float ``Box`` with finite
bounds; observations a ``Box`` of rank 1-3 (rank 3 = an image), ``Discrete``, ``MultiDiscrete`` (1-d),
``MultiBinary``, or a ``Dict`` / ``Tuple`` of those. A ``Tuple`` observation reaches the agent as a ``Dict``
with keys ``"0"``, ``"1"``, ... (:class:`TupleAsDict`, wrapped around each env).

Infos: rlmem reads nothing from an env's ``info``, and TorchRL's ``GymWrapper`` turns every info key into a
tensordict entry, which fails on keys that are not numbers (strings, objects) or come and go (a key of the
``reset()`` info that ``step()`` lacks: a KeyError from the final-observation reader). So the infos of the
Gymnasium envs rlmem wraps are dropped (:class:`IgnoreInfo`): an env's info content never stops a run. TorchRL's ``GymWrapper`` writes a ``Dict`` observation's entries as top-level keys of the
tensordict; :func:`make_torchrl_env` nests them under ``"observation"`` (a ``RenameTransform``), so
``td["observation"]`` is the whole observation for every space (a tensor, or a sub-tensordict with the
Dict's keys) and the primer, the PPO bootstrap and the encoders need no case of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from tensordict import TensorDict
from torchrl.envs import Compose, DoubleToFloat, InitTracker, RenameTransform, RewardSum, TransformedEnv
from torchrl.envs.libs.gym import GymWrapper

import rlmem.envs  # noqa: F401  (registers rlmem/ ids)
from rlmem.envs.core import TaskVectorEnv
from rlmem.user_code import import_module
from rlmem.validate import suggest


class MissingDependencyError(ImportError):
    """An env needs an optional package that is not installed (the message says what to install)."""


def split_env_config(env_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``{"id": ..., **kwargs}`` -> ``(registered id, kwargs)``; a ``"module:Env-v0"`` id imports ``module``."""
    cfg = dict(env_cfg)
    if "id" not in cfg:
        raise ValueError("env config needs an `id` (a registered Gymnasium id)")
    return resolve_env_id(cfg.pop("id")), cfg


def resolve_env_id(env_id: str) -> str:
    """The registered id for ``env_id``, importing the module of a ``"module:Env-v0"`` id first."""
    if not isinstance(env_id, str):
        raise ValueError(f"env.id must be a string, got {env_id!r}")
    module, sep, name = env_id.rpartition(":")
    if sep:
        import_module(module)
        env_id = name
    if env_id not in gym.registry:
        ids = sorted(gym.registry)
        rlmem_ids = [i for i in ids if i.startswith("rlmem/")]
        raise ValueError(f"env.id={env_id!r} is not a registered Gymnasium id{suggest(env_id, ids)}; valid: "
                         f"{', '.join(rlmem_ids)}, any of the {len(ids)} ids in gymnasium.registry, or "
                         "'my_module:MyEnv-v0' to import the module that registers it")
    return env_id


class IgnoreInfo(gym.Wrapper):
    """An env whose ``reset()`` and ``step()`` infos are empty (see the module docstring: rlmem reads no
    info, and TorchRL fails on info keys that are not numbers or not present on every step)."""

    def reset(self, **kwargs):
        obs, _ = self.env.reset(**kwargs)
        return obs, {}

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {}


def _tuple_as_dict(space: gym.Space) -> gym.Space:
    if isinstance(space, gym.spaces.Tuple):
        return gym.spaces.Dict({str(i): _tuple_as_dict(sub) for i, sub in enumerate(space.spaces)})
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: _tuple_as_dict(sub) for k, sub in space.spaces.items()})
    return space


def _has_tuple(space: gym.Space) -> bool:
    if isinstance(space, gym.spaces.Tuple):
        return True
    return isinstance(space, gym.spaces.Dict) and any(_has_tuple(s) for s in space.spaces.values())


class TupleAsDict(gym.ObservationWrapper):
    """A ``Tuple`` observation (anywhere in the space) as a ``Dict`` keyed ``"0"``, ``"1"``, ...: what
    TorchRL's ``GymWrapper`` and rlmem's encoders take (a Tuple of unlike spaces cannot be stacked)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = _tuple_as_dict(env.observation_space)

    def observation(self, observation):
        return self._convert(observation, self.env.observation_space)

    def _convert(self, obs, space):
        if isinstance(space, gym.spaces.Tuple):
            return {str(i): self._convert(o, sub) for i, (o, sub) in enumerate(zip(obs, space.spaces, strict=True))}
        if isinstance(space, gym.spaces.Dict):
            return {k: self._convert(obs[k], sub) for k, sub in space.spaces.items()}
        return obs


def _wrap(env: gym.Env) -> gym.Env:
    """Each Gymnasium env rlmem wraps (not rlmem's own): infos dropped, Tuple observations as Dicts."""
    env = IgnoreInfo(env)
    return TupleAsDict(env) if _has_tuple(env.observation_space) else env


def make_vector_env(env_cfg: Mapping[str, Any], num_envs: int, *, for_torchrl: bool = True,
                    space_check: SpaceCheck | None = None) -> gym.vector.VectorEnv:
    """A Gymnasium vector env; invalid ids or kwargs raise before anything is trained, and so do spaces
    ``space_check`` refuses (see :func:`check_spaces`)."""
    env_id, kwargs = split_env_config(env_cfg)
    spec = gym.spec(env_id)
    native = spec.vector_entry_point is not None and env_id.startswith("rlmem/")
    mode = AutoresetMode.DISABLED if for_torchrl else AutoresetMode.NEXT_STEP
    try:
        if native:
            vec = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                               autoreset_mode=mode, **kwargs)
        else:
            vec = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                               vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, wrappers=[_wrap], **kwargs)
    except gym.error.DependencyNotInstalled as err:
        raise MissingDependencyError(f"{env_id} needs an optional dependency: {err}") from None
    check_spaces(env_id, vec, space_check)
    return vec


def effective_env_kwargs(env_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor kwargs an env config really runs with: an rlmem env's knobs after presets and
    defaults; for any other id, the registered spec's kwargs updated by the config's."""
    env_id, kwargs = split_env_config(env_cfg)
    vec = make_vector_env(env_cfg, 1, for_torchrl=False)
    try:
        if isinstance(vec, TaskVectorEnv):
            return vec.knobs()
        spec = gym.spec(env_id)
        return {**spec.kwargs, "max_episode_steps": spec.max_episode_steps, **kwargs}
    finally:
        vec.close()


#: ``check(observation_space, action_space)`` raising a ValueError for spaces an agent cannot use (the agent
#: builder passes its own: this layer does not know the agents)
SpaceCheck = Callable[[gym.Space, gym.Space], None]


def check_spaces(env_id: str, vec: gym.vector.VectorEnv, space_check: SpaceCheck | None = None) -> None:
    """Raise a ValueError naming the supported spaces unless ``space_check`` accepts ``vec``'s spaces and
    TorchRL's ``GymWrapper`` can wrap them."""
    if space_check is not None:
        try:
            space_check(vec.single_observation_space, vec.single_action_space)
        except ValueError as err:
            raise ValueError(f"{env_id}: {err}") from None
    obs = vec.single_observation_space
    if isinstance(obs, gym.spaces.Dict) and {"observation", "state"} & set(obs.spaces):
        # GymWrapper renames a "state" entry to "observation": both would collide with the nesting below
        raise ValueError(f"{env_id}: Dict observations with an entry named 'observation' or 'state' are not "
                         f"supported (rlmem nests the entries under 'observation'); got keys {list(obs.spaces)}")


def env_spaces(env_cfg: Mapping[str, Any], space_check: SpaceCheck | None = None):
    """``(observation space, action space, TorchRL action spec)`` of one env: what an agent is built from
    (``space_check``: the builder's check of the spaces, run before TorchRL wraps them)."""
    probe = make_torchrl_env(env_cfg, 1, space_check=space_check)
    try:
        vec = probe.base_env._env  # the Gymnasium vector env GymWrapper wraps
        return vec.single_observation_space, vec.single_action_space, probe.action_spec_unbatched
    finally:
        probe.close()


def make_torchrl_env(env_cfg: Mapping[str, Any], num_envs: int, primer=None, extra=(),
                     space_check: SpaceCheck | None = None) -> TransformedEnv:
    """The collector's env: GymWrapper + InitTracker (``is_init``) + RewardSum + the memory primer + the
    ``extra`` transforms (after RewardSum: the episode return stays the env's); float64 observations as
    float32; a Dict observation's entries nested under ``"observation"``."""
    vec = make_vector_env(env_cfg, num_envs, space_check=space_check)
    base = GymWrapper(vec, categorical_action_encoding=True, device="cpu")
    transforms = [InitTracker(), RewardSum()]
    obs_space = vec.single_observation_space
    if isinstance(obs_space, gym.spaces.Dict):
        keys = list(obs_space.spaces)
        transforms.insert(0, RenameTransform(keys, [("observation", k) for k in keys]))
        floats64 = [("observation", k) for k, s in obs_space.spaces.items() if s.dtype == np.float64]
        if floats64:
            transforms.insert(1, DoubleToFloat(in_keys=floats64))
    elif obs_space.dtype == np.float64:
        transforms.insert(0, DoubleToFloat(in_keys=["observation"]))
    if primer is not None:
        transforms.append(primer)
    transforms.extend(extra)
    if isinstance(base, TransformedEnv):  # GymWrapper adds VecGymEnvTransform for SAME_STEP autoreset
        base.append_transform(Compose(*transforms))
        return base
    return TransformedEnv(base, Compose(*transforms))


def task_vector_env(env_cfg: Mapping[str, Any]) -> tuple[type[TaskVectorEnv], dict[str, Any]] | None:
    """``(vector env class, kwargs)`` of an rlmem task env (its ``task_cls`` knows the task's optimal and
    chance returns and memory horizon), None for any other env."""
    env_id, kwargs = split_env_config(env_cfg)
    if not env_id.startswith("rlmem/"):
        return None
    entry = gym.spec(env_id).vector_entry_point
    vec_cls = None if entry is None else gym.envs.registration.load_env_creator(entry)
    if not (isinstance(vec_cls, type) and issubclass(vec_cls, TaskVectorEnv)):
        return None
    return vec_cls, kwargs


def success_threshold(env_cfg: Mapping[str, Any]) -> float | None:
    """Return at or above which an episode counts as a success: an rlmem task's optimal return, else the
    Gymnasium spec's ``reward_threshold`` (e.g. 475 for CartPole-v1), else None."""
    found = task_vector_env(env_cfg)
    if found is not None:
        vec_cls, kwargs = found
        return vec_cls.task_cls(num_envs=1, **kwargs).optimal_return() - 1e-6
    return gym.spec(split_env_config(env_cfg)[0]).reward_threshold


def memory_horizon(env_cfg: Mapping[str, Any]) -> int | None:
    """The memory horizon of an rlmem env (``MemoryTask.memory_horizon``: steps from what must be remembered
    to where it is needed, both included), None for other envs or when the task does not know it."""
    found = task_vector_env(env_cfg)
    if found is None:
        return None
    vec_cls, kwargs = found
    horizon = getattr(vec_cls.task_cls(num_envs=1, **kwargs), "memory_horizon", None)
    return None if horizon is None else int(horizon)


def covering_slices(episode_length: int) -> tuple[int, int]:
    """``(length, num_envs)``: PPO rollouts and replayed slices of ``length`` steps (the power of two >= 2
    episodes, so a slice holds a whole episode wherever it starts) with ``num_envs`` envs (about 2,048 frames
    per iteration, at least 4 envs): what long episodes need (the benchmark suites' ``long_episodes`` rule)."""
    length = 1 << (2 * episode_length - 1).bit_length()
    return length, max(4, 2048 // length)


def horizon_warning(env_cfg: Mapping[str, Any], seq_len: int, rollout_len: int | None = None) -> str | None:
    """A warning when PPO's replayed slices are shorter than the env's memory horizon, else None.

    PPO learns a dependency only when both of its ends fall in one replayed slice of ``ppo.seq_len`` steps
    (the gradient runs through the state between them), inside a rollout of ``ppo.rollout_len`` steps; with
    ``env.delay=100`` on DelayedCue (horizon 102) and the default ``ppo.seq_len=64`` no slice connects the cue
    to the query and the run cannot learn. The text names the settings to change: ``ppo.seq_len`` and
    ``ppo.rollout_len`` >= the horizon, and the values ``rlmem.suite.long_episode_overrides`` would pick
    (a power of two >= 2 horizons, fewer envs for about 2048 frames per iteration). Meant to be printed
    before training starts; envs of unknown horizon (any non-rlmem env) give None.
    """
    horizon = memory_horizon(env_cfg)
    if horizon is None:
        return None
    short = [f"ppo.{name}={value}" for name, value in (("seq_len", seq_len), ("rollout_len", rollout_len))
             if value is not None and int(value) < horizon]
    if not short:
        return None
    length, num_envs = covering_slices(horizon)
    env_id, _ = split_env_config(env_cfg)
    return (f"{env_id} needs memory over {horizon} steps (its memory horizon: from what must be remembered to "
            f"where it is asked for), but {' and '.join(short)} is shorter: PPO replays slices of ppo.seq_len "
            f"steps, so no slice holds both ends and the agent cannot learn the task. Set ppo.seq_len and "
            f"ppo.rollout_len >= {horizon}, e.g. ppo.rollout_len={length} ppo.seq_len={length} "
            f"ppo.num_envs={num_envs} (what the benchmark suites use for long episodes).")


def as_observation(obs, batch: bool = False):
    """A Gymnasium observation (array, or dict of arrays for a ``Dict`` space) as what the encoders take:
    a tensor, or a ``TensorDict`` of tensors; ``batch=True`` adds a leading dim of 1 (a single env's obs).

    Float arrays become float32; integer arrays keep their dtype (the encoders cast and scale them).
    """
    if isinstance(obs, Mapping):
        items = {k: as_observation(v, batch) for k, v in obs.items()}
        size = next(iter(items.values())).shape[:1] if items else ()
        return TensorDict(items, batch_size=size)
    arr = np.asarray(obs)
    tensor = torch.as_tensor(arr, dtype=torch.float32 if arr.dtype.kind == "f" else None)
    return tensor.unsqueeze(0) if batch else tensor
