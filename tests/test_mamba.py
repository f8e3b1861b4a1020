"""Mamba's selective scan and StreamingSSM (which shares the scan): beyond the contract suite."""

from __future__ import annotations

import sys

import pytest
import torch
from tensordict import TensorDict
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


def next_ssm_state(memory, x, conv, ssm):
    """Layer 0's SSM state ``[d_inner, d_state]`` after one step on ``x: [1, 1, D_IN]`` from the state
    ``(conv, ssm)`` (both ``[1, 1, ...]``)."""
    state = TensorDict({"conv": conv, "ssm": ssm}, batch_size=[1])
    with torch.no_grad():
        _, state = memory(x, state, torch.zeros(1, 1, dtype=torch.bool))
    return state["ssm"][0, 0]


def test_the_selection_is_input_dependent_and_A_is_negative():
    """One step is ``h' = exp(delta(x) A) h + delta(x) u(x) B(x)`` per channel: an affine map of h whose
    slope (the per-step decay) and whose written direction (B) change with the input. A linear
    time-invariant SSM of the same shape has one decay and one B for every input, so from the same
    history two inputs would give the same slope and the same direction."""
    memory = mamba(n_layers=1)
    g = torch.Generator().manual_seed(4)
    init = memory.initial_state(1)
    conv = torch.randn(init["conv"].shape, generator=g)  # the same conv window (input history) throughout
    h1 = torch.randn(init["ssm"].shape, generator=g)
    h2 = h1 + 1 + torch.rand(init["ssm"].shape, generator=g)  # another SSM state, apart in every entry
    x_a = torch.randn(1, 1, D_IN, generator=g)
    x_b = -3 * x_a
    A = -torch.exp(memory.layers[0].A_log.detach())
    deltas = []
    for x in (x_a, x_b):
        # the slope of h -> h' from two states: the effective decay exp(delta A), diagonal
        decay = (next_ssm_state(memory, x, conv, h1) - next_ssm_state(memory, x, conv, h2)) / (h1 - h2)[0, 0]
        assert ((decay > 0) & (decay < 1)).all(), "A must be negative: every step forgets a little"
        delta = decay.log() / A  # [d_inner, d_state]: one step size per channel, shared by its d_state entries
        torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), rtol=1e-2, atol=0)
        deltas.append(delta[:, 0])
    # the step size depends on the input (an LTI SSM: equal up to ~1e-4 rounding of the log)
    assert ((deltas[0] - deltas[1]).abs() / deltas[0]).max() > 0.02
    # from a zero SSM state h' = (delta u) outer B: rank one, its row direction is B; B depends on the input
    zero = torch.zeros_like(h1)
    b_a, b_b = (torch.linalg.svd(next_ssm_state(memory, x, conv, zero)).Vh[0] for x in (x_a, x_b))
    assert (b_a @ b_b).abs() < 0.99


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


def test_mamba_scans_with_its_selective_scan_not_the_parallel_one(monkeypatch):
    """Mamba's [B, T, d_inner, d_state] recurrence runs as _SelectiveScan (one in-place addcmul per step)."""
    from rlmem.memory import mamba as mamba_module

    memory = mamba()
    calls = []
    original = mamba_module._SelectiveScan.apply
    monkeypatch.setattr(mamba_module._SelectiveScan, "apply", lambda *a: calls.append(a[0].shape[1]) or original(*a))
    monkeypatch.setattr(mamba_module, "_parallel_scan", lambda *a: pytest.fail("parallel scan in Mamba"))
    x = torch.randn(2, 50, D_IN)
    is_init = torch.zeros(2, 50, dtype=torch.bool)
    is_init[:, 0] = is_init[0, 17] = True
    with torch.no_grad():
        memory(x, memory.initial_state(2), is_init)
    assert calls == [50, 50]  # 2 layers, the whole sequence each


def test_selective_scan_gradients_pass_gradcheck():
    """The hand-written backward of Mamba's selective scan, including episode starts (keep = 0)."""
    from rlmem.memory.mamba import _SelectiveScan

    g = torch.Generator().manual_seed(7)
    B, T, D, N = 2, 7, 3, 2
    u, delta = torch.randn(B, T, D, dtype=torch.float64, generator=g), torch.rand(B, T, D, dtype=torch.float64, generator=g)
    A = -torch.rand(D, N, dtype=torch.float64, generator=g) - 0.1
    Bm, Cm = torch.randn(B, T, N, dtype=torch.float64, generator=g), torch.randn(B, T, N, dtype=torch.float64, generator=g)
    h0 = torch.randn(B, D, N, dtype=torch.float64, generator=g)
    keep = torch.ones(B, T, dtype=torch.float64)
    keep[0, 3] = keep[1, 0] = 0
    for k in (None, keep):
        inputs = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, h0)]
        assert torch.autograd.gradcheck(lambda *a: _SelectiveScan.apply(*a, k), inputs)


def test_depthwise_conv_gradients_pass_gradcheck():
    """The hand-written backward of the causal conv's shifted multiply-adds, with and without episode masks."""
    from rlmem.memory.mamba import _DepthwiseConv

    g = torch.Generator().manual_seed(8)
    B, T, C, k = 2, 6, 3, 3
    full = torch.randn(B, k - 1 + T, C, dtype=torch.float64, generator=g)
    weight, bias = torch.randn(C, k, dtype=torch.float64, generator=g), torch.randn(C, dtype=torch.float64, generator=g)
    same = (torch.rand(B, T, k, generator=g) < 0.7).double()
    for mask in (None, same):
        inputs = [t.clone().requires_grad_() for t in (full, weight, bias)]
        assert torch.autograd.gradcheck(lambda *a: _DepthwiseConv.apply(*a, mask), inputs)


@pytest.mark.parametrize("name", ["ssm"])
def test_sequence_mode_loops_over_chunks_not_steps(name, monkeypatch):
    from rlmem.memory import mamba as mamba_module

    memory = build_memory("ssm", d_in=D_IN, d_model=16, n_layers=2)
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


# -- the whole module against its readable reference (rlmem/memory/reference/mamba.py) -------------------


def _reference_case(B=3, T=19, seed=11):
    """A float64 Mamba, a used (random) state, inputs and episode starts mid-sequence (twice in a row in
    row 2, none in row 0, which continues its state)."""
    memory = mamba(d_conv=3).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    state = memory.initial_state(B).apply(lambda s: 0.5 * torch.randn(s.shape, generator=g, dtype=torch.float64))
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[1, 0] = is_init[1, 9] = True
    is_init[2, 5] = is_init[2, 6] = is_init[2, T - 1] = True
    return memory, x, state, is_init


def test_sequence_mode_equals_the_reference_outputs_states_and_parameter_gradients():
    """``_SelectiveScan`` and ``_DepthwiseConv`` (hand-written backwards) against the reference loop:
    outputs, next state, gradients w.r.t. every parameter, the input and the incoming state (float64)."""
    from rlmem.memory.reference import mamba as reference

    memory, x, state, is_init = _reference_case()
    w = torch.randn(x.shape[:2] + (16,), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    results = []
    for run in (memory, lambda *a: reference.forward(memory, *a)):
        xs = x.clone().requires_grad_()
        st = state.apply(lambda s: s.clone().requires_grad_())
        y, s = run(xs, st, is_init)
        loss = (y * w).sum() + sum((s[key] * (0.3 + i)).sum() for i, key in enumerate(("conv", "ssm")))
        results.append((y, s, torch.autograd.grad(loss, [*memory.parameters(), xs, *st.values()])))
    (y1, s1, g1), (y2, s2, g2) = results
    tight = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(y1, y2, **tight)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(s1[key], s2[key], **tight)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **tight)


def test_acting_steps_equal_the_reference():
    """``_selective_step`` and the one-step conv (T = 1 calls without gradients) against the reference."""
    from rlmem.memory.reference import mamba as reference

    memory, x, state, is_init = _reference_case(seed=13)
    ref_state = state
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
            y_ref, ref_state = reference.forward(memory, x[:, t : t + 1], ref_state, is_init[:, t : t + 1])
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
            for key in ("conv", "ssm"):
                torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-12)
