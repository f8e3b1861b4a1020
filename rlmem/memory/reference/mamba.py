"""Mamba, the slow and obvious way: the selective SSM of Gu & Dao (2023) as one Python step per time step.

:mod:`rlmem.memory.mamba` runs the recurrence as an autograd Function with a hand-written backward
(``_SelectiveScan``), the causal conv as shifted multiply-adds with their own backward
(``_DepthwiseConv``, plus an episode mask), and acting through ``_selective_step``. The functions here are
what those must equal: they take the optimized module (``MambaMemory`` / ``MambaMixer``) and run on its
parameters, the maths written out step by step, autograd for the backward. Not registered as a memory
system; tests/test_mamba.py and tests/test_infinity_speed_equivalence.py compare against them in float64.

Per step t of a mixer (``D = d_inner``, ``N = d_state``)::

    x_t, z_t = in_proj(h_t)                                   # [B, D] each
    c_t = bias + sum_j w_j * window_t[j]                      # causal depthwise conv over the last d_conv x's
    u_t = silu(c_t)
    dt_t, B_t, C_t = x_proj(u_t);  delta_t = softplus(dt_proj(dt_t))    # input-dependent: "selective"
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   A = -exp(A_log)   # [B, D, N]
    y_t = C_t h_t + D u_t;   out_t = out_proj(y_t * silu(z_t))

An episode start at t empties the conv window and the SSM state before step t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict


def causal_conv(x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                is_init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [B, T, C]``, ``buffer: [B, C, k-1]`` (the previous k-1 inputs, oldest first), ``weight: [C, k]``,
    ``bias: [C]``, ``is_init: [B, T]`` -> ``(y: [B, T, C], next buffer [B, C, k-1])``."""
    ys = []
    for t in range(x.shape[1]):
        keep = (~is_init[:, t]).to(x.dtype)[:, None, None]
        buffer = buffer * keep  # a new episode sees no input of the previous one
        window = torch.cat([buffer, x[:, t, :, None]], 2)  # [B, C, k]: inputs t-k+1 .. t
        ys.append((window * weight).sum(-1) + bias)  # one filter per channel (depthwise)
        buffer = window[:, :, 1:]
    return torch.stack(ys, 1), buffer


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   h: torch.Tensor, is_init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u, delta: [B, T, D]``, ``A: [D, N]``, ``Bm, Cm: [B, T, N]``, ``h: [B, D, N]`` (h_{-1}),
    ``is_init: [B, T]`` -> ``(C_t h_t: [B, T, D], h_T: [B, D, N])`` (without the ``D u`` skip)."""
    ys = []
    for t in range(u.shape[1]):
        h = h * (~is_init[:, t]).to(u.dtype)[:, None, None]  # episode start: h restarts from zero
        decay = torch.exp(delta[:, t, :, None] * A)  # [B, D, N] in (0, 1]: A < 0, delta > 0 (ZOH of A)
        drive = (delta[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]  # [B, D, N]: delta B u (Euler for B)
        h = decay * h + drive
        ys.append((h * Cm[:, t, None, :]).sum(-1))  # C_t h_t: [B, D]
    return torch.stack(ys, 1), h


def mixer(layer, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
          is_init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``MambaMixer``: ``x: [B, T, d_model]``, ``conv_state: [B, D, d_conv-1]``, ``ssm_state: [B, D, N]``
    -> ``(out [B, T, d_model], conv_state, ssm_state)``."""
    xs, z = layer.in_proj(x).chunk(2, -1)  # [B, T, D] each: the SSM's input and its output gate
    c, conv_state = causal_conv(xs, conv_state, layer.conv.weight.squeeze(1), layer.conv.bias, is_init)
    u = F.silu(c)
    dt, Bm, Cm = layer.x_proj(u).split([layer.dt_rank, layer.d_state, layer.d_state], -1)
    delta = F.softplus(layer.dt_proj(dt))  # [B, T, D], positive step sizes
    A = -torch.exp(layer.A_log)  # [D, N], negative: a stable, decaying state
    y, ssm_state = selective_scan(u, delta, A, Bm, Cm, ssm_state, is_init)
    y = y + layer.D * u  # skip connection
    return layer.out_proj(y * F.silu(z)), conv_state, ssm_state


def forward(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDict]:
    """``MambaMemory.forward``: ``x: [B, T, d_in]``, ``state``: ``conv: [B, L, D, d_conv-1]``,
    ``ssm: [B, L, D, N]``, ``is_init: [B, T]`` -> ``(y: [B, T, d_model], next_state)``.

    Pre-norm residual layers ``h <- h + Mixer(RMSNorm(h))``, then a final RMSNorm."""
    h = memory.embed(x)
    convs, ssms = [], []
    for i, (norm, layer) in enumerate(zip(memory.norms, memory.layers)):
        out, conv, ssm = mixer(layer, norm(h), state["conv"][:, i], state["ssm"][:, i], is_init)
        h = h + out
        convs.append(conv)
        ssms.append(ssm)
    next_state = TensorDict({"conv": torch.stack(convs, 1), "ssm": torch.stack(ssms, 1)}, batch_size=state.batch_size)
    return memory.norm_f(h), next_state
