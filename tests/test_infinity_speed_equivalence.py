"""The fast paths of Infinity's parts give the numbers of the plain implementations they replaced.

DualTierMiras' step loop runs with a hand-written backward (``_StepLoop``) and so do Mamba's selective
scan (``_SelectiveScan``) and causal conv (``_DepthwiseConv``); all are checked here in float64 against the
readable references in :mod:`rlmem.memory.reference` (a Python loop over time, autograd for the backward):
outputs, next state, gate rate, and the gradients of every input, parameter and incoming state, including
episode starts mid-sequence and a deep-tier ``gate_scale`` (triggers).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from rlmem.memory import build_memory
from rlmem.memory.reference import mamba as mamba_reference
from rlmem.memory.reference import miras as miras_reference


def reference_selective_scan(u, delta, A, Bm, Cm, h0, keep):
    """``_SelectiveScan.apply``'s signature (``keep: [B, T]`` float, 0 at an episode start) on the reference loop."""
    is_init = torch.zeros(u.shape[:2], dtype=torch.bool) if keep is None else keep == 0
    return mamba_reference.selective_scan(u, delta, A, Bm, Cm, h0, is_init)


def reference_causal_conv(x, buffer, weight, bias, seg):
    """``causal_depthwise_conv``'s signature (``seg``: episode ids of ``[buffer; x]``) on the reference loop."""
    k = weight.shape[1]
    is_init = torch.zeros(x.shape[:2], dtype=torch.bool) if seg is None else seg[:, k - 1 :] != seg[:, k - 2 : -1]
    return mamba_reference.causal_conv(x, buffer, weight, bias, is_init)


def _inputs(B=3, T=17, H=2, S=8, dh=4, seed=0, reset_rate=0.15):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, S, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, S, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, dh, generator=g, dtype=torch.float64)
    state = TensorDict({key: torch.randn(B, H, dh, S, generator=g, dtype=torch.float64) * 0.5
                        for key in ("fast", "deep", "deep_momentum")}, batch_size=[B])
    is_init = torch.rand(B, T, generator=g) < reset_rate
    is_init[0, 0] = is_init[1, 5] = True
    return q, k, v, state, is_init


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("resets", [False, True])
def test_miras_step_loop_equals_the_autograd_loop(scaled, resets):
    memory = build_memory("miras", d_in=8, d_model=8, mem_slots=8, n_heads=2, momentum=0.7, decay=0.05,
                          surprise_threshold=0.3, temperature=0.2).double()
    q, k, v, state, is_init = _inputs()
    if not resets:
        is_init[:] = False
    gate_scale = (torch.rand(3, 17, generator=torch.Generator().manual_seed(1)) < 0.6).double() if scaled else None
    w = torch.randn(3, 17, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        st = state.apply(lambda s: s.clone().requires_grad_())
        wrt = leaves + list(st.values()) + [memory.log_temperature]
        if fused:
            r, s = memory.scan_steps(*leaves, st, is_init, gate_scale)
            rate = memory.last_write_rate
        else:
            r, s, rate = miras_reference.scan(memory, *leaves, st, is_init, gate_scale)
        loss = (r * w).sum() + sum((s[key] * (0.3 + i)).sum() for i, key in enumerate(("fast", "deep", "deep_momentum")))
        results.append((r, s, rate, torch.autograd.grad(loss, wrt)))
    (r1, s1, rate1, g1), (r2, s2, rate2, g2) = results
    torch.testing.assert_close(r1, r2, rtol=1e-10, atol=1e-12)
    for key in s2.keys():
        torch.testing.assert_close(s1[key], s2[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rate1, rate2.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_miras_step_loop_without_grad_equals_with_grad():
    memory = build_memory("miras", d_in=8, d_model=8, mem_slots=8, n_heads=2).double()
    q, k, v, state, is_init = _inputs(seed=3)
    r1, s1 = memory.scan_steps(q.requires_grad_(), k, v, state, is_init)
    with torch.no_grad():
        r2, s2 = memory.scan_steps(q, k, v, state, is_init)
    assert torch.equal(r1.detach(), r2)
    for key in s1.keys():
        assert torch.equal(s1[key].detach(), s2[key])


def _infinity_run(memory, x, state, is_init, trigger):
    leaves = x.clone().requires_grad_()
    st = state.apply(lambda s: s.clone().requires_grad_())
    y, s = memory(leaves, st, is_init, trigger=trigger)
    w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(9))
    loss = (y * w).sum() + sum((s[key] * 0.1).sum() for key in s.keys())
    wrt = [leaves, *st.values(), *memory.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return y, s, grads


@pytest.mark.parametrize("with_trigger", [False, True])
def test_infinity_equals_its_plain_implementation(monkeypatch, with_trigger):
    """Infinity (Mamba + DualTierMiras) against the same model with its kernels swapped for the references
    (Mamba's conv and selective scan, DualTierMiras' step loop: :mod:`rlmem.memory.reference`); forward,
    next state and all gradients, with resets."""
    from rlmem.memory import mamba as mamba_module
    from rlmem.memory.miras import DualTierMiras

    torch.manual_seed(0)
    memory = build_memory("infinity", d_in=6, d_model=16, d_state=4, mem_slots=8, n_heads=2).double()
    B, T = 4, 23
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, 6, dtype=torch.float64, generator=g)
    state = memory.initial_state(B).apply(lambda s: torch.randn(s.shape, dtype=torch.float64, generator=g) * 0.3)
    is_init = torch.rand(B, T, generator=g) < 0.1
    is_init[0, 0] = is_init[2, 7] = True
    trigger = (torch.rand(B, T, generator=g) < 0.5) if with_trigger else None
    fast = _infinity_run(memory, x, state, is_init, trigger)

    def plain_scan_steps(self, q, k, v, state, is_init, gate_scale=None):
        r, s, rate = miras_reference.scan(self, q, k, v, state, is_init, gate_scale)
        self.last_write_rate = rate.detach()
        return r, s

    monkeypatch.setattr(mamba_module._SelectiveScan, "apply", reference_selective_scan)
    monkeypatch.setattr(mamba_module, "causal_depthwise_conv", reference_causal_conv)
    monkeypatch.setattr(DualTierMiras, "scan_steps", plain_scan_steps)
    plain = _infinity_run(memory, x, state, is_init, trigger)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-10, atol=1e-12)
    for key in plain[1].keys():
        torch.testing.assert_close(fast[1][key], plain[1][key], rtol=1e-10, atol=1e-12)
    for a, b in zip(fast[2], plain[2]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_infinity_steps_equal_its_sequence_mode():
    """Acting one step at a time (T = 1 calls, incl. the trigger's fast-only step) gives the sequence's numbers."""
    torch.manual_seed(1)
    memory = build_memory("infinity", d_in=6, d_model=16, d_state=4, mem_slots=8, n_heads=2).double()
    B, T = 3, 15
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, 6, dtype=torch.float64, generator=g)
    is_init = torch.rand(B, T, generator=g) < 0.15
    is_init[:, 0] = True
    trigger = torch.rand(B, T, generator=g) < 0.5
    trigger[:, 4] = False  # a step on which no row writes the deep tier
    start = memory.initial_state(B).apply(lambda s: s.double())
    with torch.no_grad():
        y_seq, s_seq = memory(x, start, is_init, trigger=trigger)
        state, ys = start, []
        for t in range(T):
            y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1], trigger=trigger[:, t : t + 1])
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_seq, rtol=1e-10, atol=1e-12)
    for key in s_seq.keys():
        torch.testing.assert_close(state[key], s_seq[key], rtol=1e-10, atol=1e-12)
