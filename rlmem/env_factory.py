"""Build vectorized envs from an env config (``{"id": ..., **kwargs}``) for training and evaluation.

rlmem's own envs come from their native ``vector_entry_point`` with ``autoreset_mode=DISABLED`` (the
mode TorchRL's ``GymWrapper`` prefers: it resets finished rows itself). Any other Gymnasium id is run in
a ``SyncVectorEnv`` with ``SAME_STEP`` autoreset, which ``GymWrapper`` also accepts.

An id may name the module that registers it, Gymnasium's ``"my_module:MyEnv-v0"`` convention: the module
is imported first (from ``sys.path`` or the working directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from torchrl.envs import Compose, DoubleToFloat, InitTracker, RewardSum, TransformedEnv
from torchrl.envs.libs.gym import GymWrapper

import rlmem.envs  # noqa: F401  (registers rlmem/ ids)
from rlmem.envs.core import TaskVectorEnv
from rlmem.user_code import import_module


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
        rlmem_ids = sorted(i for i in gym.registry if i.startswith("rlmem/"))
        raise ValueError(f"unknown env id {env_id!r}; rlmem ids: {rlmem_ids} (or any registered Gymnasium id, "
                         "or 'my_module:MyEnv-v0' to import the module that registers it)")
    return env_id


def make_vector_env(env_cfg: Mapping[str, Any], num_envs: int, *, for_torchrl: bool = True) -> gym.vector.VectorEnv:
    """A Gymnasium vector env; invalid ids or kwargs raise before anything is trained."""
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
                               vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **kwargs)
    except gym.error.DependencyNotInstalled as err:
        raise MissingDependencyError(f"{env_id} needs an optional dependency: {err}") from None
    check_spaces(env_id, vec)
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


def check_spaces(env_id: str, vec: gym.vector.VectorEnv) -> None:
    if not isinstance(vec.single_action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_id}: only Discrete action spaces are supported, got {vec.single_action_space}")
    obs = vec.single_observation_space
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise ValueError(f"{env_id}: only flat Box observation spaces are supported, got {obs}")


def make_torchrl_env(env_cfg: Mapping[str, Any], num_envs: int, primer=None) -> TransformedEnv:
    """The collector's env: GymWrapper + InitTracker (``is_init``) + RewardSum + the memory primer."""
    vec = make_vector_env(env_cfg, num_envs)
    base = GymWrapper(vec, categorical_action_encoding=True, device="cpu")
    transforms = [InitTracker(), RewardSum()]
    if vec.single_observation_space.dtype != np.float32:
        transforms.insert(0, DoubleToFloat(in_keys=["observation"]))
    if primer is not None:
        transforms.append(primer)
    if isinstance(base, TransformedEnv):  # GymWrapper adds VecGymEnvTransform for SAME_STEP autoreset
        base.append_transform(Compose(*transforms))
        return base
    return TransformedEnv(base, Compose(*transforms))


def success_threshold(env_cfg: Mapping[str, Any]) -> float | None:
    """Return at or above which an episode counts as a success: an rlmem task's optimal return, else the
    Gymnasium spec's ``reward_threshold`` (e.g. 475 for CartPole-v1), else None."""
    env_id, kwargs = split_env_config(env_cfg)
    spec = gym.spec(env_id)
    if env_id.startswith("rlmem/"):
        vec_cls = gym.envs.registration.load_env_creator(spec.vector_entry_point)
        if isinstance(vec_cls, type) and issubclass(vec_cls, TaskVectorEnv):
            return vec_cls.task_cls(num_envs=1, **kwargs).optimal_return() - 1e-6
    return spec.reward_threshold
