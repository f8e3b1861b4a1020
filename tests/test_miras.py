"""DualTierMiras: exact retrieval, surprise-gated deep writes, live config fields, per-row memory."""

from __future__ import annotations

import math

import pytest
import torch

from rlmem.memory import build_memory
from rlmem.memory.miras import DualTierMiras

D = 4


def hand_set(**kwargs) -> DualTierMiras:
    """One head, mem_slots = d_model = 4, identity q/k projections, a fixed value map, sharp gate."""
    cfg = {"d_model": D, "mem_slots": D, "n_heads": 1, "lr_fast": 1.0, "lr_deep": 1.0, "decay": 0.0,
           "momentum": 0.0, "surprise_threshold": 0.5} | kwargs
    memory = DualTierMiras(d_in=D, **cfg)
    with torch.no_grad():
        memory.q_proj.weight.copy_(torch.eye(D))
        memory.k_proj.weight.copy_(torch.eye(D))
        memory.v_proj.weight.copy_(torch.arange(1.0, D * D + 1).view(D, D) / 10)
        memory.log_temperature.fill_(math.log(0.01))
    return memory


def no_reset(B, T):
    return torch.zeros(B, T, dtype=torch.bool)


def test_fast_tier_retrieves_a_stored_key_exactly_after_one_write():
    memory = hand_set()
    x0 = torch.tensor([[0.0, 3.0, 0.0, 0.0]])  # key e_1 after normalisation
    x = torch.stack([x0, x0], 1)  # write at t=0, read the same key at t=1
    with torch.no_grad():
        reads, state = memory.retrieve(x, memory.initial_state(1), no_reset(1, 2))
        v = memory.v_proj(x0)
    assert torch.equal(reads[0, 0], torch.zeros(2 * D))  # nothing written before t=0 reads as zero
    assert torch.equal(reads[0, 1, :D], v[0])  # the fast tier returns the stored value exactly
    # the fast tier in the state is exactly the outer product v k^T (lr_fast = 1, nothing to forget)
    k = torch.tensor([0.0, 1.0, 0.0, 0.0])
    _, state = memory.retrieve(x[:, :1], memory.initial_state(1), no_reset(1, 1))
    assert torch.equal(state["fast"][0, 0], torch.outer(v[0], k))


def test_deep_tier_writes_on_a_surprising_input_and_not_on_a_repeated_one():
    memory = hand_set()
    e = torch.eye(D)
    x = torch.stack([e[0], e[0], e[2]]).unsqueeze(0) * 2  # new key, the same again, another new key
    state = memory.initial_state(1)
    deeps, gates = [state["deep"]], []
    with torch.no_grad():
        for t in range(3):
            _, state = memory.retrieve(x[:, t : t + 1], state, no_reset(1, 1))
            deeps.append(state["deep"])
            gates.append(memory.last_write_rate)
    changes = [(deeps[t + 1] - deeps[t]).norm() for t in range(3)]
    assert gates[0] > 0.99 and gates[2] > 0.99 and gates[1] < 1e-6
    assert changes[0] > 1 and changes[2] > 1
    assert changes[1] < 1e-6 * changes[0]
    # after its one write the deep tier, too, holds the first value (gate ~1, lr_deep = 1)
    v0 = memory.v_proj(x[0, 0])
    torch.testing.assert_close(memory.read(state["deep"], e[:1].unsqueeze(0))[0, 0], v0, rtol=1e-5, atol=1e-5)


def test_the_surprise_gate_is_trainable():
    torch.manual_seed(0)
    memory = DualTierMiras(d_in=6, d_model=8, mem_slots=4, n_heads=2)
    x = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0))
    y, _ = memory(x, memory.initial_state(2), no_reset(2, 6))
    # a fixed random readout: y is a LayerNorm output, so y.pow(2).sum() is nearly constant and its
    # gradient is rounding noise (~1e-5 here), while the readout's is ~0.07
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * w).sum().backward()
    assert memory.log_temperature.grad is not None and memory.log_temperature.grad.abs() > 1e-3


def outputs(**kwargs):
    torch.manual_seed(0)
    memory = build_memory("miras", d_in=6, **kwargs).eval()
    x = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, state = memory(x, memory.initial_state(2), no_reset(2, 16))
    return y, state


@pytest.mark.parametrize(
    "field, value",
    [("surprise_threshold", 0.9), ("lr_fast", 0.9), ("lr_deep", 0.9), ("decay", 0.2), ("momentum", 0.9),
     ("temperature", 1.0), ("d_model", 16), ("mem_slots", 16), ("n_heads", 2)],
)
def test_every_config_field_changes_behaviour(field, value):
    base = {"d_model": 8, "mem_slots": 8, "n_heads": 4}
    y0, s0 = outputs(**base)
    y1, s1 = outputs(**(base | {field: value}))
    if y0.shape == y1.shape and s0["deep"].shape == s1["deep"].shape:
        assert (y0 - y1).abs().max() > 1e-4, f"{field} has no effect on the output"
        assert (s0["deep"] - s1["deep"]).abs().max() > 1e-4 or field == "lr_fast"
    else:
        assert field in ("d_model", "mem_slots", "n_heads")


def test_memory_is_per_batch_row_and_the_input_state_is_not_mutated():
    memory = build_memory("miras", d_in=6, d_model=8, mem_slots=8, n_heads=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 6, generator=g)
    with torch.no_grad():
        _, state = memory(x, memory.initial_state(3), no_reset(3, 10))
        before = state.clone()
        x2 = x.clone()
        x2[1:] = torch.randn(2, 10, 6, generator=g)
        y_all, s_all = memory(x2, state, no_reset(3, 10))
        y_one, s_one = memory(x2[:1], state[:1], no_reset(1, 10))
    assert (state == before).all()
    torch.testing.assert_close(y_all[:1], y_one)
    for key in s_one.keys():
        torch.testing.assert_close(s_all[key][:1], s_one[key])
    assert not torch.allclose(s_all["deep"][0], s_all["deep"][1])
