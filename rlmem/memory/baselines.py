"""Baselines: GRU, LSTM and the memoryless MLP (the lower bound every memory must beat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory


def _keep_mask(is_init: torch.Tensor) -> torch.Tensor:
    """``is_init: [B, T] -> [B, T, 1]`` float mask, 0 where the (zero) initial state is restored."""
    return (~is_init).unsqueeze(-1).to(torch.get_default_dtype())


@register_memory("gru")
class GRUMemory(MemorySystem):
    """Single-layer GRU. State ``{"h": [B, H]}``, zero at episode start.

    The input projection of all T steps is one matmul; only the hidden-to-hidden
    part runs in the time loop (the loop is unavoidable: resets can fall anywhere).
    """

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.cell = nn.GRUCell(d_in, hidden_size)

    def initial_state(self, batch_size, device=None):
        return TensorDict({"h": torch.zeros(batch_size, self.hidden_size, device=device)}, batch_size=[batch_size])

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        cell = self.cell
        gi = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, -1)  # 3 x [B, T, H]
        keep = _keep_mask(is_init) if is_init.any() else None
        h = state["h"]
        ys = []
        for t in range(x.shape[1]):
            if keep is not None:
                h = h * keep[:, t]
            gh_r, gh_z, gh_n = F.linear(h, cell.weight_hh, cell.bias_hh).chunk(3, -1)
            r = torch.sigmoid(gi[0][:, t] + gh_r)
            z = torch.sigmoid(gi[1][:, t] + gh_z)
            n = torch.tanh(gi[2][:, t] + r * gh_n)
            h = n + z * (h - n)
            ys.append(h)
        return torch.stack(ys, 1), TensorDict({"h": h}, batch_size=state.batch_size)


@register_memory("lstm")
class LSTMMemory(MemorySystem):
    """Single-layer LSTM. State ``{"h": [B, H], "c": [B, H]}``, zero at episode start."""

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.cell = nn.LSTMCell(d_in, hidden_size)

    def initial_state(self, batch_size, device=None):
        zeros = torch.zeros(batch_size, self.hidden_size, device=device)
        return TensorDict({"h": zeros, "c": zeros.clone()}, batch_size=[batch_size])

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        cell = self.cell
        gi = F.linear(x, cell.weight_ih, cell.bias_ih)  # [B, T, 4H]
        keep = _keep_mask(is_init) if is_init.any() else None
        h, c = state["h"], state["c"]
        ys = []
        for t in range(x.shape[1]):
            if keep is not None:
                h, c = h * keep[:, t], c * keep[:, t]
            i, f, g, o = (gi[:, t] + F.linear(h, cell.weight_hh, cell.bias_hh)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        return torch.stack(ys, 1), TensorDict({"h": h, "c": c}, batch_size=state.batch_size)


@register_memory("mlp")
class MLPMemory(MemorySystem):
    """No memory at all: ``y_t = MLP(x_t)``. Its state is an empty TensorDict."""

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.net = nn.Sequential(nn.Linear(d_in, hidden_size), nn.Tanh())

    def initial_state(self, batch_size, device=None):
        return TensorDict({}, batch_size=[batch_size], device=device)

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        return self.net(x), state
