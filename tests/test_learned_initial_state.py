"""Learned (parameter-dependent) initial states: the contract, acting through TorchRL, replay, gradients.

The TorchRL primer only writes a zero placeholder of the state's shape; the memory swaps in
``initial_state`` (from the current parameters) wherever ``is_init`` is True, while acting and while
replaying, so a loss on replayed outputs trains the initial state.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.modules import ProbabilisticActor, set_recurrent_mode

import rlmem
from rlmem.env_factory import make_torchrl_env
from rlmem.torchrl_wrapper import STATE_KEY, MemoryModule

OBS_DIM, N_ACTIONS, H = 5, 4, 8  # DelayedCue with the default 4 cues: 5 observation channels
ENV_CFG = {"id": "rlmem/DelayedCue-v0", "delay": 2}  # 4-step episodes
NUM_ENVS, STEPS = 3, 12


class LearnedInitRNN(rlmem.MemorySystem):
    """``h_t = tanh(W x_t + U h_{t-1} + b)``, ``y_t = h_t``; state ``{"h": [B, H]}`` starting at a learned
    ``h0`` (an ``nn.Parameter`` expanded to ``[B, H]``)."""

    def __init__(self, d_in: int, hidden: int = H):
        super().__init__()
        self.d_in, self.d_out = d_in, hidden
        self.cell = nn.RNNCell(d_in, hidden)
        self.h0 = nn.Parameter(torch.linspace(-0.8, 0.8, hidden))

    def initial_state(self, batch_size, device=None):
        h0 = self.h0 if device is None else self.h0.to(device)
        return TensorDict({"h": h0.expand(batch_size, -1)}, batch_size=[batch_size])

    def step(self, x, state):
        h = self.cell(x, state["h"])
        return h, TensorDict({"h": h}, batch_size=state.batch_size)


def make_memory() -> LearnedInitRNN:
    torch.manual_seed(0)
    return LearnedInitRNN(OBS_DIM)


def readout(y: torch.Tensor) -> torch.Tensor:
    """A fixed random linear readout (a sum of outputs could hide gradients behind a normalisation)."""
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    return (y * w).sum()


def test_a_learned_initial_state_passes_the_contract():
    memory = make_memory()
    assert memory.initial_state(2)["h"].requires_grad
    rlmem.check_memory(memory)


def test_resets_inside_a_sequence_use_the_current_initial_state_with_gradients():
    memory = make_memory()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, OBS_DIM, generator=g)
    used = TensorDict({"h": torch.randn(2, H, generator=g)}, batch_size=[2])  # mid-episode: no start at t=0
    is_init = torch.zeros(2, 10, dtype=torch.bool)
    is_init[0, 6] = True
    y, _ = memory(x, used, is_init)
    (grad,) = torch.autograd.grad(readout(y[:, 6:]), memory.h0)
    assert grad.abs().max() > 1e-3
    fresh, _ = memory(x[:1, 6:], memory.initial_state(1), torch.zeros(1, 4, dtype=torch.bool))
    torch.testing.assert_close(y[:1, 6:], fresh)
    # without a start anywhere the initial state is not used at all
    y_cont, _ = memory(x, used, torch.zeros(2, 10, dtype=torch.bool))
    (grad,) = torch.autograd.grad(readout(y_cont), memory.h0, allow_unused=True)
    assert grad is None or grad.abs().max() == 0


def test_state_spec_and_primer_with_a_learned_initial_state():
    module = MemoryModule(make_memory(), in_key="observation", out_key="features")
    spec = module.state_spec()
    assert spec["h"].shape == (H,) and spec["h"].dtype == torch.float32
    primer = module.make_tensordict_primer()
    assert set(primer.primers.keys(True, True)) == {(STATE_KEY, "h")}


def collect(memory: LearnedInitRNN):
    """One rollout of ``[NUM_ENVS, STEPS]`` through MemoryModule + the primer + TorchRL's Collector."""
    module = MemoryModule(memory, in_key="observation", out_key="features")
    head = TensorDictModule(nn.Linear(H, N_ACTIONS), in_keys=["features"], out_keys=["logits"])
    actor = ProbabilisticActor(head, in_keys=["logits"], out_keys=["action"],
                               distribution_class=torch.distributions.Categorical)
    policy = TensorDictSequential(module, actor)
    env = make_torchrl_env(ENV_CFG, NUM_ENVS, module.make_tensordict_primer())
    env.set_seed(0)
    torch.manual_seed(0)
    collector = Collector(env, policy, frames_per_batch=NUM_ENVS * STEPS, total_frames=-1)
    try:
        data = next(iter(collector)).reshape(NUM_ENVS, STEPS)
    finally:
        collector.shutdown()
    return module, data


def test_acting_and_replay_through_torchrl_train_the_learned_initial_state():
    memory = make_memory()
    module, data = collect(memory)
    is_init = data["is_init"].squeeze(-1)
    assert is_init[:, 0].all() and is_init[:, 1:].any(), "the rollout should hold episode starts inside it"
    features = data["features"]
    assert features.shape == (NUM_ENVS, STEPS, H) and torch.isfinite(features).all()
    assert ("next", STATE_KEY, "h") in data.keys(True, True)

    # acting started every episode from the learned h0, not from the primer's placeholder
    with torch.no_grad():
        obs = data["observation"][is_init].unsqueeze(1)  # [starts, 1, obs_dim]
        first, _ = memory(obs, memory.initial_state(obs.shape[0]), torch.ones(obs.shape[0], 1, dtype=torch.bool))
    torch.testing.assert_close(features[is_init], first[:, 0], rtol=1e-5, atol=1e-6)

    # sequence-mode replay of the stored rollout (and of a slice starting mid-rollout) reproduces acting
    stored = data.select("observation", "is_init", STATE_KEY)
    with set_recurrent_mode(True):
        replay = module(stored.clone())
        with torch.no_grad():
            part = module(stored[:, 5:].clone())
    torch.testing.assert_close(replay["features"].detach(), features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part["features"], features[:, 5:], rtol=1e-4, atol=1e-5)

    # a loss on the replayed outputs reaches the learned initial state
    (grad,) = torch.autograd.grad(readout(replay["features"]), memory.h0)
    assert grad.abs().max() > 1e-3, grad


def test_ppo_trains_a_learned_initial_state(tmp_path):
    from rlmem.agents import build_agent
    from rlmem.ppo import PPOConfig, RecurrentPPO

    ppo = PPOConfig(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=1, eval_episodes=4)
    agent = build_agent({"memory": "test_learned_initial_state:LearnedInitRNN", "encoder_dim": 6}, ENV_CFG)
    trainer = RecurrentPPO(agent, ENV_CFG, ppo, tmp_path, total_frames=ppo.frames_per_batch, progress_bar=False)
    h0 = trainer.agent.memory.h0.detach().clone()
    metrics = trainer.train()
    assert metrics["frames"] == ppo.frames_per_batch
    assert not torch.equal(trainer.agent.memory.h0.detach(), h0), "the PPO update did not reach h0"
