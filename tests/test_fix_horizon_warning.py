"""A run that cannot learn is announced before it starts: PPO's replayed slices shorter than the env's memory
horizon (``env.delay=100`` with the default ``ppo.seq_len=64``)."""

from __future__ import annotations

import gymnasium as gym
import pytest

from rlmem.env_factory import horizon_warning, memory_horizon
from rlmem.envs import ENV_IDS
from rlmem.envs.core import TaskVectorEnv
from rlmem.suite import long_episode_overrides


def test_delay_100_with_the_default_seq_len_is_warned_about():
    text = horizon_warning({"id": "rlmem/DelayedCue-v0", "delay": 100}, seq_len=64, rollout_len=64)
    assert text is not None
    assert "102" in text and "ppo.seq_len=64" in text and "ppo.rollout_len=64" in text
    assert "ppo.seq_len and ppo.rollout_len >= 102" in text
    # slices of the power of two >= 2 x 102 steps, 2048 // 256 envs: what the benchmark suites use too
    assert "ppo.rollout_len=256 ppo.seq_len=256 ppo.num_envs=8" in text
    assert long_episode_overrides("gru", 102) == ["ppo.rollout_len=256", "ppo.seq_len=256", "ppo.num_envs=8"]


@pytest.mark.parametrize("env_cfg, seq_len, rollout_len, warned", [
    ({"id": "rlmem/DelayedCue-v0", "delay": 10}, 64, 64, False),      # horizon 12 fits
    ({"id": "rlmem/DelayedCue-v0", "delay": 100}, 128, 128, False),   # the fix
    ({"id": "rlmem/DelayedCue-v0", "delay": 100}, 128, None, False),
    ({"id": "rlmem/DelayedCue-v0", "delay": 100}, 128, 64, True),     # a rollout too short is named too
    ({"id": "rlmem/MemoryLength-v0", "memory_length": 80}, 64, 64, True),
    ({"id": "rlmem/RepeatPrevious-v0", "k": 4}, 16, 64, False),       # k + 1 steps, not the 51-step episode
    ({"id": "CartPole-v1"}, 8, 8, False),                             # unknown horizon: nothing to say
])
def test_warned_only_when_a_slice_cannot_hold_the_horizon(env_cfg, seq_len, rollout_len, warned):
    text = horizon_warning(env_cfg, seq_len, rollout_len)
    assert (text is not None) == warned
    if warned:
        assert "ppo.rollout_len=64" in text


def test_rlmem_tasks_know_their_memory_horizon():
    assert memory_horizon({"id": "rlmem/DelayedCue-v0", "delay": 100}) == 102
    assert memory_horizon({"id": "rlmem/MemoryLength-v0", "memory_length": 80}) == 81
    assert memory_horizon({"id": "rlmem/RepeatPrevious-v0", "k": 32}) == 33
    assert memory_horizon({"id": "CartPole-v1"}) is None
    for env_id in ENV_IDS.values():  # every task answers (an int or None) without raising
        spec = gym.spec(env_id)
        vec_cls = gym.envs.registration.load_env_creator(spec.vector_entry_point)
        if isinstance(vec_cls, type) and issubclass(vec_cls, TaskVectorEnv):
            horizon = memory_horizon({"id": env_id})
            assert horizon is None or horizon >= 1


def test_the_trainer_warns_before_training(tmp_path, caplog):
    from rlmem.agents import build_agent
    from rlmem.ppo import PPOConfig, RecurrentPPO

    env = {"id": "rlmem/DelayedCue-v0", "delay": 100}
    agent = build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env)
    with caplog.at_level("WARNING", logger="rlmem"):
        RecurrentPPO(agent, env, PPOConfig(num_envs=4), tmp_path / "run", total_frames=256, verbose=0)
    assert any("ppo.seq_len and ppo.rollout_len >= 102" in r.getMessage() for r in caplog.records)
