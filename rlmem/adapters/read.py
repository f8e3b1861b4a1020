"""One layer's read of a memory bank: cross-attention from the hidden states to the bank's tokens, with
optional routing over chapters of the bank, and variant B's extra MLP.

Without chapters, for hidden states ``h: [B, T, D]`` and bank tokens ``M: [N, d_mem]``::

    q = W_q LN(h),  k = W_k M,  v = W_v M,   read = W_o softmax(q k^T / sqrt(d_head)) v      (per head)

``W_o`` starts at zero, so an untrained read adds exactly nothing and the adapted model computes the base
model's numbers; its first gradient is non-zero (``h`` and the attention output are), and ``W_q``, ``W_k``,
``W_v`` and the bank receive gradients once ``W_o`` has moved.

With ``C`` chapters (the bank cut into ``C`` consecutive blocks of ``N / C`` tokens), a router
``softmax(W_r pooled)`` over chapters picks the ``top_k`` most probable ones per routing decision; each picked
chapter is read on its own (softmax within the chapter) and the reads are mixed with the picked
probabilities renormalized to sum 1, so the router gets gradients from the task. Only the picked chapters'
keys and values are gathered. Decisions are made once per sequence (``"sequence"``: from the mean of the
sequence's hidden states) or per position (``"rolling"``: the mean over the last ``window`` positions;
``"token"``: the position itself). The router's auxiliary losses (per read, over its decisions):

- load balance (Switch Transformer): ``C * sum_c f_c P_c``, ``f_c`` the fraction of picks going to chapter
  ``c`` (picks / k), ``P_c`` the mean router probability of ``c``; 1 when both are uniform;
- z loss (ST-MoE): the mean of ``logsumexp(router logits)^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlmem.adapters.config import MemoryAdapterConfig


def pooled(x: torch.Tensor, mode: str, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Router inputs. ``x: [B, T, D]``, ``mask: [B, T]`` (True at real tokens, None: all) ->
    ``[B, 1, D]`` (``"sequence"``) or ``[B, T, D]`` (``"rolling"``, ``"token"``)."""
    if mode == "token":
        return x
    m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    xm = x * m.unsqueeze(-1)
    if mode == "sequence":
        return xm.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1).unsqueeze(-1)
    # rolling: sum over positions t - window + 1 .. t as a difference of prefix sums
    T = x.shape[1]
    sums = F.pad(xm.cumsum(1), (0, 0, 1, 0))  # [B, T + 1, D]
    counts = F.pad(m.cumsum(1), (1, 0))  # [B, T + 1]
    start = (torch.arange(T, device=x.device) + 1 - window).clamp(min=0)
    total = sums[:, 1:] - sums[:, start]
    return total / (counts[:, 1:] - counts[:, start]).clamp(min=1).unsqueeze(-1)


class MemoryRead(nn.Module):
    """Cross-attention of one layer's hidden states into a bank. ``h: [B, T, hidden] -> [B, T, hidden]``."""

    def __init__(self, hidden: int, d_mem: int, cfg: MemoryAdapterConfig):
        super().__init__()
        attn_dim = cfg.attn_dim or hidden
        if attn_dim % cfg.num_heads:
            raise ValueError(f"the memory read's width {attn_dim} (attn_dim, or the hidden size) must be divisible "
                             f"by num_heads ({cfg.num_heads})")
        self.num_heads, self.head_dim = cfg.num_heads, attn_dim // cfg.num_heads
        self.num_chapters, self.top_k, self.chapter_size = cfg.num_chapters, cfg.top_k_chapters, cfg.chapter_size
        self.routing_window = cfg.routing_window
        self.norm = nn.LayerNorm(hidden)
        self.w_q = nn.Linear(hidden, attn_dim, bias=False)
        self.w_k = nn.Linear(d_mem, attn_dim, bias=False)
        self.w_v = nn.Linear(d_mem, attn_dim, bias=False)
        self.w_o = nn.Linear(attn_dim, hidden, bias=False)
        nn.init.zeros_(self.w_o.weight)  # the read starts silent: the adapted model starts as the base model
        self.router = nn.Linear(hidden, cfg.num_chapters) if cfg.num_chapters > 1 else None
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=0.02)
            nn.init.zeros_(self.router.bias)

    def forward(self, h: torch.Tensor, bank: torch.Tensor, routing: str = "sequence",
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``h: [B, T, hidden]``, ``bank: [N, d_mem]``, ``mask: [B, T]`` (real tokens; used by the router's
        pooling and losses) -> ``(read: [B, T, hidden], router info or None)``."""
        B, T, _ = h.shape
        H, dh = self.num_heads, self.head_dim
        x = self.norm(h)
        q = self.w_q(x).view(B, T, H, dh) * dh**-0.5
        if self.router is None:
            k = self.w_k(bank).view(-1, H, dh)
            v = self.w_v(bank).view(-1, H, dh)
            attn = torch.einsum("bthd,nhd->bthn", q, k).softmax(-1)
            out = torch.einsum("bthn,nhd->bthd", attn, v)
            return self.w_o(out.reshape(B, T, H * dh)), None
        C, n, K = self.num_chapters, self.chapter_size, self.top_k
        logits = self.router(pooled(x, routing, self.routing_window, mask))  # [B, U, C], U = 1 or T
        probs = logits.softmax(-1)
        top_p, idx = probs.topk(K, dim=-1)  # [B, U, K]
        gate = top_p / top_p.sum(-1, keepdim=True)
        k = self.w_k(bank).view(C, n, H, dh)[idx]  # [B, U, K, n, H, dh]: only the picked chapters
        v = self.w_v(bank).view(C, n, H, dh)[idx]
        if logits.shape[1] == 1:  # one decision per sequence
            attn = torch.einsum("bthd,bknhd->bthkn", q, k[:, 0]).softmax(-1)
            out = torch.einsum("bthkn,bknhd->bthkd", attn, v[:, 0])
            out = torch.einsum("bthkd,bk->bthd", out, gate[:, 0])
        else:
            attn = torch.einsum("bthd,btknhd->bthkn", q, k).softmax(-1)
            out = torch.einsum("bthkn,btknhd->bthkd", attn, v)
            out = torch.einsum("bthkd,btk->bthd", out, gate)
        return self.w_o(out.reshape(B, T, H * dh)), {"logits": logits, "probs": probs, "idx": idx,
                                                      "mask": None if logits.shape[1] == 1 else mask}


def bank_attention(read: MemoryRead, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A router-less read's bank side folded into two matrices, for reading many positions at once
    (:func:`read_folded`): ``(qk: [hidden, H * N], vo: [H * N, hidden])``, with
    ``qk[:, h, n] = W_q[h]^T k_n[h] / sqrt(d_head)`` and ``vo[h, n] = W_o[:, h] v_n[h]``.

    The same numbers as :meth:`MemoryRead.forward` (reassociated products): per position two matmuls of
    the hidden width instead of ``W_q``, a per-head batched matmul each way and ``W_o``."""
    H, dh = read.num_heads, read.head_dim
    k = read.w_k(bank).view(-1, H, dh)  # [N, H, dh]
    v = read.w_v(bank).view(-1, H, dh)
    w_q = read.w_q.weight.view(H, dh, -1)  # [H, dh, hidden]
    w_o = read.w_o.weight.view(-1, H, dh)  # [hidden, H, dh]
    qk = torch.einsum("hed,nhe->dhn", w_q, k * dh**-0.5).flatten(1)
    vo = torch.einsum("nhe,dhe->hnd", v, w_o).flatten(0, 1)
    return qk, vo


def read_folded(read: MemoryRead, h: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:meth:`MemoryRead.forward` of a router-less read with its bank side folded by :func:`bank_attention`:
    ``h: [..., hidden] -> [..., hidden]``."""
    qk, vo = folded
    logits = read.norm(h) @ qk  # [..., H * N]
    attn = logits.unflatten(-1, (read.num_heads, -1)).softmax(-1)
    return attn.flatten(-2) @ vo


def router_losses(info: dict[str, torch.Tensor], num_chapters: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(load_balance, z_loss)`` of one read's routing decisions (``info`` from :meth:`MemoryRead.forward`)."""
    logits, probs, idx, mask = info["logits"], info["probs"], info["idx"], info["mask"]
    w = torch.ones(logits.shape[:2], dtype=logits.dtype, device=logits.device) if mask is None \
        else mask.to(logits.dtype)  # [B, U]: decisions at padding do not count
    total = w.sum().clamp(min=1)
    picks = F.one_hot(idx, num_chapters).to(logits.dtype).sum(-2) / top_k  # [B, U, C]
    f = (picks * w.unsqueeze(-1)).sum((0, 1)) / total
    p = (probs * w.unsqueeze(-1)).sum((0, 1)) / total
    load_balance = num_chapters * (f * p).sum()
    z_loss = (torch.logsumexp(logits, -1).pow(2) * w).sum() / total
    return load_balance, z_loss


class ExtraMLP(nn.Module):
    """Variant B's MLP after the memory read: ``h -> h + W_2 gelu(W_1 LN(h))``, ``W_2`` zero at the start."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))
