"""Mamba's selective scan and StreamingSSM (which shares the scan): beyond the contract suite."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlmem.memory import build_memory
from rlmem.memory.mamba import linear_scan

D_IN = 5


def mamba(**kwargs):
    torch.manual_seed(0)
    cfg = {"d_model": 16, "n_layers": 2, "d_state": 4, "d_conv": 4} | kwargs
    return build_memory("mamba", d_in=D_IN, **cfg).eval()


def run_steps(memory, x, is_init, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
        ys.append(y)
    return torch.cat(ys, 1), state


def test_linear_scan_equals_the_recurrence_including_zero_decays():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 77, 3, 4, generator=g)
    a[0, 30] = 0  # an episode start
    b, h0 = torch.randn(2, 77, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    h, expected = h0, []
    for t in range(77):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b, h0), torch.stack(expected, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mamba", "ssm"])
def test_step_equals_scan_over_200_steps_with_resets(name):
    memory = mamba() if name == "mamba" else build_memory("ssm", d_in=D_IN, d_model=16, n_layers=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, D_IN, generator=g)
    is_init = torch.zeros(3, 200, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[0, 57] = is_init[1, 150] = is_init[1, 151] = True
    with torch.no_grad():
        y_scan, s_scan = memory(x, memory.initial_state(3), is_init)
        y_step, s_step = run_steps(memory, x, is_init, memory.initial_state(3))
    torch.testing.assert_close(y_step, y_scan, rtol=1e-4, atol=1e-5)
    for key in s_scan.keys():
        torch.testing.assert_close(s_step[key], s_scan[key], rtol=1e-4, atol=1e-5)


def test_a_reset_inside_a_sequence_forgets_everything_before_it():
    memory = mamba()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 60, D_IN, generator=g)
    is_init = torch.zeros(2, 60, dtype=torch.bool)
    is_init[0, 25] = True  # row 0 restarts at t=25; row 1 never does
    with torch.no_grad():
        y, _ = memory(x, memory.initial_state(2), is_init)
        fresh, _ = memory(x[:1, 25:], memory.initial_state(1), is_init[:1, 25:])
        no_reset, _ = memory(x[:1], memory.initial_state(1), torch.zeros(1, 60, dtype=torch.bool))
    torch.testing.assert_close(y[0, 25:], fresh[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[0, :25], no_reset[0, :25], rtol=1e-4, atol=1e-5)
    assert (y[0, 25:] - no_reset[0, 25:]).abs().max() > 1e-3  # the reset did change something


def test_split_sequence_continues_from_the_state():
    """The conv buffer and the SSM state together are the whole past: two halves == one sequence."""
    memory = mamba()
    x = torch.randn(2, 40, D_IN, generator=torch.Generator().manual_seed(3))
    no_reset = torch.zeros(2, 40, dtype=torch.bool)
    with torch.no_grad():
        y, _ = memory(x, memory.initial_state(2), no_reset)
        y1, s1 = memory(x[:, :17], memory.initial_state(2), no_reset[:, :17])
        y2, _ = memory(x[:, 17:], s1, no_reset[:, 17:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-4, atol=1e-5)


def test_the_selection_is_input_dependent_and_A_is_negative():
    memory = mamba(n_layers=1)
    mixer = memory.layers[0]
    assert (-torch.exp(mixer.A_log) < 0).all()
    state = memory.initial_state(1)
    x = torch.randn(1, 2, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, s_a = memory(x[:, :1], state, torch.zeros(1, 1, dtype=torch.bool))
        _, s_b = memory(x[:, 1:], state, torch.zeros(1, 1, dtype=torch.bool))
    # same (zero) state, different inputs: both the conv buffer and the SSM state differ
    assert not torch.allclose(s_a["ssm"], s_b["ssm"]) and not torch.allclose(s_a["conv"], s_b["conv"])


def test_scan_gradients_match_autograd_through_the_recurrence():
    """The hand-written backward of the scan (a reversed scan) against autograd through a plain loop."""
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 11, 3, dtype=torch.float64, generator=g)
    a[1, 4] = 0
    b, h0 = torch.randn(2, 11, 3, dtype=torch.float64, generator=g), torch.randn(2, 3, dtype=torch.float64, generator=g)
    for chunk in (1, 4, 64):
        assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, chunk),
                                        (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_()))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_within_a_chunk_the_scan_is_parallel():
    def n_ops(T):
        a, b, h0 = torch.rand(2, T, 3), torch.randn(2, T, 3), torch.zeros(2, 3)
        with _CountOps() as counter:
            linear_scan(a, b, h0, chunk=T)
        return counter.n

    # 4x more steps add two scan rounds (~11 aten ops each: slices, cat, mul, addcmul), where a loop
    # over time would add at least one op for each of the 192 extra steps
    assert n_ops(256) - n_ops(64) <= 2 * 12


@pytest.mark.parametrize("name", ["mamba", "ssm"])
def test_sequence_mode_loops_over_chunks_not_steps(name, monkeypatch):
    from rlmem.memory import mamba as mamba_module

    memory = mamba() if name == "mamba" else build_memory("ssm", d_in=D_IN, d_model=16, n_layers=2)
    calls = []
    original = mamba_module._parallel_scan
    monkeypatch.setattr(mamba_module, "_parallel_scan", lambda a, *rest: calls.append(a.shape[1]) or original(a, *rest))
    x = torch.randn(2, 200, D_IN)
    is_init = torch.zeros(2, 200, dtype=torch.bool)
    is_init[:, 0] = is_init[0, 77] = True
    with torch.no_grad():
        memory(x, memory.initial_state(2), is_init)
    chunk = mamba_module.SCAN_CHUNK
    assert len(calls) == 2 * -(-200 // chunk) and max(calls) == chunk  # 2 layers x ceil(T / chunk)


def test_mamba_ssm_is_not_imported_on_cpu():
    memory = mamba()
    with torch.no_grad():
        memory(torch.randn(1, 8, D_IN), memory.initial_state(1), torch.zeros(1, 8, dtype=torch.bool))
    assert "mamba_ssm" not in sys.modules


def test_streaming_ssm_time_constants_are_log_spaced():
    memory = build_memory("ssm", d_in=D_IN, d_model=8, expand=2, min_timescale=2.0, max_timescale=2000.0)
    tau = memory.layers[0].log_tau.detach().exp()
    assert tau.shape == (16,)
    torch.testing.assert_close(tau[[0, -1]], torch.tensor([2.0, 2000.0]))
    ratios = tau[1:] / tau[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))  # a geometric progression
