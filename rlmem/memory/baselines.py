"""Baselines: GRU, LSTM and the memoryless MLP (the lower bound every memory must beat)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from rlmem.validate import check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory
from rlmem.memory.segments import Segments


@register_memory("gru")
class GRUMemory(MemorySystem):
    """Single-layer GRU. State ``{"h": [B, H]}``, zero at episode start.

    Rows are cut into episode segments at resets and run by one ``nn.GRU`` call (see
    :mod:`rlmem.memory.segments`), so the time loop runs in C++ in both step and sequence mode.
    """

    test_kwargs = {"hidden_size": 16}

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        hidden_size = check_int("gru: hidden_size", hidden_size, low=1)
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.rnn = nn.GRU(d_in, hidden_size, batch_first=True)

    def initial_state(self, batch_size, device=None):
        return TensorDict({"h": torch.zeros(batch_size, self.hidden_size, device=device)}, batch_size=[batch_size])

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        if x.shape[1] == 1:  # acting: one step, no segments needed
            keep = (~is_init).to(x.dtype)
            y, h_n = self.rnn(x, (state["h"] * keep).unsqueeze(0))
            return y, TensorDict({"h": h_n[0]}, batch_size=state.batch_size)
        segments = Segments.from_is_init(is_init)
        y, h_n = segments.run(self.rnn, x, segments.initial(state["h"]))
        return segments.unpad(y), TensorDict({"h": segments.final(h_n)}, batch_size=state.batch_size)


@register_memory("lstm")
class LSTMMemory(MemorySystem):
    """Single-layer LSTM. State ``{"h": [B, H], "c": [B, H]}``, zero at episode start (segments as GRU)."""

    test_kwargs = {"hidden_size": 16}

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        hidden_size = check_int("lstm: hidden_size", hidden_size, low=1)
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.rnn = nn.LSTM(d_in, hidden_size, batch_first=True)

    def initial_state(self, batch_size, device=None):
        zeros = torch.zeros(batch_size, self.hidden_size, device=device)
        return TensorDict({"h": zeros, "c": zeros.clone()}, batch_size=[batch_size])

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        if x.shape[1] == 1:  # acting: one step, no segments needed
            keep = (~is_init).to(x.dtype)
            y, (h_n, c_n) = self.rnn(x, ((state["h"] * keep).unsqueeze(0), (state["c"] * keep).unsqueeze(0)))
            return y, TensorDict({"h": h_n[0], "c": c_n[0]}, batch_size=state.batch_size)
        segments = Segments.from_is_init(is_init)
        hx = (segments.initial(state["h"]), segments.initial(state["c"]))
        y, (h_n, c_n) = segments.run(self.rnn, x, hx)
        final = {"h": segments.final(h_n), "c": segments.final(c_n)}
        return segments.unpad(y), TensorDict(final, batch_size=state.batch_size)


@register_memory("mlp")
class MLPMemory(MemorySystem):
    """No memory at all: ``y_t = MLP(x_t)``. Its state is an empty TensorDict."""

    test_kwargs = {"hidden_size": 16}

    def __init__(self, d_in: int, hidden_size: int = 64):
        super().__init__()
        hidden_size = check_int("mlp: hidden_size", hidden_size, low=1)
        self.d_in, self.d_out, self.hidden_size = d_in, hidden_size, hidden_size
        self.net = nn.Sequential(nn.Linear(d_in, hidden_size), nn.Tanh())

    def initial_state(self, batch_size, device=None):
        return TensorDict({}, batch_size=[batch_size], device=device)

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        return self.net(x), state
