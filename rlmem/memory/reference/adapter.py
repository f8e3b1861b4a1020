"""The ``adapter`` memory system (window mode), the slow and obvious way: every step runs the frozen LM
(through ``transformers``' own forward, with the memory reads placed by the adapter's hooks and LoRA by
``peft``) over its whole window of ``window`` tokens, and keeps the last position's hidden state.

:class:`rlmem.memory.adapter.AdapterMemory` computes the same numbers with exact rewrites
(:mod:`rlmem.adapters.fast`: each token's layer-0 norm and q/k/v computed once instead of once per window
slot, the last layer at the last position only, no ``transformers`` / ``peft`` plumbing per step).
:func:`forward` runs on the optimized module's own parameters and state; tests/test_adapter_fast.py
compares the two in float64. Not registered as a memory system::

    e_t = W_in x_t                        (slots before the episode start: the learned padding embedding p)
    y_t = LM([e_{t-window+1} .. e_t])[-1]  (the last position's hidden state after the final norm)

State: ``window: [B, window - 1, d_in]`` (the raw inputs of the last ``window - 1`` steps, oldest first,
zeros in slots older than the episode start) and ``valid: [B]`` (how many of them belong to the running
episode).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict


def windows(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor):
    """The LM inputs of every step: ``(windows [B, T, W, hidden], full inputs [B, W - 1 + T, d_in], start [B, T])``;
    ``start[b, t]`` is the first step of step t's episode on a time axis where the state's slots are
    ``-(W-1) .. -1``."""
    B, T, _ = x.shape
    W, dev = memory.window, x.device
    t = torch.arange(T, device=dev)
    last_reset = torch.where(is_init, t, -1).cummax(1).values  # [B, T]
    start = torch.where(last_reset >= 0, last_reset, -state["valid"].unsqueeze(1))
    full = torch.cat([state["window"], x], 1)  # [B, W - 1 + T, d_in]: time -(W-1) .. T-1
    emb = memory.embed(full)  # [B, W - 1 + T, hidden]
    win = emb.unfold(1, W, 1).transpose(-1, -2)  # [B, T, W, hidden]: window of step t is times t-W+1 .. t
    slot_time = t.unsqueeze(1) - (W - 1) + torch.arange(W, device=dev)  # [T, W]
    live = slot_time.unsqueeze(0) >= start.unsqueeze(-1)  # [B, T, W]
    return torch.where(live.unsqueeze(-1), win, memory.pad), full, start


def next_state(memory, full: torch.Tensor, start: torch.Tensor, state: TensorDict) -> TensorDict:
    """The last ``W - 1`` inputs, of which ``min(W - 1, T - start)`` belong to the running episode."""
    W, T = memory.window, full.shape[1] - (memory.window - 1)
    valid = (T - start[:, -1]).clamp(max=W - 1)
    keep = torch.arange(W - 1, device=full.device) >= (W - 1 - valid).unsqueeze(1)  # [B, W-1]
    window = full[:, T:] * keep.unsqueeze(-1).to(full.dtype)
    return TensorDict({"window": window, "valid": valid}, batch_size=state.batch_size)


def forward(memory, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDict]:
    """``AdapterMemory.forward`` in window mode through the ``transformers`` model: one LM batch of ``B * T``
    windows of ``W`` tokens, all positions of every layer computed, the last position kept."""
    B, T, _ = x.shape
    win, full, start = windows(memory, x, state, is_init)
    h = memory.lm.hidden_states(inputs_embeds=win.reshape(B * T, memory.window, memory.hidden))  # [B*T, W, hidden]
    y = h[:, -1].view(B, T, memory.hidden)
    return y, next_state(memory, full, start, state)
