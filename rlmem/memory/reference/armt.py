"""ARMT, the slow and obvious way: one batch row at a time, one Python step per time step.

:mod:`rlmem.memory.armt` runs its sequence mode without a loop over steps (chains of steps between episode
starts run side by side, whole segments per round, cached layer inputs spliced into round 0) and its step
mode against a right-aligned cache. The functions here are what both must equal: they take the optimized
``ARMT`` module and run on its parameters (``embed, mem_tokens, layers, memories, norm_f``), with the
associative read and write written out as in the paper (Rodkin et al. 2024, arXiv 2407.04841) and
DESIGN.md section 4, and autograd for the backward. The transformer layers (``WindowLayer``, shared with
the windowed transformer) are called as they are: they are not the part being checked. Not registered as
a memory system; tests/test_armt.py compares against them in float64.

Per step of a row (``S = segment_len`` steps per segment, ``M = num_mem_tokens``, ``L = n_layers``)::

    episode start: A = 0, z = 0, the running segment is dropped (no write), pos = 0
    tok = embed(x_t)
    per layer l:  inp = tok + read_l(tok)                   # associative read before the layer
                  tok = layer_l(inp, keys = layer-l inputs of this segment's steps so far)   # causal
    y_t = norm_f(tok)
    if pos == S - 1 (the segment closes):
        m = mem_tokens
        per layer l:  inp = m + read_l(m)
                      m = layer_l(inp, keys = [the segment's layer-l inputs; memory tokens so far])
                      A_l, z_l = write_l(m)               # from the memory tokens' outputs of layer l
        pos = 0
    else: pos += 1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlmem.memory.armt import NU


def dpfp(x: torch.Tensor, nu: int = NU) -> torch.Tensor:
    """DPFP feature map (Schlag et al. 2021): ``x: [..., d] -> [..., 2 nu d]``, nonnegative.

    ``u = [relu(x), relu(-x)]``, then ``[u * roll(u, 1), ..., u * roll(u, nu)]``."""
    u = torch.cat([F.relu(x), F.relu(-x)], -1)
    return torch.cat([u * torch.roll(u, j, -1) for j in range(1, nu + 1)], -1)


def read(mem, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One layer's associative read. ``mem``: its ``AssociativeMemory`` (``w_q``, ``eps``, ``rule``),
    ``h: [Q, d_model]``, ``A: [K, d_model]``, ``z: [K]`` -> ``[Q, d_model]``.

    rule ``armt``: ``phi(W_q h) A / (z . phi(W_q h) + eps)`` (a weighted mean of what was written);
    rule ``delta``: ``unit(phi(W_q h)) A``."""
    q = dpfp(mem.w_q(h))  # [Q, K]
    if mem.rule == "delta":
        return (q / q.norm(dim=-1, keepdim=True).clamp_min(mem.eps)) @ A
    return (q @ A) / ((q @ z)[:, None] + mem.eps)


def write(mem, m: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's associative write from the memory tokens' outputs ``m: [M, d_model]``:
    ``A: [K, d_model]``, ``z: [K]`` -> new ``(A, z)``. Every token is written against the memory as it was
    before this write (the sum below), each with its own strength ``beta = sigmoid(W_b m)``."""
    A_new, z_new = A, z
    for mt in m:  # one memory token at a time: [d_model]
        k = dpfp(mem.w_k(mt))  # [K]
        beta = torch.sigmoid(mem.w_b(mt))  # [1]
        if mem.rule == "delta":
            k = k / k.norm().clamp_min(mem.eps)  # unit key: k A is what a read with k returns now
            A_new = A_new + beta * torch.outer(k, mem.w_v(mt) - k @ A)  # write only the difference
            continue
        zk = k @ z
        v_bar = (k @ A) / (zk + mem.eps)  # what the memory returns for k now
        A_new = A_new + beta * torch.outer(k, mem.w_v(mt) - v_bar)
        if mem.correction:  # the paper's clipped normalizer update (gamma detached)
            gamma = (1 - zk / (k.pow(2).sum() + mem.eps)).clamp(0, 1).detach()
            z_new = z_new + gamma * k
        else:  # z = the sum of all keys written
            z_new = z_new + k
    return A_new, z_new


def _attend(layer, h: torch.Tensor, keys: torch.Tensor, first: int) -> torch.Tensor:
    """``h: [Q, d]`` at positions ``first .. first+Q-1`` of the segment context ``[steps; memory tokens]``,
    ``keys: [first+Q, d]`` (the layer inputs at positions 0 .. first+Q-1) -> the layer's output ``[Q, d]``.
    Causal: position p attends to positions j <= p, with relative distance p - j."""
    Q, n = h.shape[0], keys.shape[0]
    dist = (first + torch.arange(Q, device=h.device)).unsqueeze(1) - torch.arange(n, device=h.device)  # [Q, n]
    allowed = dist >= 0
    return layer(h[None], keys[None], allowed[None], dist.clamp(min=0))[0]


def forward(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDict]:
    """``ARMT.forward``: ``x: [B, T, d_in]``, ``state`` (``A: [B, L, K, d]``, ``z: [B, L, K]``,
    ``cache: [B, L, S-1, d]`` right-aligned, ``pos: [B]``), ``is_init: [B, T]`` ->
    ``(y: [B, T, d_model], next_state)``. Plain ARMT only (no recurrent ``"mem"`` tokens, as DARMT keeps)."""
    if "mem" in state.keys():
        raise ValueError("reference ARMT: recurrent memory tokens (state key 'mem') are not covered")
    ys, states = [], []
    for b in range(x.shape[0]):  # rows are independent: each has its own memory and segment
        y, s = _row(memory, x[b], state[b], is_init[b])
        ys.append(y)
        states.append(s)
    keys = ("A", "z", "cache", "pos")
    next_state = TensorDict({key: torch.stack([s[key] for s in states]) for key in keys},
                            batch_size=state.batch_size)
    return torch.stack(ys), next_state


def _row(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One row: ``x: [T, d_in]``, ``state`` of that row, ``is_init: [T]`` -> ``(y: [T, d], next state)``."""
    S, L = memory.segment_len, memory.n_layers
    A, z = list(state["A"].unbind(0)), list(state["z"].unbind(0))  # per layer [K, d], [K]
    pos = int(state["pos"])
    # the layer inputs of the running segment's earlier steps (the last pos slots of the cache)
    segment = [[state["cache"][i, S - 1 - pos + j] for j in range(pos)] for i in range(L)]
    ys = []
    for t in range(x.shape[0]):
        if is_init[t]:  # a new episode: empty memory, a new segment; the unfinished one is dropped unwritten
            A, z = [torch.zeros_like(a) for a in A], [torch.zeros_like(c) for c in z]
            segment, pos = [[] for _ in range(L)], 0
        tok = memory.embed(x[t])[None]  # [1, d]
        for i, (layer, mem) in enumerate(zip(memory.layers, memory.memories)):
            inp = tok + read(mem, tok, A[i], z[i])  # read before the layer
            segment[i].append(inp[0])
            tok = _attend(layer, inp, torch.stack(segment[i]), pos)  # this step at position pos
        ys.append(memory.norm_f(tok[0]))
        if pos < S - 1:
            pos += 1
            continue
        # the segment closes: its memory tokens go through the layers after its S steps, then write
        m = memory.mem_tokens  # [M, d]
        for i, (layer, mem) in enumerate(zip(memory.layers, memory.memories)):
            inp = m + read(mem, m, A[i], z[i])
            m = _attend(layer, inp, torch.cat([torch.stack(segment[i]), inp]), S)
            A[i], z[i] = write(mem, m, A[i], z[i])  # after the layer, from its memory-token outputs
        segment, pos = [[] for _ in range(L)], 0
    # next state: the running segment's layer inputs right-aligned in the cache, zeros elsewhere
    empty = torch.zeros_like(state["cache"][0])  # [S-1, d]
    cache = torch.stack([torch.cat([empty[: S - 1 - pos], *(h[None] for h in segment[i])]) for i in range(L)])
    return torch.stack(ys), {"A": torch.stack(A), "z": torch.stack(z), "cache": cache,
                             "pos": torch.tensor(pos, dtype=state["pos"].dtype, device=x.device)}
