"""Greedy evaluation episodes (argmax actions), outside the collector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rlmem.env_factory import make_vector_env


@torch.no_grad()
def evaluate_greedy(
    agent, env_cfg: Mapping[str, Any], n_episodes: int, seed: int, success_threshold: float | None,
    max_steps: int = 100_000,
) -> dict[str, float]:
    """Run one greedy episode in each of ``n_episodes`` parallel envs.

    Returns ``eval_return`` (mean), ``eval_success`` (fraction of episodes with return >=
    ``success_threshold``, NaN when the env defines none) and ``eval_length`` (mean steps).
    """
    vec = make_vector_env(env_cfg, n_episodes, for_torchrl=False)
    obs, _ = vec.reset(seed=seed)
    state = agent.memory.initial_state(n_episodes)
    is_init = torch.ones(n_episodes, dtype=torch.bool)
    done = np.zeros(n_episodes, dtype=bool)
    returns = np.zeros(n_episodes)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    for _ in range(max_steps):
        action, state = agent.act_greedy(torch.as_tensor(obs, dtype=torch.float32), state, is_init)
        is_init = torch.zeros_like(is_init)
        obs, reward, terminated, truncated, _ = vec.step(action.numpy())
        returns[~done] += reward[~done]
        lengths[~done] += 1
        done |= terminated | truncated
        if done.all():
            break
    vec.close()
    success = float("nan") if success_threshold is None else float(np.mean(returns >= success_threshold))
    return {"eval_return": float(returns.mean()), "eval_success": success, "eval_length": float(lengths.mean())}
