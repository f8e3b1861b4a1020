"""The contract every registered memory system passes (DESIGN section 3).

Systems are built from their class's ``test_kwargs`` (small sizes), so adding a system to the registry
adds it here.
"""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from rlmem.memory import available_memories, build_memory, memory_class
from rlmem.torchrl_wrapper import MemoryModule

D_IN, B, T = 6, 3, 12
NAMES = available_memories()


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_memory(name, d_in=D_IN, **getattr(memory_class(name), "test_kwargs", {})).eval()


def inputs(seed: int = 1, resets: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    if resets:
        is_init[0, 5] = is_init[2, 9] = True
    return x, is_init


def has_state(memory) -> bool:
    return not memory.initial_state(1).is_empty()


def test_registry_has_the_baselines():
    assert {"gru", "lstm", "mlp"} <= set(NAMES)


def test_unknown_names_and_params_raise_clearly():
    with pytest.raises(KeyError, match="valid choices"):
        build_memory("no_such_memory", d_in=4)
    with pytest.raises(TypeError, match="valid"):
        build_memory("gru", d_in=4, no_such_param=3)


@pytest.mark.parametrize("name", NAMES)
def test_step_equals_sequence(name):
    memory = make(name)
    x, is_init = inputs()
    state0 = memory.initial_state(B)
    with torch.no_grad():
        y_seq, s_seq = memory(x, state0, is_init)
        state, ys = state0, []
        for t in range(T):
            y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
            ys.append(y)
    assert y_seq.shape == (B, T, memory.d_out)
    torch.testing.assert_close(torch.cat(ys, 1), y_seq, rtol=1e-4, atol=1e-5)
    for key in s_seq.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(state[key], s_seq[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_is_init_resets_to_a_fresh_state(name):
    memory = make(name)
    x, _ = inputs()
    no_reset = torch.zeros(B, T, dtype=torch.bool)
    with torch.no_grad():
        _, used = memory(x, memory.initial_state(B), no_reset)  # a state with history in it
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[:, 0] = True
        y_reset, _ = memory(x, used, reset)
        y_fresh, _ = memory(x, memory.initial_state(B), no_reset)
    torch.testing.assert_close(y_reset, y_fresh)


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_are_independent(name):
    memory = make(name)
    x, is_init = inputs()
    with torch.no_grad():
        y_all, _ = memory(x, memory.initial_state(B), is_init)
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:]) * 3
        y_perturbed, _ = memory(x2, memory.initial_state(B), is_init)
        y_alone, _ = memory(x[:1], memory.initial_state(1), is_init[:1])
    torch.testing.assert_close(y_perturbed[0], y_all[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_alone[0], y_all[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_through_state(name):
    memory = make(name).train()
    x, _ = inputs(resets=False)
    x.requires_grad_(True)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    y, _ = memory(x, memory.initial_state(B), is_init)
    y[:, 2].pow(2).sum().backward()
    grads = [p.grad for p in memory.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    if has_state(memory):
        # the output at t=2 depends on the input at t=0 only through two steps of state
        assert x.grad[:, 0].abs().sum() > 0, "no gradient reaches x[t=0] from y[t=2]"
    else:
        assert x.grad[:, 0].abs().sum() == 0, "a memoryless system must not see the past"


@pytest.mark.parametrize("name", NAMES)
def test_state_spec_and_checkpoint_round_trip(name):
    memory = make(name)
    x, is_init = inputs()
    init = memory.initial_state(B)
    assert init.batch_size == torch.Size([B])
    with torch.no_grad():
        y, state = memory(x, init, is_init)
    assert set(state.keys(True, True)) == set(init.keys(True, True))
    for key in init.keys(True, True):
        assert state[key].shape == init[key].shape and state[key].dtype == init[key].dtype, key
    # module weights and a mid-episode state survive a save/load through bytes
    buffer = io.BytesIO()
    torch.save({"model": memory.state_dict(), "state": state.to_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = make(name, seed=123)
    other.load_state_dict(loaded["model"])
    restored = TensorDict(loaded["state"], batch_size=[B]) if has_state(memory) else state
    cont = torch.zeros(B, T, dtype=torch.bool)
    with torch.no_grad():
        y1, _ = memory(x, state, cont)
        y2, _ = other(x, restored, cont)
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_numbers(name):
    x, is_init = inputs()
    outs = []
    for _ in range(2):
        memory = make(name, seed=7)
        with torch.no_grad():
            outs.append(memory(x, memory.initial_state(B), is_init)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_torchrl_wrapper_step_mode_equals_sequence_mode(name):
    """Acting step by step through the TorchRL wrapper equals replaying the stored slice."""
    module = MemoryModule(make(name), in_key="x", out_key="y")
    x, is_init = inputs()
    td = TensorDict({"x": x, "is_init": is_init.unsqueeze(-1)}, batch_size=[B, T])
    state = module.memory.initial_state(B)
    steps = []
    with torch.no_grad():
        for t in range(T):
            step_td = td[:, t].clone()
            if has_state(module.memory):
                step_td.set("memory_state", state)
            module(step_td)
            if has_state(module.memory):
                state = step_td["next", "memory_state"]
            steps.append(step_td)
        stepped = torch.stack(steps, 1)
        with set_recurrent_mode(True):
            replay = module(stepped.exclude("y", "next"))
    torch.testing.assert_close(replay["y"], stepped["y"], rtol=1e-4, atol=1e-5)
    # a slice that starts mid-rollout is replayed from its stored start state
    with torch.no_grad(), set_recurrent_mode(True):
        part = module(stepped[:, 4:].exclude("y", "next"))
    torch.testing.assert_close(part["y"], stepped["y"][:, 4:], rtol=1e-4, atol=1e-5)
