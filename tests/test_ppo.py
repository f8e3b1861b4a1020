"""Recurrent PPO: bootstrap values, updates reach the memory, and PPO really uses memory."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.modules import set_recurrent_mode

from rlmem.env_factory import make_torchrl_env
from rlmem.memory import MemorySystem
from rlmem.agents import build_agent
from rlmem.ppo import PPOConfig, RecurrentPPO
from rlmem.run_io import NonFiniteError, load_checkpoint
from rlmem.conf import CONF_DIR

SMALL = dict(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=1, eval_episodes=4)


def make_trainer(agent_cfg, env_cfg, ppo, run_dir, **kwargs) -> RecurrentPPO:
    return RecurrentPPO(build_agent(agent_cfg, env_cfg), env_cfg, ppo, run_dir, **kwargs)


def collect_one(trainer: RecurrentPPO):
    ppo = trainer.ppo
    env = make_torchrl_env(trainer.env_cfg, ppo.num_envs, trainer.agent.memory_module.make_tensordict_primer())
    env.set_seed(0)
    collector = Collector(env, trainer.agent.policy, frames_per_batch=ppo.frames_per_batch, total_frames=-1)
    data = next(iter(collector)).reshape(ppo.num_envs, ppo.rollout_len)
    collector.shutdown()
    return data


class StepIndexEnv(gym.Env):
    """Observation = the step index within the episode / 10; no reward; truncated by a TimeLimit. A
    bootstrap computed from a reset observation or a reset state shows up as a wrong step index."""

    observation_space = gym.spaces.Box(0.0, 100.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t / 10], dtype=np.float32), 0.0, False, False, {}


if "StepIndex-v0" not in gym.registry:
    gym.register("StepIndex-v0", entry_point=StepIndexEnv, max_episode_steps=5)


def test_bootstrap_values_at_truncation_and_rollout_end(tmp_path):
    """V(next obs, next state) at every step, built independently: replay the episode's observations
    0 .. t+1 from a fresh state. At a truncation that is V(final obs 5, state after 0..4), not the value of
    the next episode's first observation, nor of a fresh state."""
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "StepIndex-v0"},
                           PPOConfig(**SMALL), tmp_path, total_frames=64, progress_bar=False)
    data = collect_one(trainer)
    t = (data["observation"][..., 0] * 10).round().long()  # [N, T] step index of each recorded step
    assert data["next", "truncated"].squeeze(-1)[t == 4].all() and (t == 4).sum() >= 4
    trainer._add_bootstrap_values(data)
    agent = trainer.agent
    with torch.no_grad():
        expected = []  # expected[k] = V after observing steps 0..k of an episode
        for k in range(6):
            obs = (torch.arange(k + 1, dtype=torch.float32) / 10).view(1, k + 1, 1)
            is_init = torch.zeros(1, k + 1, dtype=torch.bool)
            is_init[:, 0] = True
            y, _ = agent.memory(agent.encoder(obs), agent.memory.initial_state(1), is_init)
            expected.append(agent.value_head(y[0, -1]).squeeze())
        expected = torch.stack(expected)
    torch.testing.assert_close(data["state_value"].squeeze(-1), expected[t], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data["next", "state_value"].squeeze(-1), expected[t + 1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected[5], expected[0])  # the test can tell a reset observation apart


def test_an_update_changes_the_memory_parameters(tmp_path):
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "rlmem/DelayedCue-v0",
                           "delay": 2}, PPOConfig(**SMALL), tmp_path, total_frames=64, progress_bar=False)
    data = collect_one(trainer)
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    stats = trainer._update(data)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"):
        assert key in stats
    changed = {k for k, v in trainer.agent.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".memory." in k for k in changed), changed
    assert any("policy_head" in k for k in changed) and any("value_head" in k for k in changed)


def test_nan_loss_raises_a_clear_error(tmp_path):
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "rlmem/DelayedCue-v0",
                           "delay": 2}, PPOConfig(**SMALL), tmp_path, total_frames=64, progress_bar=False)
    data = collect_one(trainer)
    with torch.no_grad():
        trainer.agent.value_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer._update(data)


def train_delayed_cue(memory: str, tmp_path, frames: int):
    trainer = make_trainer(
        {"memory": memory, "encoder_dim": 64, "hidden_size": 64},
        {"id": "rlmem/DelayedCue-v0", "delay": 4, "n_cues": 4},
        PPOConfig(eval_interval=frames),
        tmp_path,
        seed=0,
        total_frames=frames,
        progress_bar=False,
    )
    return trainer.train()


def test_ppo_uses_memory_gru_solves_and_mlp_stays_at_chance(tmp_path):
    """The seeded proof that the whole pipeline uses memory: same budget, same PPO, only the memory differs."""
    gru = train_delayed_cue("gru", tmp_path / "gru", frames=80_000)
    mlp = train_delayed_cue("mlp", tmp_path / "mlp", frames=80_000)
    assert gru["eval_success"] >= 0.9, gru
    assert mlp["eval_success"] <= 0.45, mlp  # chance is 1/4


ENV_CONFIGS = sorted(p.stem for p in (CONF_DIR / "env").glob("*.yaml"))


@pytest.mark.parametrize("env_name", ENV_CONFIGS)
def test_trainer_runs_on_every_env_config(tmp_path, env_name):
    """One tiny iteration + evaluation on each env config (the RL memory suite and the LM sequence envs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = CONF_DIR
    with initialize_config_dir(str(conf), version_base="1.3"):
        env_cfg = OmegaConf.to_container(compose("train_rl", overrides=[f"env={env_name}"]).env)
    ppo = PPOConfig(num_envs=2, rollout_len=8, seq_len=4, minibatches=2, epochs=1, eval_episodes=2)
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env_cfg, ppo, tmp_path,
                           total_frames=16, progress_bar=False)
    metrics = trainer.train()
    assert metrics["frames"] == 16 and np.isfinite(metrics["eval_return"])


def test_a_one_batch_run_learns_at_the_full_learning_rate(tmp_path):
    """lr is annealed from the frames before each batch: the last (here the only) update is not at lr 0."""
    cfg = PPOConfig(**SMALL)
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "rlmem/DelayedCue-v0",
                           "delay": 2}, cfg, tmp_path, total_frames=cfg.frames_per_batch, progress_bar=False)
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    trainer.train()
    changed = [k for k, v in trainer.agent.state_dict().items() if not torch.equal(v, before[k])]
    assert any("policy_head" in k for k in changed), changed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx([cfg.lr])


def test_minibatches_are_equal_and_must_divide_the_slices(tmp_path):
    with pytest.raises(ValueError, match=r"minibatches=4 must divide .* = 10 .*valid: \[1, 2, 5, 10\]"):
        PPOConfig(num_envs=10, rollout_len=8, seq_len=8, minibatches=4)
    cfg = PPOConfig(num_envs=6, rollout_len=8, seq_len=4, minibatches=3, epochs=2, eval_episodes=2)
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "rlmem/DelayedCue-v0",
                           "delay": 2}, cfg, tmp_path, total_frames=48, progress_bar=False)
    sizes = []
    trainer.loss_module.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    trainer._update(collect_one(trainer))
    assert sizes == [4] * 6  # 12 slices, 3 equal minibatches, 2 epochs


class ScaledMemory(MemorySystem):
    """``h <- w * h + x`` with a learned scalar ``w``: finite while |w| < 1, explodes when w is huge."""

    def __init__(self, d_in: int, hidden_size: int = 8):
        super().__init__()
        self.d_in = self.d_out = d_in
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def initial_state(self, batch_size, device=None):
        return TensorDict({"h": torch.zeros(batch_size, self.d_in, device=device)}, batch_size=[batch_size])

    def step(self, x, state):
        h = self.w * state["h"] + x
        return h, TensorDict({"h": h}, batch_size=state.batch_size)


def test_a_non_finite_memory_state_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = PPOConfig(**SMALL)
    trainer = make_trainer({"memory": "test_ppo:ScaledMemory", "encoder_dim": 8}, {"id": "rlmem/DelayedCue-v0",
                           "delay": 30}, cfg, tmp_path, total_frames=cfg.frames_per_batch, progress_bar=False)
    trainer.train()
    good = load_checkpoint(trainer.checkpoint_path)
    assert good["frames"] == cfg.frames_per_batch
    with torch.no_grad():
        trainer.agent.memory.w.fill_(1e30)  # the state overflows to inf within a few steps
    trainer.total_frames = 4 * cfg.frames_per_batch
    with pytest.raises(NonFiniteError, match=r"state of memory system 'test_ppo:ScaledMemory' .*frames=64 "
                                             r"\(entry 'h'\).*checkpoint .*last.pt \(frames=64\) is kept"):
        trainer.train()
    kept = load_checkpoint(trainer.checkpoint_path)
    assert kept["frames"] == good["frames"]
    for key, value in kept["agent"].items():
        torch.testing.assert_close(value, good["agent"][key], rtol=0, atol=0)


class SequenceNaNMemory(ScaledMemory):
    """Finite when stepped (acting), NaN in sequence mode (T > 1): a broken parallel form."""

    def forward(self, x, state, is_init):
        y, state = super().forward(x, state, is_init)
        return (y * float("nan") if x.shape[1] > 1 else y), state


def test_a_non_finite_replay_stops_training_with_a_clear_error(tmp_path):
    cfg = PPOConfig(**SMALL)
    trainer = make_trainer({"memory": "test_ppo:SequenceNaNMemory", "encoder_dim": 8}, {"id": "rlmem/DelayedCue-v0"},
                           cfg, tmp_path, total_frames=cfg.frames_per_batch, progress_bar=False)
    with pytest.raises(NonFiniteError, match=r"memory system 'test_ppo:SequenceNaNMemory' in the PPO replay "
                                             r"\(sequence mode\) at frames=64; no checkpoint was written yet"):
        trainer.train()


def value_losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [s.value for s in events.Scalars("losses/value_loss")]


def test_large_returns_are_scaled_so_the_value_loss_stays_of_order_one(tmp_path):
    """CartPole pays 1 per step: discounted returns reach the tens. Unscaled, the value loss is in the
    hundreds and dominates the memory that actor and critic share (CartPole stayed at eval return ~100);
    scaled by the running return std it stays of order 1, and the scaler's statistics are checkpointed."""
    ppo = dict(num_envs=8, rollout_len=64, seq_len=64, minibatches=2, epochs=1, eval_episodes=2, eval_interval=10**6)
    runs = {}
    for normalize in (True, False):
        trainer = make_trainer({"memory": "gru", "encoder_dim": 16, "hidden_size": 16}, {"id": "CartPole-v1"},
                               PPOConfig(**ppo, normalize_reward=normalize), tmp_path / str(normalize),
                               total_frames=3 * 8 * 64, progress_bar=False)
        trainer.train()
        runs[normalize] = (trainer, value_losses(tmp_path / str(normalize)))
    scaled, unscaled = runs[True][1], runs[False][1]
    assert max(unscaled[1:]) > 20 and max(scaled) < 5, (scaled, unscaled)
    scaler = runs[True][0].reward_scaler
    assert scaler.std > 2  # returns of tens: scaled down
    saved = load_checkpoint(tmp_path / "True" / "checkpoints" / "last.pt")["reward_scaler"]
    assert saved["count"] == scaler.count == 3 * 8 * 64 and saved["var"] == scaler.var


def test_a_compiled_memory_trains_and_its_checkpoint_loads_uncompiled(tmp_path):
    """compile=true compiles the memory in place (nn.Module.compile): the run trains, and its weights keep
    their names, so the checkpoint loads into an agent built without compile."""
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": 2}
    agent = build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env_cfg, compile=True)
    metrics = RecurrentPPO(agent, env_cfg, PPOConfig(**SMALL), tmp_path, total_frames=128, progress_bar=False).train()
    assert metrics["frames"] == 128
    plain = build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env_cfg)
    plain.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["agent"])
    with pytest.raises(ValueError, match="compile must be true or false"):
        build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, env_cfg, compile="yes")


def test_the_update_replays_every_slice_from_its_stored_start_state(tmp_path, monkeypatch):
    """The update cuts the rollout into slices of seq_len steps and replays each from the memory state stored
    at its first step. Before the first optimizer step the replayed log-probs must be the acting ones, also
    for slices that start mid-episode (5-step episodes, 4-step slices); replaying those from a fresh state
    would give other log-probs (checked, so the test can tell)."""
    torch.manual_seed(0)  # the weights below: over seeds 0-7 a fresh-state replay is off by 0.03-0.7
    trainer = make_trainer({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, {"id": "StepIndex-v0"},
                           PPOConfig(**{**SMALL, "seq_len": 4}), tmp_path, total_frames=64, progress_bar=False)
    agent = trainer.agent
    with torch.no_grad():  # a policy that depends clearly on the memory, not saturated
        for p in agent.policy_params.parameters():
            torch.nn.init.normal_(p, 0.0, 1.0)
    data = collect_one(trainer)

    def log_probs(td):
        logits = agent.policy_params(td["features"])
        return torch.log_softmax(logits, -1).gather(-1, td["action"].long().unsqueeze(-1)).squeeze(-1)

    replayed = []  # of each minibatch, before its optimizer step: (batch, log-probs of the replayed features)
    loss_module = trainer.loss_module

    def spy(td):
        with torch.no_grad():
            replayed.append((td.clone(), log_probs(td)))
        return loss_module(td)

    monkeypatch.setattr(trainer, "loss_module", spy)
    trainer._update(data)
    first, replay_log_probs = replayed[0]  # the first minibatch: no optimizer step before it
    torch.testing.assert_close(replay_log_probs, first["action_log_prob"], rtol=1e-5, atol=1e-5)
    mid_episode = ~first["is_init"].squeeze(-1)[:, 0]
    assert mid_episode.sum() >= 2
    # the weights have changed since: compare a fresh-state replay with the stored one under today's weights
    with torch.no_grad():
        stored = first.exclude("features").clone()
        fresh = stored.clone()
        fresh["memory_state"] = fresh["memory_state"].apply(torch.zeros_like)
        fresh["is_init"][:, 0] = True
        with set_recurrent_mode(True):
            agent.backbone(stored)
            agent.backbone(fresh)
        wrong = (log_probs(fresh) - log_probs(stored)).abs()[mid_episode]
    assert wrong.max() > 1e-2


def test_check_finite_names_the_bad_entry_and_accepts_finite_values_whose_sum_overflows():
    from rlmem.run_io import check_finite

    big = torch.full((4, 3), 3e38)  # finite float32 entries; their sum is inf
    check_finite({"a": big, "steps": torch.arange(3)}, "here", "kept")
    for bad in (float("nan"), float("inf"), -float("inf")):
        state = TensorDict({"ok": torch.zeros(2, 3), "inner": {"h": torch.zeros(2, 3)}}, batch_size=[2])
        state["inner", "h"][1, 2] = bad
        with pytest.raises(NonFiniteError, match=r"non-finite values in here \(entry 'inner.h'\)"):
            check_finite(state, "here", "kept")
