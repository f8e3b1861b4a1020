"""Infinity memory (the InfinityAgent's memory): Mamba backbone + DualTierMiras + gated fusion.

``b = Mamba(x)`` carries a compressed running summary; DualTierMiras reads and writes associations
keyed by ``b`` (fast tier every step, deep tier on surprise) and returns ``m``; a learned per-feature
gate mixes them: ``y = (1 - g) * b + g * m``, ``g = sigmoid(W [b; m])``.

State (flat keys, so the TorchRL state spec stays one level deep):
``mamba_conv: [B, L, d_inner, d_conv - 1]``, ``mamba_ssm: [B, L, d_inner, d_state]``,
``miras_fast, miras_deep, miras_deep_momentum: [B, n_heads, d_model / n_heads, mem_slots]``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.mamba import MambaMemory
from rlmem.memory.miras import DualTierMiras
from rlmem.memory.registry import register_memory

_PARTS = ("mamba", "miras")


@register_memory("infinity")
class InfinityMemory(MemorySystem):
    """``x: [B, T, d_in] -> y: [B, T, d_model]``; keyword arguments are those of the two parts.

    The defaults are sized for PPO on a CPU (a narrow backbone: ``expand=1``, ``d_state=8``): the cost of a
    training pass is dominated by the ``[B, T, d_inner, d_state]`` scan tensors and by the per-step ops of
    the DualTierMiras chunks (``chunk`` steps each in sequence mode; 1 = the exact step loop; see
    docs/memory.md).
    """

    trigger_path = "deep-tier write"
    # chunk=1: the contract's step == sequence check is exact (see DualTierMiras)
    test_kwargs = {"d_model": 16, "n_layers": 1, "d_state": 4, "d_conv": 3, "mem_slots": 8, "n_heads": 2, "chunk": 1}

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, d_state: int = 8, d_conv: int = 4,
                 expand: int = 1, dt_rank: int | None = None, mem_slots: int = 16, n_heads: int = 4,
                 surprise_threshold: float = 0.5, lr_fast: float = 0.5, lr_deep: float = 0.5, decay: float = 0.01,
                 momentum: float = 0.5, temperature: float = 0.1, chunk: int = 1):
        super().__init__()
        self.d_in, self.d_out, self.d_model = d_in, d_model, d_model
        self.mamba = MambaMemory(d_in, d_model=d_model, n_layers=n_layers, d_state=d_state, d_conv=d_conv,
                                 expand=expand, dt_rank=dt_rank)
        self.miras = DualTierMiras(d_model, d_model=d_model, mem_slots=mem_slots, n_heads=n_heads,
                                   surprise_threshold=surprise_threshold, lr_fast=lr_fast, lr_deep=lr_deep,
                                   decay=decay, momentum=momentum, temperature=temperature, chunk=chunk)
        self.fuse = nn.Linear(2 * d_model, d_model)

    def initial_state(self, batch_size, device=None):
        parts = {name: getattr(self, name).initial_state(batch_size, device) for name in _PARTS}
        return TensorDict({f"{name}_{k}": v for name, td in parts.items() for k, v in td.items()},
                          batch_size=[batch_size])

    def _part(self, state: TensorDict, name: str) -> TensorDict:
        prefix = name + "_"
        return TensorDict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                          batch_size=state.batch_size)

    def forward(self, x, state, is_init, trigger=None):
        """``trigger: [B, T]`` bool (None: all True) switches DualTierMiras' deep-tier write per row and step."""
        check_inputs(self, x, state, is_init)
        b, mamba_state = self.mamba(x, self._part(state, "mamba"), is_init)
        m, miras_state = self.miras(b, self._part(state, "miras"), is_init, trigger=trigger)
        g = torch.sigmoid(self.fuse(torch.cat([b, m], -1)))
        y = torch.lerp(b, m, g)
        next_state = {f"mamba_{k}": v for k, v in mamba_state.items()}
        next_state.update({f"miras_{k}": v for k, v in miras_state.items()})
        return y, TensorDict(next_state, batch_size=state.batch_size)
