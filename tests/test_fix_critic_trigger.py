"""The critic never sees the current step's trigger (part of the joint action (env action, trigger)).

For a memory whose gated path changes the output of the step it runs on (``trigger_affects_output``: stm,
cmrn), the value reads trigger-independent features; for the others (darmt, infinity, miras: the path only
changes later steps) the features after the path already are. Either way, flipping the trigger at step t
with the same state and inputs leaves V_t exactly unchanged."""

from __future__ import annotations

import pytest
import torch
from torchrl.modules import set_recurrent_mode

from rlmem.agents import build_agent
from rlmem.memory import available_memories, build_memory, memory_class
from test_triggers import collect

ENV = {"id": "rlmem/DelayedCue-v0", "delay": 3}


def _sizes(name: str) -> dict:
    sizes = dict(getattr(memory_class(name), "test_kwargs", {}))
    if name == "cmrn":
        sizes["router_noise"] = 0.0  # as agent=cmrn sets it: fresh router noise would route the replay differently
    return sizes


def _gated() -> list[str]:
    torch.manual_seed(0)
    return [n for n in available_memories()
            if getattr(build_memory(n, d_in=8, **_sizes(n)), "trigger_path", None) is not None]


GATED = _gated()


def test_the_gated_memories_are_all_here():
    assert {"stm", "cmrn", "darmt", "infinity", "miras"} <= set(GATED)


def _replay(agent, data, trigger):
    replay = data.clone().exclude("features", "trigger_logits", "state_value")
    replay["trigger"] = trigger
    with torch.no_grad(), set_recurrent_mode(True):
        agent.backbone(replay)
        agent.critic(replay)
        params = agent.policy_params(replay["features"])
    return replay["state_value"], params


@pytest.mark.parametrize("name", GATED)
def test_flipping_the_trigger_at_t_leaves_the_value_at_t_unchanged(name):
    torch.manual_seed(0)
    agent = build_agent({"memory": name, "encoder_dim": 8, **_sizes(name)}, ENV,
                        {"policy": "learned", "init_bias": 0.0})
    with torch.no_grad():  # a live gated path: zero-initialized parts would hide what it changes
        for p in agent.memory.parameters():
            if p.dim() > 0 and p.abs().max() == 0:
                p.normal_(0.0, 0.3)
    data = collect(agent, ENV, num_envs=4, steps=12)
    trigger = data["trigger"].reshape(data.batch_size)
    value, params = _replay(agent, data, trigger)
    torch.testing.assert_close(value, data["state_value"], rtol=1e-5, atol=1e-5)  # acting == replay
    affects = getattr(agent.memory.memory, "trigger_affects_output", False)
    for t in (2, 5, 9):
        flipped = trigger.clone()
        flipped[:, t] = ~flipped[:, t]
        value_f, params_f = _replay(agent, data, flipped)
        diff = float((value_f[:, t] - value[:, t]).abs().max())
        assert torch.equal(value_f[:, : t + 1], value[:, : t + 1]), \
            f"{name}: V_t changed by {diff:.3g} when only the trigger at t={t} flipped"
        if affects:  # the policy still sees the path's output at step t
            assert not torch.equal(params_f[:, t], params[:, t])
