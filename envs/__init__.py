"""rlmem's Gymnasium memory environments, registered as ``rlmem/<Name>-v0`` on import.

``ENV_IDS`` maps the config names used by ``scripts/train_rl.py`` (``env=delayed_cue``) to the ids.
"""

from __future__ import annotations

import gymnasium as gym

ENV_IDS: dict[str, str] = {}


def register_task_env(config_name: str, name: str, module: str) -> None:
    """Register ``rlmem/<name>-v0`` from ``module``'s ``<name>Env`` and ``<name>VectorEnv`` classes."""
    env_id = f"rlmem/{name}-v0"
    ENV_IDS[config_name] = env_id
    if env_id in gym.registry:
        return
    gym.register(
        id=env_id,
        entry_point=f"{module}:{name}Env",
        vector_entry_point=f"{module}:{name}VectorEnv",
    )


register_task_env("delayed_cue", "DelayedCue", "rlmem.envs.delayed_cue")
register_task_env("tmaze_passive", "TMazePassive", "rlmem.envs.tmaze")
register_task_env("tmaze_active", "TMazeActive", "rlmem.envs.tmaze")
register_task_env("repeat_previous", "RepeatPrevious", "rlmem.envs.cards")
register_task_env("repeat_first", "RepeatFirst", "rlmem.envs.cards")
register_task_env("count_recall", "CountRecall", "rlmem.envs.cards")
register_task_env("autoencode", "Autoencode", "rlmem.envs.cards")
register_task_env("position_only_cartpole", "PositionOnlyCartPole", "rlmem.envs.cartpole")
register_task_env("position_only_pendulum", "PositionOnlyPendulum", "rlmem.envs.pendulum")
register_task_env("memory_length", "MemoryLength", "rlmem.envs.memory_length")
register_task_env("copy_memory", "CopyMemory", "rlmem.envs.lm_sequence")
register_task_env("assoc_recall", "AssocRecall", "rlmem.envs.lm_sequence")
register_task_env("selective_copy", "SelectiveCopy", "rlmem.envs.lm_sequence")
register_task_env("induction_head", "InductionHead", "rlmem.envs.lm_sequence")
register_task_env("babi", "BabiQA", "rlmem.envs.lm_sequence")

__all__ = ["ENV_IDS", "register_task_env"]
