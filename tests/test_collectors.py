"""Collectors (rlmem/collectors.py): worker processes and Ray actors give PPO the batch layout it expects
(one env's consecutive steps per row, the memory-state conventions intact), act with the trainer's latest
weights, train to the end; config errors; the Ray suite launcher. Ray tests are skipped without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from rlmem.agents import build_agent

from rlmem.collectors import CollectorConfig, EnvFactory, build_collector
from rlmem.env_factory import MissingDependencyError
from rlmem.ppo import PPOConfig, RecurrentPPO

ROOT = Path(__file__).resolve().parents[1]
TINY_AGENT = {"memory": "gru", "encoder_dim": 8, "hidden_size": 8}
SMALL = dict(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=1, eval_episodes=4)


class CountingEnv(gym.Env):
    """Observation: [step index within the episode, the episode's random id]; episodes of 5 steps (a
    TimeLimit truncates them). Only this env's own consecutive steps count up by one with the same id."""

    observation_space = gym.spaces.Box(0.0, 1e9, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, float(self.np_random.integers(1, 1_000_000))
        return np.array([0.0, self.episode], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t, self.episode], dtype=np.float32), 0.0, False, False, {}


if "CountingEnv-v0" not in gym.registry:  # registered here only: workers get it from the EnvFactory
    gym.register("CountingEnv-v0", entry_point=CountingEnv, max_episode_steps=5)


def collect(kind: str, env_cfg, num_envs=4, rollout_len=16, batches=1, **options):
    """``batches`` batches ``[num_envs, rollout_len]`` of a fresh gru agent, as the trainer reshapes them."""
    agent = build_agent(TINY_AGENT, env_cfg)
    cfg = CollectorConfig.from_mapping({"type": kind, **options}, num_envs)
    make_env = EnvFactory(env_cfg, num_envs, agent.memory_module.make_tensordict_primer(), seed=0)
    collector = build_collector(cfg, make_env, agent.policy, num_envs * rollout_len)
    out = []
    try:
        for data in collector:
            out.append(data.reshape(num_envs, rollout_len))
            if len(out) == batches:
                break
            collector.update_policy_weights_()
    finally:
        collector.shutdown()
    return out


def check_rows_are_consecutive_steps(data):
    """Every row is one env's consecutive steps; the memory-state conventions hold across steps."""
    obs, nxt = data["observation"], data["next", "observation"]
    is_init = data["is_init"].squeeze(-1)
    # each step's next observation is the step after it, in the same episode
    assert torch.equal(nxt[..., 0], obs[..., 0] + 1) and torch.equal(nxt[..., 1], obs[..., 1])
    # within a row, the step after t is t's next step unless an episode starts there
    cont = ~is_init[:, 1:]
    assert torch.equal(obs[:, 1:][cont], nxt[:, :-1][cont])
    assert torch.equal(is_init, obs[..., 0] == 0)  # a new episode starts exactly where is_init
    assert data["next", "truncated"].squeeze(-1)[obs[..., 0] == 4].all()
    # the state a step starts from is the state the previous step ended with; a new episode starts at zero
    state, next_state = data["memory_state", "h"], data["next", "memory_state", "h"]
    assert torch.equal(state[:, 1:][cont], next_state[:, :-1][cont])
    assert (state[is_init] == 0).all() and (state[~is_init].abs().sum(-1) > 0).all()
    # the rows are different envs (each env of each worker has its own seed)
    first_episode = obs[:, 0, 1]
    assert len(set(first_episode.tolist())) == data.shape[0], first_episode


def test_process_collector_rows_are_one_envs_consecutive_steps():
    batches = collect("process", {"id": "CountingEnv-v0"}, num_envs=4, rollout_len=12, batches=2, num_workers=2)
    for data in batches:
        assert data.shape == (4, 12)
        check_rows_are_consecutive_steps(data)
    # the second batch continues the first one's episodes, row by row
    first, second = batches
    steps_on = (first["next", "observation"][:, -1, 0] % 5) == second["observation"][:, 0, 0]
    assert steps_on.all()


def test_sync_collector_layout_is_the_same():
    (data,) = collect("sync", {"id": "CountingEnv-v0"}, num_envs=4, rollout_len=12)
    check_rows_are_consecutive_steps(data)


def test_workers_act_with_the_weights_sent_after_each_update():
    """After update_policy_weights_(), every worker samples from the trainer's current policy."""
    env_cfg = {"id": "CountingEnv-v0"}
    agent = build_agent(TINY_AGENT, env_cfg)
    cfg = CollectorConfig.from_mapping({"type": "process", "num_workers": 2}, 4)
    make_env = EnvFactory(env_cfg, 4, agent.memory_module.make_tensordict_primer())
    collector = build_collector(cfg, make_env, agent.policy, 4 * 8)
    head = agent.policy_params
    try:
        batches = iter(collector)
        next(batches)
        for forced in (2, 0, 1):  # a policy that always picks `forced`
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(-50.0)
                head.bias[forced] = 50.0
            collector.update_policy_weights_()
            data = next(batches)
            assert (data["action"] == forced).all(), (forced, data["action"])
    finally:
        collector.shutdown()


def test_workers_sample_independently_and_reproducibly():
    """A uniform policy: the actions are the workers' random draws, different per worker, the same per seed."""
    env_cfg = {"id": "CountingEnv-v0"}
    draws = []
    for _ in range(2):
        agent = build_agent(TINY_AGENT, env_cfg)
        with torch.no_grad():
            agent.policy_params.weight.zero_()
            agent.policy_params.bias.zero_()
        cfg = CollectorConfig.from_mapping({"type": "process", "num_workers": 2}, 4)
        make_env = EnvFactory(env_cfg, 4, agent.memory_module.make_tensordict_primer(), seed=3)
        collector = build_collector(cfg, make_env, agent.policy, 4 * 16)
        try:
            draws.append(next(iter(collector)).reshape(4, 16)["action"])
        finally:
            collector.shutdown()
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0][:2], draws[0][2:])  # worker 0's rows vs worker 1's


def test_a_tiny_run_with_the_process_collector_finishes_and_records_it(tmp_path):
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
    trainer = RecurrentPPO(build_agent(TINY_AGENT, env_cfg), env_cfg, PPOConfig(**SMALL, eval_interval=128), tmp_path,
                           total_frames=192, progress_bar=False, collector={"type": "process", "num_workers": 2})
    metrics = trainer.train()
    assert metrics["frames"] == 192 and 0 <= metrics["eval_success"] <= 1
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["collector"] == {"type": "process", "num_workers": 2}
    assert (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("cfg, num_envs, match", [
    ({"type": "threads"}, 4, r"collector.type='threads' is not a collector; valid choices: process, ray, sync"),
    ({"type": "process", "num_workers": 0}, 4, "num_workers must be auto or an integer >= 1, got 0"),
    ({"type": "process", "num_workers": "two"}, 4, "num_workers must be auto or an integer >= 1"),
    ({"type": "process", "num_workers": 3}, 32,
     r"num_workers=3 must divide ppo.num_envs=32 .*valid: \[1, 2, 4, 8, 16, 32\]"),
    ({"type": "process", "workers": 2}, 4,
     r"collector.workers is not an option of collector=process \(did you mean 'num_workers'\?\); valid: num_workers, type"),
    ({"type": "sync", "num_workers": 2}, 4, r"collector.num_workers is not an option of collector=sync; valid: type"),
    ({"type": "process", "address": "auto"}, 4, r"collector.address is not an option of collector=process; valid: num_workers, type"),
    ({"type": "ray", "remote_configs": 1}, 4, "remote_configs must be a mapping"),
])
def test_config_errors_name_the_valid_choices(cfg, num_envs, match):
    with pytest.raises(ValueError, match=match):
        CollectorConfig.from_mapping(cfg, num_envs)


@pytest.mark.parametrize("cores, num_envs, workers", [(2, 64, 2), (8, 64, 8), (6, 64, 4), (3, 7, 1), (16, 4, 4)])
def test_auto_workers_are_one_per_usable_core_that_divides_the_envs(monkeypatch, cores, num_envs, workers):
    monkeypatch.setattr("rlmem.collectors.usable_cores", lambda: cores)
    assert CollectorConfig.from_mapping({"type": "process", "num_workers": "auto"}, num_envs).num_workers == workers
    assert CollectorConfig.from_mapping({"type": "process"}, num_envs).num_workers == workers


def test_config_errors_stop_the_trainer_before_training(tmp_path):
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
    with pytest.raises(ValueError, match="must divide ppo.num_envs=4"):
        RecurrentPPO(build_agent(TINY_AGENT, env_cfg), env_cfg, PPOConfig(**SMALL), tmp_path,
                     collector={"type": "process", "num_workers": 3})
    assert not (tmp_path / "metrics.json").exists()


def test_a_trigger_cost_still_warming_up_needs_the_sync_collector(tmp_path):
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
    agent_cfg = {"memory": "infinity", "encoder_dim": 16, "d_model": 16, "n_heads": 2, "mem_slots": 8, "d_state": 4}
    trigger = {"policy": "learned", "cost_coef": 1.0, "cost_warmup": 1000}
    with pytest.raises(ValueError, match="collector=process cannot ramp up the trigger's compute cost"):
        RecurrentPPO(build_agent(agent_cfg, env_cfg, trigger), env_cfg, PPOConfig(**SMALL), tmp_path,
                     collector={"type": "process", "num_workers": 2})
    # no warm-up: the workers charge the full cost from the start, as the trainer would
    RecurrentPPO(build_agent(agent_cfg, env_cfg, {**trigger, "cost_warmup": 0}), env_cfg, PPOConfig(**SMALL),
                 tmp_path, collector={"type": "process", "num_workers": 2})


def test_ray_without_ray_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[ray\]"'):
        CollectorConfig.from_mapping({"type": "ray"}, 4)
    from rlmem.suite import execute

    with pytest.raises(ImportError, match=r'launcher=ray needs Ray.*pip install -e "\.\[ray\]"'):
        execute([], "unused", 1, launcher="ray")


def test_train_rl_reports_a_collector_error_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_rl.py"), "collector=process",
                           "collector.num_workers=3", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "collector.num_workers=3 must divide ppo.num_envs=32" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_suite_launcher_must_be_known(tmp_path):
    from rlmem.suite import execute

    with pytest.raises(ValueError, match="launcher='slurm'; valid choices: local, ray"):
        execute([], tmp_path, 1, launcher="slurm")


# --- Ray (skipped without it) ---------------------------------------------------------------------------

RAY_LOCAL = {"address": None, "ray_init_config": {"num_cpus": 2, "include_dashboard": False},
             "remote_configs": {"num_cpus": 1}}


def test_ray_collector_rows_are_one_envs_consecutive_steps():
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    batches = collect("ray", {"id": "CountingEnv-v0"}, num_envs=4, rollout_len=12, batches=2, num_workers=2,
                      **RAY_LOCAL)
    for data in batches:
        assert data.shape == (4, 12)
        check_rows_are_consecutive_steps(data)


def test_a_tiny_run_with_the_ray_collector_finishes_and_records_it(tmp_path):
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
    collector = {"type": "ray", "num_workers": 2, **RAY_LOCAL}
    trainer = RecurrentPPO(build_agent(TINY_AGENT, env_cfg), env_cfg, PPOConfig(**SMALL, eval_interval=128), tmp_path,
                           total_frames=192, progress_bar=False, collector=collector)
    metrics = trainer.train()
    assert metrics["frames"] == 192
    assert json.loads((tmp_path / "metrics.json").read_text())["collector"] == {"type": "ray", "num_workers": 2,
                                                                                 **RAY_LOCAL}


def test_the_ray_launcher_runs_a_suite_like_the_local_one(tmp_path):
    """Each run a Ray task running the same command: the same files; a rerun skips the finished runs."""
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    from rlmem.suite import execute, finished, plan

    overrides = ["total_frames=256", "ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2",
                 "ppo.epochs=1", "ppo.eval_episodes=4", "agent.hidden_size=8", "agent.encoder_dim=8"]
    runs = plan({"g": {"script": "train_rl", "agents": ["gru"], "env": "delayed_cue", "sweep": {"delay": [2]},
                       "seeds": [0, 1], "overrides": overrides}})
    ray_init = {"address": None, "num_cpus": 2}
    assert execute(runs, tmp_path, 2, launcher="ray", ray_init_config=ray_init) == []
    for run in runs:
        run_dir = run.run_dir(tmp_path)
        assert finished(run, tmp_path)
        assert {"metrics.json", "output.log", "suite_run.json", "train_rl.log"} <= {p.name for p in run_dir.iterdir()}
        assert json.loads((run_dir / "suite_run.json").read_text()) == run.arguments()
        assert (run_dir / "checkpoints" / "last.pt").exists()
    stamps = {run: (run.run_dir(tmp_path) / "metrics.json").stat().st_mtime_ns for run in runs}
    assert execute(runs, tmp_path, 2, launcher="ray", ray_init_config=ray_init) == []
    assert all((run.run_dir(tmp_path) / "metrics.json").stat().st_mtime_ns == stamps[run] for run in runs)


def test_a_stopped_ray_suite_stops_its_runs_with_a_checkpoint(tmp_path):
    """SIGTERM to the suite: the Ray tasks are cancelled, their scripts get SIGTERM and checkpoint, and the
    suite says how to continue, as with the local launcher."""
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    code = f"""
import logging, sys
from rlmem.suite import execute, plan
logging.basicConfig(level=logging.INFO)
overrides = ["total_frames=5000000", "ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2",
             "ppo.epochs=1", "ppo.eval_episodes=4", "agent.hidden_size=8", "agent.encoder_dim=8"]
runs = plan({{"g": {{"script": "train_rl", "agents": ["gru"], "env": "delayed_cue", "seeds": [0],
                   "overrides": overrides}}}})
execute(runs, {str(tmp_path)!r}, 1, launcher="ray", ray_init_config={{"address": None, "num_cpus": 1}})
"""
    suite = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = tmp_path / "runs" / "g" / "gru-delayed_cue-seed0"
    deadline = time.time() + 180
    while not (run_dir / "metrics.json").exists():  # written at the first batch
        assert suite.poll() is None and time.time() < deadline, suite.communicate()[0][-3000:]
        time.sleep(0.5)
    suite.send_signal(signal.SIGTERM)
    out = suite.communicate(timeout=240)[0]
    assert "suite stopped by SIGTERM; rerun the same command to continue it" in out, out[-3000:]
    assert "train_rl: stopped by SIGTERM" in (run_dir / "output.log").read_text()
    assert (run_dir / "checkpoints" / "last.pt").exists()
