"""The memory bank: ``N`` learned tokens, full or factorized, and its int8 form for inference.

A bank is read through :meth:`MemoryBank.tokens` (``[N, d_mem]``), so a read never needs to know whether
the bank is full (one ``[N, d_mem]`` parameter), factorized (``U V``, ``U: [N, r]``, ``V: [r, d_mem]``) or
quantized (:class:`Int8Bank`: the same factors stored as int8 with one float scale per row).
"""

from __future__ import annotations

import torch
from torch import nn


class MemoryBank(nn.Module):
    """``N`` learned memory tokens of width ``d_mem``; ``rank`` (optional) factorizes them as ``U V``."""

    def __init__(self, num_tokens: int, d_mem: int, rank: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.num_tokens, self.d_mem, self.rank = num_tokens, d_mem, rank
        if rank is None:
            self.weight = nn.Parameter(torch.randn(num_tokens, d_mem) * init_std)
        else:
            # U V has entries of std init_std when U ~ N(0, 1) and V ~ N(0, init_std^2 / r)
            self.u = nn.Parameter(torch.randn(num_tokens, rank))
            self.v = nn.Parameter(torch.randn(rank, d_mem) * init_std / rank**0.5)

    def factors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``weight``, or ``u`` and ``v``)."""
        return {"weight": self.weight} if self.rank is None else {"u": self.u, "v": self.v}

    def tokens(self) -> torch.Tensor:
        """``[N, d_mem]``."""
        return self.weight if self.rank is None else self.u @ self.v

    def extra_repr(self) -> str:
        low = "" if self.rank is None else f", rank={self.rank}"
        return f"num_tokens={self.num_tokens}, d_mem={self.d_mem}{low}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``x: [R, D] -> (q: int8 [R, D], scale: [R, 1])`` with
    ``x ~= q * scale``, ``scale = max |row| / 127``; every entry is off by at most ``scale / 2``."""
    scale = x.detach().abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(x.detach() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Bank(nn.Module):
    """A :class:`MemoryBank` stored as int8 (inference only: buffers, no gradients).

    Each stored tensor (``weight``, or the factors ``u`` and ``v``) becomes ``<name>_q`` (int8) and
    ``<name>_scale`` (float, one per row); :meth:`tokens` dequantizes and, for a factorized bank,
    multiplies the factors back.
    """

    def __init__(self, bank: MemoryBank):
        super().__init__()
        self.num_tokens, self.d_mem, self.rank = bank.num_tokens, bank.d_mem, bank.rank
        self.dtype = next(iter(bank.factors().values())).dtype
        for name, value in bank.factors().items():
            q, scale = quantize_rows(value)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def _get(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_q").to(self.dtype) * getattr(self, f"{name}_scale")

    def tokens(self) -> torch.Tensor:
        """``[N, d_mem]``, dequantized."""
        return self._get("weight") if self.rank is None else self._get("u") @ self._get("v")

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        low = "" if self.rank is None else f", rank={self.rank}"
        return f"num_tokens={self.num_tokens}, d_mem={self.d_mem}{low}, int8"


def bank_nbytes(bank: nn.Module) -> int:
    """Bytes the bank's stored tensors take (parameters or int8 buffers and their scales)."""
    if isinstance(bank, Int8Bank):
        return bank.nbytes()
    return sum(p.numel() * p.element_size() for p in bank.parameters())
