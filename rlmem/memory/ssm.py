"""StreamingSSM: a constant-memory diagonal linear recurrence with multi-timescale decays (the OT agent).

Per layer (pre-norm residual block ``h <- h + Layer(RMSNorm(h))``, final RMSNorm):

- ``in_proj``: ``d_model -> (x, z)``, each ``d_inner = expand * d_model``;
- causal depthwise conv over ``x`` (kernel ``d_conv``, its last ``d_conv - 1`` inputs kept in the state),
  then SiLU -> ``u``;
- ``s_t = lambda * s_{t-1} + sqrt(1 - lambda^2) * u_t`` per channel, ``lambda = exp(-1 / tau)``, with the
  time constants ``tau`` log-spaced over ``[min_timescale, max_timescale]`` across channels (learned from
  there on). Unlike Mamba the decays do not depend on the input, so every channel keeps a fixed horizon;
  the ``sqrt(1 - lambda^2)`` input scale keeps slow channels from drowning their inputs (as in the LRU);
- output ``out_proj(s * SiLU(z))``.

No attention and no cache: O(1) time and memory per step. Sequence mode uses the same parallel scan as
Mamba (:func:`rlmem.memory.mamba.linear_scan`), with the decay zeroed where an episode starts.

State (``L = n_layers``): ``conv: [B, L, d_inner, d_conv - 1]``, ``s: [B, L, d_inner]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rlmem.validate import check_float, check_int
from rlmem.memory.mamba import ResidualScanStack, causal_depthwise_conv, linear_scan
from rlmem.memory.registry import register_memory


class StreamingLayer(nn.Module):
    """One StreamingSSM layer. ``x: [B, T, d_model]`` -> ``[B, T, d_model]`` plus its next (conv, s) state."""

    def __init__(self, d_model: int, d_inner: int, d_conv: int, min_timescale: float, max_timescale: float):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)  # weights only; applied by hand
        self.log_tau = nn.Parameter(torch.linspace(math.log(min_timescale), math.log(max_timescale), d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x, conv_state, s, seg, keep):
        """``x: [B, T, d_model]``, ``conv_state: [B, d_inner, d_conv-1]``, ``s: [B, d_inner]``,
        ``seg: [B, d_conv-1+T]`` or None, ``keep: [B, T]`` float (0 where an episode starts) or None."""
        xs, z = self.in_proj(x).chunk(2, -1)
        u, conv_state = causal_depthwise_conv(xs, conv_state, self.conv.weight.squeeze(1), self.conv.bias, seg)
        lam = torch.exp(-torch.exp(-self.log_tau))  # [d_inner], in (0, 1)
        drive = F.silu(u) * torch.sqrt(1 - lam * lam)
        decay = lam.expand_as(drive)
        if keep is not None:
            decay = decay * keep.unsqueeze(-1)  # s restarts from zero at episode starts
        states = linear_scan(decay, drive, s)  # [B, T, d_inner]
        return self.out_proj(states * F.silu(z)), conv_state, states[:, -1]


@register_memory("ssm")
class StreamingSSM(ResidualScanStack):
    """Stack of StreamingSSM layers. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    State: ``conv: [B, n_layers, d_inner, d_conv - 1]``, ``s: [B, n_layers, d_inner]``, zero at episode
    start; ``d_inner = expand * d_model``.
    """

    scan_key = "s"
    test_kwargs = {"d_model": 16, "n_layers": 2, "d_conv": 3, "expand": 2}

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, expand: int = 2, d_conv: int = 4,
                 min_timescale: float = 1.0, max_timescale: float = 1000.0):
        d_model = check_int("ssm: d_model", d_model, low=1)
        n_layers = check_int("ssm: n_layers", n_layers, low=1)
        expand = check_int("ssm: expand", expand, low=1)
        d_conv = check_int("ssm: d_conv", d_conv, low=2)
        min_timescale = check_float("ssm: min_timescale", min_timescale, low=0.0, why="and > 0")
        if min_timescale == 0:
            raise ValueError("ssm: min_timescale must be > 0, got 0")
        max_timescale = check_float("ssm: max_timescale", max_timescale, low=min_timescale,
                                    why=f"at least min_timescale={min_timescale}")
        d_inner = expand * d_model
        layers = [StreamingLayer(d_model, d_inner, d_conv, min_timescale, max_timescale) for _ in range(n_layers)]
        super().__init__(d_in, d_model, layers, d_inner, d_conv, (d_inner,))
