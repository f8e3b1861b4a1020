"""rlmem's packages install under ``rlmem.`` so a user's own ``envs/`` or ``agents/`` folder cannot shadow them."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_user_folders_named_envs_and_agents_do_not_shadow_rlmem(tmp_path):
    for name in ("envs", "agents", "lm_tasks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    code = textwrap.dedent(
        """
        import gymnasium as gym
        import rlmem
        import envs, agents, lm_tasks  # the user's own packages, first on sys.path
        assert (envs.WHO, agents.WHO, lm_tasks.WHO) == ("user envs", "user agents", "user lm_tasks")
        env = gym.make("rlmem/DelayedCue-v0", delay=2)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (5,)
        from rlmem.agents import build_agent
        from rlmem.ppo import PPOConfig, RecurrentPPO
        ppo = PPOConfig(num_envs=2, rollout_len=4, seq_len=4, minibatches=1, eval_episodes=2)
        env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
        agent = build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env_cfg)
        trainer = RecurrentPPO(agent, env_cfg, ppo, "run", progress_bar=False)
        from rlmem.lm_tasks import build_task
        assert build_task("copy_memory").vocab_size > 0
        print("ok", type(trainer.agent).__module__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "rlmem.agents"]


def test_the_core_does_not_import_the_agents():
    """Agents build on rlmem (memory, envs, trainer), never the reverse: the trainer takes an agent object."""
    code = ("import sys, rlmem, rlmem.ppo, rlmem.evaluate, rlmem.env_factory, rlmem.suite, rlmem.suite_report; "
            "print(sorted(m for m in sys.modules if m.startswith('rlmem.agents')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
