"""DualTierMiras, the slow and obvious way: one Python step per time step, the maths of the module
docstring of :mod:`rlmem.memory.miras` written out line by line.

The optimized module computes the same numbers three ways (the autograd Function ``_StepLoop`` with a
hand-written backward, the one-step acting path ``_one_step``, the chunked parallel form
``scan_chunks``); these functions are what they must equal. They take the optimized module itself, so
they run on its parameters (``in_proj, q_proj, k_proj, v_proj, out_proj, norm, log_temperature``) and
its config (``lr_fast, lr_deep, decay, momentum, surprise_threshold, chunk``), and let autograd do the
backward. Not registered as a memory system; tests/test_infinity_speed_equivalence.py and
tests/test_miras.py compare against them in float64.

Shapes: ``B`` batch rows, ``T`` steps, ``H = n_heads``, ``S = mem_slots`` (key size), ``dh = d_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlmem.memory.miras import _EPS


def project(memory, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h: [B, T, d_model]`` -> ``q, k: [B, T, H, S]`` (unit length per head), ``v: [B, T, H, dh]``."""
    B, T, _ = h.shape
    H, S, dh = memory.n_heads, memory.mem_slots, memory.d_head
    q = F.normalize(memory.q_proj(h).view(B, T, H, S), dim=-1)  # unit keys: |M k| is bounded by |M|
    k = F.normalize(memory.k_proj(h).view(B, T, H, S), dim=-1)
    v = memory.v_proj(h).view(B, T, H, dh)
    return q, k, v


def surprise_gate(memory, error: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The deep tier's write gate of one step: ``error, v: [B, H, dh]`` -> ``g: [B, H]`` in (0, 1).

    surprise = |e|^2 / (|v|^2 + eps): the tier's own relative prediction error (0: it already knows v);
    g = sigmoid((surprise - threshold) / temperature)."""
    surprise = error.pow(2).sum(-1) / (v.pow(2).sum(-1) + _EPS)
    temperature = memory.log_temperature.exp()
    return torch.sigmoid((surprise - memory.surprise_threshold) / temperature)


def scan(memory, q, k, v, state: TensorDict, is_init: torch.Tensor, gate_scale: torch.Tensor | None = None,
         chunk: int = 1) -> tuple[torch.Tensor, TensorDict, torch.Tensor]:
    """Run both tiers over a sequence, one step at a time.

    ``q, k: [B, T, H, S]``, ``v: [B, T, H, dh]``, ``state``: ``fast, deep, deep_momentum: [B, H, dh, S]``,
    ``is_init: [B, T]`` bool, ``gate_scale: [B, T]`` or None (multiplies the deep gate: 0 = no deep write,
    no deep forgetting; a trigger) -> ``(reads [B, T, 2 H dh], next_state, write_rate)``;
    ``reads[:, t] = [fast heads; deep heads]`` read before step t's write, ``write_rate`` the mean deep gate.

    ``chunk = 1`` is the exact step loop (``scan_steps`` and acting). ``chunk > 1`` is what chunked sequence
    mode (``scan_chunks``) means: every step's prediction error is taken against the memory at the start
    of its chunk of ``chunk`` steps (counted from t = 0 of this call; the zero memory after an episode start
    inside the chunk); reads and the update rules are the step loop's.
    """
    fast, deep, mom = state["fast"], state["deep"], state["deep_momentum"]  # [B, H, dh, S] each
    reads, gates = [], []
    for t in range(q.shape[1]):
        if t % chunk == 0:  # the memory the errors are taken against (the previous step's when chunk = 1)
            fast_start, deep_start = fast, deep
        # an episode start resets the state *before* step t (DESIGN.md section 3)
        keep = (~is_init[:, t]).to(q.dtype)[:, None, None, None]
        fast, deep, mom = fast * keep, deep * keep, mom * keep
        fast_start, deep_start = fast_start * keep, deep_start * keep
        qt, kt, vt = q[:, t], k[:, t], v[:, t]  # [B, H, S], [B, H, S], [B, H, dh]

        # read before writing: r = M q for both tiers
        read_fast = torch.einsum("bhds,bhs->bhd", fast, qt)
        read_deep = torch.einsum("bhds,bhs->bhd", deep, qt)
        reads.append(torch.cat([read_fast, read_deep], 1).flatten(1))  # [B, 2 H dh]: fast heads, then deep

        # each tier's prediction error on the new pair: e = v - M k
        e_fast = vt - torch.einsum("bhds,bhs->bhd", fast_start, kt)
        e_deep = vt - torch.einsum("bhds,bhs->bhd", deep_start, kt)

        # fast tier: delta rule with forgetting, always written
        fast = (1 - memory.decay) * fast + memory.lr_fast * torch.einsum("bhd,bhs->bhds", e_fast, kt)

        # deep tier: Titans' momentum update, applied through the surprise gate
        g = surprise_gate(memory, e_deep, vt)  # [B, H]
        if gate_scale is not None:
            g = g * gate_scale[:, t, None]
        gates.append(g)
        mom_full = memory.momentum * mom + memory.lr_deep * torch.einsum("bhd,bhs->bhds", e_deep, kt)
        deep_full = (1 - memory.decay) * deep + mom_full
        g = g[..., None, None]
        mom = mom + g * (mom_full - mom)  # g = 0: untouched (no write, no forgetting); g = 1: full update
        deep = deep + g * (deep_full - deep)
    next_state = TensorDict({"fast": fast, "deep": deep, "deep_momentum": mom}, batch_size=state.batch_size)
    return torch.stack(reads, 1), next_state, torch.stack(gates).mean()


def forward(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor,
            trigger: torch.Tensor | None = None) -> tuple[torch.Tensor, TensorDict]:
    """``DualTierMiras.forward``: ``x: [B, T, d_in]`` -> ``(y: [B, T, d_model], next_state)``.

    ``trigger: [B, T]`` bool or None switches the deep-tier write per row and step. Sequence mode uses the
    module's ``chunk`` (T = 1, acting, is always the exact step)."""
    h = memory.in_proj(x)
    q, k, v = project(memory, h)
    chunk = memory.chunk if x.shape[1] > 1 else 1
    gate_scale = None if trigger is None else trigger.to(h.dtype)
    r, next_state, _ = scan(memory, q, k, v, state, is_init, gate_scale, chunk)
    return memory.norm(h + memory.out_proj(r)), next_state  # residual read-out, as in a transformer block
