"""The contract every registered memory system passes (DESIGN section 3).

The checks themselves are :func:`rlmem.check_memory`'s (one test per system and check); this file adds
what the checker cannot see from an instance: the registry, same-seed construction, the TorchRL wrapper.
Systems are built from their class's ``test_kwargs`` (small sizes), so adding a system to the registry
adds it here.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from rlmem.memory import CHECKS, available_memories, build_memory, check_memory, memory_class
from rlmem.torchrl_wrapper import MemoryModule

D_IN, B, T = 6, 3, 12
NAMES = available_memories()


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_memory(name, d_in=D_IN, **getattr(memory_class(name), "test_kwargs", {})).eval()


def inputs(seed: int = 1):
    """``x: [B, T, D_IN]`` and ``is_init: [B, T]`` with episode starts at t=0 and inside rows 0 and 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
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


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, check):
    """Each check of :func:`rlmem.check_memory` on each registered system (see rlmem/memory/check.py):
    step == sequence with resets inside, is_init resets, independent rows, gradients through state,
    state only in the TensorDict, state_dict / checkpoint round trip, determinism."""
    check_memory(make(name), checks=[check])


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
def test_torchrl_state_spec_and_primer_match_initial_state(name):
    module = MemoryModule(make(name))
    spec, init = module.state_spec(), module.memory.initial_state(1)
    assert set(spec.keys(True, True)) == set(init.keys(True, True))
    for key in init.keys(True, True):
        assert spec[key].shape == init[key].shape[1:] and spec[key].dtype == init[key].dtype, key
    assert set(module.make_tensordict_primer().primers.keys(True, True)) == {
        ("memory_state", *((k,) if isinstance(k, str) else k)) for k in init.keys(True, True)
    }


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
