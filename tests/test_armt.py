"""ARMT (rlmem/memory/armt.py): the DPFP feature map, the write rule, gradients through segment writes,
step == sequence across segment boundaries and resets, knob validation.

``W_v`` is zero-initialized (the memory starts silent), so tests that need the memory to carry something
give it random values first (:func:`armt`).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from rlmem.memory import build_memory, check_memory
from rlmem.memory.armt import NU, AssociativeMemory, dpfp
from rlmem.torchrl_wrapper import MemoryModule

D_IN = 5


def armt(dtype=torch.float64, live_memory=True, seed=0, **kwargs):
    """A small ARMT; ``live_memory``: random ``W_v`` (as after training) so reads are not zero."""
    torch.manual_seed(seed)
    kw = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_mem": 4, "segment_len": 4, "num_mem_tokens": 2, **kwargs}
    memory = build_memory("armt", d_in=D_IN, **kw).to(dtype)
    if live_memory:
        with torch.no_grad():
            for m in memory.memories:
                m.w_v.weight.normal_(0.0, 0.5)
    return memory


def readout(y: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random linear readout of ``y: [..., d]``: not ``y.sum()``, whose gradient through the final
    LayerNorm is rounding noise."""
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y * w).sum()


def run_steps(memory, x, state, is_init):
    ys = []
    for t in range(x.shape[1]):
        y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
        ys.append(y)
    return torch.cat(ys, 1), state


# -- the DPFP feature map -------------------------------------------------------------------------------

def test_dpfp_hand_computed_example():
    # u = [relu(x), relu(-x)] = [0.5, 2, 0, 0, 0, 1]; roll(u, j)[i] = u[i - j]
    # j=1: roll = [1, .5, 2, 0, 0, 0] -> u * roll = [.5, 1, 0, 0, 0, 0]
    # j=2: roll = [0, 1, .5, 2, 0, 0] -> [0, 2, 0, 0, 0, 0]
    # j=3: roll = [0, 0, 1, .5, 2, 0] -> [0, 0, 0, 0, 0, 0]
    x = torch.tensor([0.5, 2.0, -1.0])
    expected = torch.tensor([0.5, 1, 0, 0, 0, 0] + [0, 2, 0, 0, 0, 0] + [0] * 6)
    torch.testing.assert_close(dpfp(x), expected)
    # u = [1, 2, 0, 0, 0, 3]: j=1 -> [3, 2, 0, 0, 0, 0], j=2 -> [0, 6, 0, 0, 0, 0], j=3 -> zeros
    x = torch.tensor([1.0, 2.0, -3.0])
    torch.testing.assert_close(dpfp(x), torch.tensor([3.0, 2, 0, 0, 0, 0] + [0, 6, 0, 0, 0, 0] + [0] * 6))


def test_dpfp_shape_and_nonnegative():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    phi = dpfp(x)
    assert NU == 3 and phi.shape == (3, 7, 2 * NU * 5)
    assert (phi >= 0).all() and (phi > 0).any()


# -- the write rule -------------------------------------------------------------------------------------

def test_write_rule_on_a_hand_checkable_case():
    """One layer's memory with explicit weights, A and z: the update equals the formula written out
    entry by entry (beta, k, v_bar, gamma for each memory token)."""
    d_model, d_mem, eps = 2, 2, 1e-5
    memory = AssociativeMemory(d_model, d_mem, eps, correction=True).double()
    with torch.no_grad():
        memory.w_k.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 1.0]]))
        memory.w_v.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, -1.0]]))
        memory.w_b.weight.copy_(torch.tensor([[0.3, -0.2]]))
        memory.w_b.bias.fill_(0.1)
    K = 2 * NU * d_mem
    assert memory.d_key == K == 12
    g = torch.Generator().manual_seed(0)
    A = torch.rand(1, K, d_model, generator=g, dtype=torch.float64)
    z = torch.full((1, K), 0.1, dtype=torch.float64)
    z[0, :4] = 2.0  # covers token 0's key more than fully (gamma clipped to 0), token 1's partly
    m = torch.tensor([[[1.0, 1.0], [-1.0, -2.0]]], dtype=torch.float64)  # two memory tokens
    A_before, z_before = A.clone(), z.clone()
    A_new, z_new = memory.write(m, A, z)
    assert torch.equal(A, A_before) and torch.equal(z, z_before)  # not modified in place

    def phi(s):  # DPFP by hand, on a plain list
        u = [max(v, 0.0) for v in s] + [max(-v, 0.0) for v in s]
        return [u[i] * u[(i - j) % len(u)] for j in range(1, NU + 1) for i in range(len(u))]

    Wk, Wv = memory.w_k.weight.tolist(), memory.w_v.weight.tolist()
    wb, bb = memory.w_b.weight[0].tolist(), memory.w_b.bias.item()
    A_ref, z_ref = A[0].tolist(), z[0].tolist()
    gammas = []
    for tok in m[0].tolist():
        k = phi([sum(Wk[r][c] * tok[c] for c in range(d_model)) for r in range(d_mem)])
        v = [sum(Wv[r][c] * tok[c] for c in range(d_model)) for r in range(d_model)]
        beta = 1 / (1 + math.exp(-(sum(wb[c] * tok[c] for c in range(d_model)) + bb)))
        zk = sum(z[0, i].item() * k[i] for i in range(K))
        v_bar = [sum(k[i] * A[0, i, c].item() for i in range(K)) / (zk + eps) for c in range(d_model)]
        for i in range(K):
            for c in range(d_model):
                A_ref[i][c] += beta * k[i] * (v[c] - v_bar[c])
        gamma = min(max(1 - zk / (sum(ki * ki for ki in k) + eps), 0.0), 1.0)
        gammas.append(gamma)
        for i in range(K):
            z_ref[i] += gamma * k[i]
    assert gammas[0] == 0.0 and 0.0 < gammas[1] < 1.0, gammas  # both branches of the clip are exercised
    torch.testing.assert_close(A_new[0], torch.tensor(A_ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_new[0], torch.tensor(z_ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # gamma is detached: z's gradient flows only through k, as if gamma were a constant
    m = m.clone().requires_grad_(True)
    w = torch.randn(K, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((memory.write(m, A, z)[1] * w).sum(), m)
    gamma = torch.tensor(gammas, dtype=torch.float64).view(1, 2, 1)
    (grad_const,) = torch.autograd.grad(((gamma * dpfp(memory.w_k(m))).sum(1) * w).sum(), m)
    torch.testing.assert_close(grad, grad_const, rtol=1e-12, atol=1e-12)
    assert grad[0, 1].abs().max() > 0


def test_without_correction_z_is_the_sum_of_the_keys():
    memory = AssociativeMemory(4, 2, 1e-5).double()  # correction=False is the default
    g = torch.Generator().manual_seed(1)
    A = torch.rand(3, memory.d_key, 4, generator=g, dtype=torch.float64)
    z = torch.rand(3, memory.d_key, generator=g, dtype=torch.float64)
    m = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    A_new, z_new = memory.write(m, A, z)
    torch.testing.assert_close(z_new, z + dpfp(memory.w_k(m)).sum(1), rtol=1e-12, atol=1e-12)
    corrected = AssociativeMemory(4, 2, 1e-5, correction=True).double()
    corrected.load_state_dict(memory.state_dict())
    torch.testing.assert_close(corrected.write(m, A, z)[0], A_new, rtol=1e-12, atol=1e-12)  # A: same rule


def test_reads_stay_bounded_without_the_normalizer_correction():
    """Regression: with the paper's clipped normalizer update (correction=True) a key whose gamma is clipped to
    0 enters A but not z, so a query that overlaps it and little else reads ~500 x the largest written value (in
    training: reads of 1e7 and a NaN loss on assoc_recall). Without it a read is a weighted mean of the
    written differences, so it grows at most by max |W_v m| per write."""
    reads = {}
    for correction in (True, False):
        torch.manual_seed(0)
        memory = AssociativeMemory(16, 4, 1e-5, correction).double()
        torch.nn.init.normal_(memory.w_v.weight)  # a trained memory: values are not zero
        A, z = torch.zeros(64, memory.d_key, 16, dtype=torch.float64), torch.zeros(64, memory.d_key, dtype=torch.float64)
        v_max, writes = 0.0, 8
        for _ in range(writes):
            m = torch.randn(64, 4, 16, dtype=torch.float64)
            v_max = max(v_max, memory.w_v(m).abs().max().item())
            A, z = memory.write(m, A, z)
        with torch.no_grad():
            reads[correction] = memory.read(torch.randn(64, 256, 16, dtype=torch.float64), A, z).abs().max().item()
    assert reads[False] <= writes * v_max
    assert reads[True] > 10 * writes * v_max  # the failure the default avoids is real


def test_delta_rule_on_a_hand_checkable_case():
    """rule=delta: unit keys ``k = phi(W_k m) / |phi(W_k m)|``, ``A += beta k (W_v m - k A)^T``, read ``unit(phi(W_q h)) A``;
    ``z`` is not used. Expected values from the formulas written out here, not from the module."""
    memory = AssociativeMemory(4, 2, 1e-5, rule="delta").double()
    torch.nn.init.normal_(memory.w_v.weight)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, memory.d_key, 4, generator=g, dtype=torch.float64)
    z = torch.rand(2, memory.d_key, generator=g, dtype=torch.float64)
    m = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        A_new, z_new = memory.write(m, A, z)
        A_ref = A.clone()
        for b in range(2):
            for j in range(3):  # every token against the memory as it was before the write
                f = dpfp(m[b, j] @ memory.w_k.weight.T)
                k = f / f.norm()
                beta = torch.sigmoid(m[b, j] @ memory.w_b.weight[0] + memory.w_b.bias[0])
                A_ref[b] += beta * torch.outer(k, m[b, j] @ memory.w_v.weight.T - k @ A[b])
        torch.testing.assert_close(A_new, A_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(z_new, z)
        h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
        f = dpfp(h @ memory.w_q.weight.T)
        torch.testing.assert_close(memory.read(h, A_new, z_new), (f / f.norm(dim=-1, keepdim=True)) @ A_new,
                                   rtol=1e-12, atol=1e-12)


def test_delta_rule_reads_the_last_write_under_a_key_and_in_proportion_to_the_match():
    """What the delta rule is for: with a write strength near 1, a read with the key just written returns its
    value even when an overlapping key was written before (the armt rule returns a blend); a query whose
    features share nothing with the written key reads zero, and one that overlaps it a little reads a little
    of its value (the armt rule reads all of it: a normalized read is a weighted mean of what was written,
    however weak the match)."""
    reads = {}
    for rule in ("delta", "armt"):
        torch.manual_seed(0)
        memory = AssociativeMemory(8, 4, 1e-5, rule=rule).double()
        torch.nn.init.normal_(memory.w_v.weight)
        torch.nn.init.zeros_(memory.w_b.weight)
        torch.nn.init.constant_(memory.w_b.bias, 30.0)  # beta = 1 - 1e-13
        with torch.no_grad():
            memory.w_q.weight.copy_(memory.w_k.weight)  # a query built like a key reads that key
        m1 = torch.randn(1, 1, 8, dtype=torch.float64)
        m2 = m1 + 0.5 * torch.randn(1, 1, 8, dtype=torch.float64)  # a second key overlapping the first
        empty = torch.zeros(1, memory.d_key, 8, dtype=torch.float64), torch.zeros(1, memory.d_key, dtype=torch.float64)
        with torch.no_grad():
            overlap = (dpfp(memory.w_k(m1)) * dpfp(memory.w_k(m2))).sum()
            A, z = memory.write(m2, *memory.write(m1, *empty))
            last = memory.read(m2, A, z)
            # phi(-x) and phi(x) have disjoint supports ([relu(x), relu(-x)] swaps halves): -m1 shares nothing with m1
            A1, z1 = memory.write(m1, *empty)
            k1 = dpfp(memory.w_k(m1)).flatten()
            g = torch.Generator().manual_seed(1)
            while True:  # a query that overlaps the written key a little (cosine of its features 0.01 .. 0.3)
                q = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
                f = dpfp(memory.w_q(q)).flatten()
                cos = (f @ k1 / (f.norm() * k1.norm())).item()
                if 0.01 < cos < 0.3:
                    break
            reads[rule] = last, memory.read(-m1, A1, z1), memory.read(q, A1, z1), cos, memory.w_v(m1), memory.w_v(m2)
    assert overlap > 0
    last, disjoint, weak, cos, v1, v2 = reads["delta"]
    torch.testing.assert_close(last, v2, rtol=1e-9, atol=1e-9)
    assert torch.equal(disjoint, torch.zeros_like(disjoint))
    torch.testing.assert_close(weak, cos * v1, rtol=1e-9, atol=1e-9)  # reads scale with the match
    last, disjoint, weak, cos, v1, v2 = reads["armt"]
    assert (last - v2).abs().max() > 0.1  # a blend, not the last value
    torch.testing.assert_close(weak, v1, rtol=1e-3, atol=1e-3)  # any overlap reads the whole value


def test_read_is_zero_for_a_fresh_memory_and_normalized():
    memory = armt()
    state = memory.initial_state(2)
    q = torch.randn(2, 3, 16, dtype=torch.float64)
    assert torch.equal(memory.read_memory(q, state, 0), torch.zeros(2, 3, 16, dtype=torch.float64))
    # one write of a single token m into a fresh memory: A = beta k (W_v m)^T, z = k (gamma = 1); reading with
    # the same features (W_q = W_k) gives beta W_v m |k|^2 / (|k|^2 + eps)
    layer = memory.memories[0]
    with torch.no_grad():
        layer.w_q.weight.copy_(layer.w_k.weight)
    m = torch.randn(2, 1, 16, dtype=torch.float64)
    A, z = layer.write(m, state["A"][:, 0], state["z"][:, 0])
    k2 = dpfp(layer.w_k(m)).pow(2).sum(-1, keepdim=True)
    assert (k2 > 0).all()
    torch.testing.assert_close(z, dpfp(layer.w_k(m))[:, 0])
    expected = torch.sigmoid(layer.w_b(m)) * layer.w_v(m) * k2 / (k2 + layer.eps)
    torch.testing.assert_close(layer.read(m, A, z), expected, rtol=1e-12, atol=1e-12)


def test_memory_token_embeddings_for_a_coprocessor():
    memory = armt(num_mem_tokens=3)
    assert memory.memory_token_embeddings().shape == (3, 16)
    assert memory.memory_token_embeddings().requires_grad


# -- segments: writes, gradients, step == sequence ----------------------------------------------------------

def test_memory_is_written_exactly_when_a_segment_closes():
    memory = armt(segment_len=3)
    x = torch.randn(2, 10, D_IN, dtype=torch.float64)
    is_init = torch.zeros(2, 10, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[1, 4] = True  # row 1: a new segment (and episode) at step 4, closing at step 6
    state, changed, positions = memory.initial_state(2), [], []
    with torch.no_grad():
        for t in range(10):
            _, new = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
            changed.append((new["A"] != state["A"]).flatten(1).any(1).tolist())
            positions.append(new["pos"].tolist())
            state = new
    row0 = [c[0] for c in changed]
    row1 = [c[1] for c in changed]
    assert row0 == [t % 3 == 2 for t in range(10)]
    # row 1: closes at 2, the reset at 4 zeroes the memory (a change) and drops the open segment; then 6, 9
    assert row1 == [False, False, True, False, True, False, True, False, False, True]
    assert [p[1] for p in positions] == [1, 2, 0, 1, 1, 2, 0, 1, 2, 0]
    assert (state["A"] != 0).any()


@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_reach_the_memory_weights_through_a_segment_write(layers):
    """y at step 4 (segment 2 with segment_len 2) depends on steps 0..3 only through A and z: nothing
    else crosses a segment boundary. A random readout of it has gradients on W_q, W_k, W_v, W_b and on
    x[0..3]; with a silent memory (W_v = 0) the gradient on x[0..3] is exactly zero."""
    memory = armt(n_layers=layers, segment_len=2)
    x = torch.randn(1, 5, D_IN, dtype=torch.float64, requires_grad=True)
    is_init = torch.zeros(1, 5, dtype=torch.bool)
    is_init[0, 0] = True
    y, _ = memory(x, memory.initial_state(1), is_init)
    loss = readout(y[0, 4])
    names = ["w_q.weight", "w_k.weight", "w_v.weight", "w_b.weight"]
    params = [dict(memory.memories[i].named_parameters())[n] for i in range(layers) for n in names]
    grads = torch.autograd.grad(loss, [x, *params])
    assert grads[0][0, :4].abs().sum(-1).min() > 1e-6, grads[0]  # every earlier step reaches it
    for name, g in zip([f"{i}.{n}" for i in range(layers) for n in names], grads[1:]):
        assert g.abs().max() > 1e-6, name
    # the state at the boundary carries nothing but A and z: an empty cache and position 0
    _, boundary = memory(x[:, :4].detach(), memory.initial_state(1), is_init[:, :4])
    assert boundary["pos"].item() == 0 and not boundary["cache"].any()
    y4, _ = memory(x[:, 4:].detach(), boundary, is_init[:, 4:])
    torch.testing.assert_close(y4[0, 0], y[0, 4].detach(), rtol=1e-10, atol=1e-12)
    # silent memory: no path from earlier segments at all
    with torch.no_grad():
        for m in memory.memories:
            m.w_v.weight.zero_()
    y, _ = memory(x, memory.initial_state(1), is_init)
    (gx,) = torch.autograd.grad(readout(y[0, 4]), x)
    assert gx[0, :4].abs().max() == 0 and gx[0, 4].abs().max() > 0


def long_batch():
    """``x: [4, 50, D_IN]`` and ``is_init``: resets at different positions of segments in each row (two in a
    row in row 2); row 3 never resets (it continues the state it is given)."""
    B, T = 4, 50
    x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:3, 0] = True
    is_init[1, [7, 21, 22 + 9]] = True
    is_init[2, [13, 14, 30, 45]] = True
    is_init[0, 26] = True
    return x, is_init


def used_state(memory, B):
    """A mid-segment state with a written memory (11 steps in: 2 segments of 4 written, 3 steps cached)."""
    x = torch.randn(B, 11, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    is_init = torch.zeros(B, 11, dtype=torch.bool)
    is_init[:, 0] = True
    with torch.no_grad():
        _, state = memory(x, memory.initial_state(B), is_init)
    assert state["pos"].tolist() == [3] * B and state["A"].abs().sum() > 0
    return state


@pytest.mark.parametrize("segment_len, residual, rule", [(4, "gated", "armt"), (1, "gated", "armt"),
                                                         (3, "gated", "armt"), (4, "plain", "armt"),
                                                         (4, "gated", "delta"), (2, "plain", "delta")])
def test_step_equals_sequence_across_segment_boundaries_and_resets(segment_len, residual, rule):
    """50 steps from a mid-segment state: T=1 calls == one call == three calls split at odd places,
    outputs and final states (float64, so any difference is a logic error, not rounding)."""
    memory = armt(segment_len=segment_len, residual=residual, rule=rule).eval()
    x, is_init = long_batch()
    start = used_state(memory, 4) if segment_len == 4 else memory.initial_state(4)
    with torch.no_grad():
        y_seq, s_seq = memory(x, start, is_init)
        y_step, s_step = run_steps(memory, x, start, is_init)
        parts, state = [], start
        for a, b in [(0, 17), (17, 18), (18, 50)]:
            y, state = memory(x[:, a:b], state, is_init[:, a:b])
            parts.append(y)
    tight = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y_step, y_seq, **tight)
    torch.testing.assert_close(torch.cat(parts, 1), y_seq, **tight)
    for key in ("A", "z", "cache", "pos"):
        torch.testing.assert_close(s_step[key], s_seq[key], **tight)
        torch.testing.assert_close(state[key], s_seq[key], **tight)
    # the memory matters here: the same run with a silent memory gives other outputs
    silent = armt(segment_len=segment_len, residual=residual, live_memory=False).eval()
    silent.load_state_dict({k: v for k, v in memory.state_dict().items() if "w_v" not in k}, strict=False)
    with torch.no_grad():
        y_silent, _ = silent(x, start, is_init)
    assert (y_silent - y_seq).abs().max() > 1e-3


def test_reset_mid_segment_equals_a_fresh_start():
    memory = armt().eval()
    x, _ = long_batch()
    start = used_state(memory, 4)
    is_init = torch.zeros(4, 50, dtype=torch.bool)
    is_init[:, 22] = True  # pos 3 + 22 = 25: in the middle of a segment
    with torch.no_grad():
        y, _ = memory(x, start, is_init)
        y_fresh, _ = memory(x[:, 22:], memory.initial_state(4), torch.zeros(4, 28, dtype=torch.bool))
    torch.testing.assert_close(y[:, 22:], y_fresh, rtol=1e-10, atol=1e-10)


def test_sequence_mode_runs_one_round_per_segment_depth_not_per_step():
    """Sequence mode runs each layer once per round, each round over whole segments of all chains (a row's
    steps between episode starts: a reset zeroes the state, so chains are independent and run side by
    side). 64 aligned steps with segment_len 8: 8 rounds, not 64; 12-step episodes: 2 rounds; and every
    segment is processed exactly once."""
    memory = armt(segment_len=8, n_layers=1).eval()
    batches = []
    memory.layers[0].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    x = torch.randn(3, 64, D_IN, dtype=torch.float64)
    is_init = torch.zeros(3, 64, dtype=torch.bool)
    is_init[:, 0] = True
    with torch.no_grad():
        memory(x, memory.initial_state(3), is_init)
        assert batches == [3] * 8
        batches.clear()
        is_init[2, 20] = True  # row 2: steps 0-19 (3 segments) and 20-63 (6 segments)
        memory(x, memory.initial_state(3), is_init)
        assert batches == [4, 4, 4, 3, 3, 3, 2, 2]
        batches.clear()
        episodes = (torch.arange(64) + torch.tensor([[0], [5], [11]])) % 12 == 0  # 12-step episodes, any phase
        episodes[:, 0] = True
        memory(x, memory.initial_state(3), episodes)
        segments = sum(len(range(0, n, 8)) for row in episodes for n in torch.diff(
            torch.cat([row.nonzero().flatten(), torch.tensor([64])])).tolist())
        assert len(batches) == 2 and sum(batches) == segments


def test_segment_len_1_works():
    """Every step closes its segment: the memory is written after every step; no cache."""
    memory = armt(segment_len=1)
    state = memory.initial_state(3)
    assert state["cache"].shape == (3, 2, 0, 16)
    check_memory(memory, rtol=1e-9, atol=1e-10)
    x, is_init = long_batch()
    with torch.no_grad():
        y, s = memory(x[:3, :6], state, is_init[:3, :6])
    assert s["pos"].tolist() == [0, 0, 0] and (s["A"] != 0).all(-1).any()
    # the TorchRL wrapper: acting step by step == replaying the slice (the empty cache in the specs)
    module = MemoryModule(armt(segment_len=1, dtype=torch.float32), in_key="x", out_key="y")
    td = TensorDict({"x": x[:3, :12].float(), "is_init": is_init[:3, :12].unsqueeze(-1)}, batch_size=[3, 12])
    state, steps = module.memory.initial_state(3), []
    with torch.no_grad():
        for t in range(12):
            step_td = td[:, t].clone().set("memory_state", state)
            module(step_td)
            state = step_td["next", "memory_state"]
            steps.append(step_td)
        stepped = torch.stack(steps, 1)
        with set_recurrent_mode(True):
            replay = module(stepped.exclude("y", "next"))
    torch.testing.assert_close(replay["y"], stepped["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"segment_len": 2, "num_mem_tokens": 1, "n_layers": 1}, {"segment_len": 5},
                                    {"residual": "plain"}, {"rule": "delta"},
                                    {"rule": "delta", "segment_len": 2, "num_mem_tokens": 1}])
def test_check_memory_with_a_live_memory(kwargs):
    """The contract checker on ARMT with a non-zero W_v (the registry's test_kwargs build a fresh, silent one)."""
    check_memory(armt(dtype=torch.float32, **kwargs))


# -- knobs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"segment_len": 0}, "armt: segment_len must be in [1, inf]"),
        ({"num_mem_tokens": 0}, "armt: num_mem_tokens must be in [1, inf]"),
        ({"d_mem": 0}, "armt: d_mem must be in [1, inf]"),
        ({"n_layers": 0}, "armt: n_layers must be in [1, inf]"),
        ({"d_model": -2}, "armt: d_model must be in [1, inf]"),
        ({"d_ff": 0}, "armt: d_ff must be in [1, inf]"),
        ({"segment_len": 2.5}, "armt: segment_len must be an integer in [1, inf]"),
        ({"n_heads": 3}, "d_model=16 must be divisible by n_heads=3"),
        ({"eps": 0.0}, "armt: eps must be a finite number in [1e-10, 1.0]"),
        ({"eps": float("nan")}, "armt: eps must be a finite number in [1e-10, 1.0]"),
        ({"gate_bias": float("inf")}, "armt: gate_bias must be a finite number"),
        ({"residual": "pre"}, "armt: residual must be one of ['gated', 'plain']"),
        ({"correction": "yes"}, "armt: correction must be true or false"),
        ({"rule": "deltanet"}, "armt: rule must be one of ['armt', 'delta'], got 'deltanet'"),
        ({"rule": "delta", "correction": True}, "armt: correction=true is the armt rule's normalizer update"),
    ],
)
def test_bad_knobs_raise_naming_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_memory("armt", d_in=D_IN, **{"d_model": 16, **kwargs})


def test_eps_and_gate_bias_are_live():
    """The knobs that do not change any shape still change the outputs (same weights)."""
    x, is_init = long_batch()
    memory = armt(n_layers=1)
    with torch.no_grad():
        y = memory(x, memory.initial_state(4), is_init)[0]
        for knob, value in (("eps", 0.5), ("gate_bias", 0.0)):
            other = armt(n_layers=1, **{knob: value})
            other.load_state_dict(memory.state_dict())
            assert (other(x, other.initial_state(4), is_init)[0] - y).abs().max() > 1e-4, knob


# -- the whole module against its readable reference (rlmem/memory/reference/armt.py) --------------------


def _reference_case(segment_len, T=15, seed=21, **kwargs):
    """A float64 ARMT with a live memory, a mid-segment state with a written memory (when segments are longer
    than a step), inputs, and episode starts mid-segment (twice in a row in row 2; none in row 0)."""
    memory = armt(segment_len=segment_len, **kwargs)
    B = 3
    start = used_state(memory, B) if segment_len == 4 else memory.initial_state(B)
    x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[1, 0] = is_init[1, 10] = True
    is_init[2, 6] = is_init[2, 7] = is_init[2, T - 1] = True
    return memory, x, start, is_init


@pytest.mark.parametrize("segment_len, kwargs", [(4, {}), (1, {}), (3, {"residual": "plain"}),
                                                 (4, {"rule": "delta"}), (4, {"correction": True})])
def test_sequence_mode_equals_the_reference_outputs_states_and_parameter_gradients(segment_len, kwargs):
    """The chained, segment-parallel sequence mode against the per-row step loop of the reference (float64):
    outputs, next state (A, z, cache, pos) and gradients w.r.t. every parameter and the incoming state."""
    _assert_sequence_equals_the_reference(*_reference_case(segment_len, **kwargs))


def test_short_episodes_equal_the_reference_when_only_some_chains_write():
    """PPO's replay of short episodes at random phases: in a round most chains write (the others' memory tokens
    are computed and dropped) or few do (their memory tokens run apart from the steps), and chains whose last
    segment closes write only if their memory is the next state. All of it against the reference."""
    memory = armt(segment_len=4)
    B, T = 6, 26
    start = used_state(memory, B)
    x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    phase = torch.tensor([0, 1, 2, 3, 4, 5])
    is_init = (torch.arange(T) + phase.unsqueeze(1)) % 6 == 0  # 6-step episodes: segments of 4 and 2 steps
    is_init[4] = False
    is_init[4, T - 8] = True  # row 4 ends with two complete segments: its last chain writes in round 1
    is_init[5, T - 4] = True  # row 5 ends with one complete segment, after a chain that ends unwritten
    _assert_sequence_equals_the_reference(memory, x, start, is_init)


def _assert_sequence_equals_the_reference(memory, x, start, is_init):
    from rlmem.memory.reference import armt as reference

    float_keys = ("A", "z", "cache")
    results = []
    for run in (memory, lambda *a: reference.forward(memory, *a)):
        st = start.clone()
        for key in float_keys:
            st[key] = st[key].clone().requires_grad_()
        y, s = run(x, st, is_init)
        loss = readout(y) + sum((s[key] * (0.3 + i)).sum() for i, key in enumerate(float_keys))
        wrt = [*memory.parameters(), *(st[key] for key in float_keys)]
        results.append((y, s, torch.autograd.grad(loss, wrt, allow_unused=True)))
    (y1, s1, g1), (y2, s2, g2) = results
    tight = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(y1, y2, **tight)
    for key in ("A", "z", "cache", "pos"):
        torch.testing.assert_close(s1[key], s2[key], **tight)
    assert s2["A"].abs().sum() > 0  # the memory was written
    for (name, _), a, b in zip([*memory.named_parameters(), *((k, None) for k in float_keys)], g1, g2, strict=True):
        if b is None:
            assert a is None or a.numel() == 0 or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, **tight, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("segment_len", [4, 1])
def test_acting_steps_equal_the_reference(segment_len):
    """Step mode (T = 1 calls against the right-aligned cache) against the reference, step by step."""
    from rlmem.memory.reference import armt as reference

    memory, x, state, is_init = _reference_case(segment_len, T=11, seed=22)
    ref_state = state
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
            y_ref, ref_state = reference.forward(memory, x[:, t : t + 1], ref_state, is_init[:, t : t + 1])
            torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
            for key in ("A", "z", "cache", "pos"):
                torch.testing.assert_close(state[key], ref_state[key], rtol=1e-9, atol=1e-10)
