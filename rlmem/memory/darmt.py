"""DARMT: ARMT + a coprocessor + a learned memory fusion, and Experiment 0's parameter-matched unified baseline.

DARMT (``darmt``, seed ``seeds/darmt_armt_coprocessor.md``) is :class:`~rlmem.memory.armt.ARMT` whose memory
tokens are recurrent state (ARMT's ``"mem"`` hook): state ``mem: [B, M, d_model]`` holds the tokens that the
running segment will append, the learned ARMT tokens at an episode start. When a row's segment closes, right
after ARMT's write into ``A, z``, the **coprocessor** deliberates and its latents change that row's tokens
for the next segment:

- :class:`Coprocessor`: ``num_latents`` learned latent queries pass through ``n_coproc_layers`` transformer
  layers (ARMT's ``WindowLayer``, same residual kind and width). Before coprocessor layer j the latents
  read ARMT's associative memory of layer ``min(j, n_layers - 1)`` as it is *after* the write (ARMT's read:
  ``h <- h + memories[l].read(h, A_l, z_l)``); in layer j they attend, unmasked, to the closing segment's
  memory-token outputs (ARMT's last layer, the values it just wrote) and to themselves.
- :class:`MemoryFusionLayer` (``use_learned_fusion=True``): the latents cross-attend to the tokens, are
  pooled, and a gate blends the pooled vector into every token, then FFN + LayerNorm with a residual. The
  number of tokens stays ``M``; the fused tokens feed the next fusion, so the tokens evolve with the episode.
- ``use_learned_fusion=False`` is the seed's naive concatenation, kept so its reported failure (worse
  recall than the unified model) can be reproduced: every segment carries ``M + num_latents`` memory
  tokens, all of which write the memory; the first ``M`` are always the learned tokens, the last
  ``num_latents`` are the latest latents (at an episode start, before any latents exist: ``num_latents``
  more learned tokens). The seed grew the memory by ``num_latents`` each time; a recurrent state needs a
  fixed shape, so the newest latents replace the previous ones.

The coprocessor is the expensive path that triggers gate: ``forward(x, state, is_init, trigger=None)``
takes an optional ``trigger: [B, T]`` bool; a row whose segment closes at step t runs the coprocessor iff
``trigger[b, t]`` (None: always). Otherwise its tokens are kept as they are (no fusion; in the naive variant
the previous latents stay). The coprocessor runs once per closing step (step mode) or closing round
(sequence mode) on the chosen rows only, and not at all when no row chooses it; sequence mode also skips
the chains whose new tokens nothing reads (an episode that ends before another segment of it closes,
unless it is its row's last: its tokens are the next state), which is most chains in PPO's replay of short
episodes. Step mode equals sequence
mode, which stays round-parallel (ARMT's rounds; the coprocessor runs inside the round).

``freeze_armt=True`` sets ``requires_grad=False`` on ARMT's own parameters (embedding, memory tokens, in
the naive variant including the latent slots' initial values, layers, associative memories, final norm);
the coprocessor and the fusion train.

ARMT's ``W_v`` starts at zero, so an untrained DARMT reads nothing from its memory and its outputs do not
depend on the tokens yet; the coprocessor receives gradients once the memory is live.

``armt_unified`` (:class:`ARMTUnified`) is the "unified" model of Experiment 0 (A: ARMT, B: unified,
C: DARMT): a plain ARMT made deeper and wider until its parameter count matches DARMT's with the same
knobs (rule in :meth:`ARMTUnified.matched_size`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlmem.validate import check_int
from rlmem.memory.armt import ARMT
from rlmem.memory.base import check_inputs
from rlmem.memory.registry import register_memory
from rlmem.memory.transformer import WindowLayer


class MemoryFusionLayer(nn.Module):
    """Gated fusion of latents into memory tokens; the memory keeps its size.

    ``memory: [B, M, d]``, ``latents: [B, N, d]`` -> ``[B, M, d]``::

        a      = latents + MHA(q=LN(latents), k=v=LN(memory))       # latents cross-attend to the memory
        fused  = mean_N(a), broadcast to [B, M, d]                    # pooled
        g      = sigmoid(W_g [memory; fused])                         # [B, M, d], per token and feature
        m      = g * fused + (1 - g) * memory                         # gated blend
        out    = LN(m + FFN(m))                                       # FFN, residual, LayerNorm

    The residual in ``a`` carries the latents' own content into the pool (the attention alone would pool
    only a weighted mean of the memory). ``d_ff`` (None: ``2 d``) is the FFN's hidden width.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None):
        super().__init__()
        self.norm_latents, self.norm_memory = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.gate = nn.Linear(2 * d_model, d_model)
        d_ff = 2 * d_model if d_ff is None else d_ff
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, memory: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        a = latents + self.cross_attention(self.norm_latents(latents), self.norm_memory(memory))
        fused = a.mean(1, keepdim=True).expand_as(memory)
        g = torch.sigmoid(self.gate(torch.cat([memory, fused], -1)))
        m = g * fused + (1 - g) * memory
        return self.norm(m + self.ff(m))

    def cross_attention(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``self.attn(q, kv, kv)`` on its own weights, without ``nn.MultiheadAttention``'s per-call checks
        (most of its cost at a few tokens): ``q: [B, N, d]``, ``kv: [B, M, d]`` -> ``[B, N, d]``."""
        attn = self.attn
        B, N, d = q.shape
        H = attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(q, w[:d], b[:d]).view(B, N, H, d // H).transpose(1, 2)
        k, v = F.linear(kv, w[d:], b[d:]).view(B, -1, 2, H, d // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d / H]
        return attn.out_proj(out.transpose(1, 2).reshape(B, N, d))


class Coprocessor(nn.Module):
    """``num_latents`` learned latent queries through ``n_layers`` transformer layers that read a memory.

    ``forward(context, reads)``: ``context: [B, C, d]`` (the closing segment's memory-token outputs) and one
    read per layer (``h: [B, N, d] -> [B, N, d]``, added before the layer as ARMT adds its reads) ->
    latents ``[B, N, d]`` (LayerNorm-ed). Layer j's latents attend without a mask to ``[context; latents]``;
    WindowLayer's relative-position bias is indexed by the key's slot (a learned per-head bias per context
    token and per latent), since "distance" means nothing here.
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, num_latents: int, n_context: int, d_ff: int,
                 gate_bias: float, residual: str):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, d_model) / d_model**0.5)
        self.n_keys = n_context + num_latents
        self.layers = nn.ModuleList(WindowLayer(d_model, n_heads, self.n_keys - 1, d_ff, gate_bias, residual)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, context: torch.Tensor, reads) -> torch.Tensor:
        B, N = context.shape[0], self.latents.shape[0]
        h = self.latents.expand(B, N, -1)
        slots = torch.arange(self.n_keys, device=context.device).expand(N, -1)
        for layer, read in zip(self.layers, reads, strict=True):
            h = h + read(h)
            h = layer(h, torch.cat([context, h], 1), None, slots)  # None: every key visible
        return self.norm(h)


@register_memory("darmt")
class DARMT(ARMT):
    """ARMT + coprocessor + memory fusion (module docstring). ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    Args (ARMT's, see :class:`~rlmem.memory.armt.ARMT`, plus):
        n_coproc_layers: coprocessor layers (>= 1); layer j reads ARMT layer ``min(j, n_layers - 1)``.
        num_latents: latent queries of the coprocessor (>= 1).
        use_learned_fusion: True: :class:`MemoryFusionLayer` (``M`` tokens); False: the naive variant
            (``M + num_latents`` tokens per segment, the latents among them).
        freeze_armt: ARMT's own parameters get ``requires_grad=False``.

    State: ARMT's (``A, z, cache, pos``) plus ``mem: [B, M', d_model]`` (``M' = num_mem_tokens``, naive:
    ``num_mem_tokens + num_latents``), the memory tokens of the running segment.
    ``forward(x, state, is_init, trigger=None)``: ``trigger: [B, T]`` bool gates the coprocessor per row and
    step (read where a segment closes).
    """

    trigger_path = "coprocessor"
    test_kwargs = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_mem": 4, "segment_len": 3, "num_mem_tokens": 2,
                   "n_coproc_layers": 2, "num_latents": 2}

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, n_heads: int = 4, d_mem: int = 16,
                 segment_len: int = 8, num_mem_tokens: int = 4, d_ff: int | None = None, eps: float = 1e-5,
                 gate_bias: float = 2.0, residual: str = "gated", correction: bool = False, rule: str = "armt",
                 n_coproc_layers: int = 1, num_latents: int = 4, use_learned_fusion: bool = True,
                 freeze_armt: bool = False):
        name = self.registry_name
        num_mem_tokens = check_int(f"{name}: num_mem_tokens", num_mem_tokens, low=1)
        n_coproc_layers = check_int(f"{name}: n_coproc_layers", n_coproc_layers, low=1)
        num_latents = check_int(f"{name}: num_latents", num_latents, low=1)
        for knob, value in (("use_learned_fusion", use_learned_fusion), ("freeze_armt", freeze_armt)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {knob} must be true or false, got {value!r}")
        n_tokens = num_mem_tokens + (0 if use_learned_fusion else num_latents)  # tokens per segment
        super().__init__(d_in, d_model, n_layers, n_heads, d_mem, segment_len, n_tokens, d_ff, eps, gate_bias,
                         residual, correction, rule)
        if freeze_armt:
            self.requires_grad_(False)  # only ARMT's parameters exist so far
        self.n_coproc_layers, self.num_latents = n_coproc_layers, num_latents
        self.use_learned_fusion, self.freeze_armt = use_learned_fusion, freeze_armt
        self.coprocessor = Coprocessor(d_model, n_heads, n_coproc_layers, num_latents, n_tokens, self.d_ff,
                                       self.gate_bias, self.residual)
        self.fusion = MemoryFusionLayer(d_model, n_heads, self.d_ff) if use_learned_fusion else None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_coproc_layers={self.n_coproc_layers}, num_latents={self.num_latents}, "
                f"use_learned_fusion={self.use_learned_fusion}, freeze_armt={self.freeze_armt}")

    def initial_state(self, batch_size, device=None):
        state = super().initial_state(batch_size, device)
        state["mem"] = self.mem_tokens.to(device).expand(batch_size, -1, -1).clone()  # learned: has gradients
        return state

    def forward(self, x, state, is_init, trigger=None):
        """``trigger``: ``[B, T]`` bool or None (always) switches the coprocessor per row at the steps that
        close a segment."""
        check_inputs(self, x, state, is_init)
        if trigger is not None and (trigger.dtype != torch.bool or trigger.shape != is_init.shape):
            raise ValueError(f"{self.registry_name}: trigger must be a bool tensor of shape [B, T]="
                             f"{list(is_init.shape)} or None, got {trigger.dtype} {list(trigger.shape)}")
        if x.shape[1] == 1:
            return self._step(x, state, is_init[:, 0], None if trigger is None else trigger[:, 0])
        return self._sequence(x, state, is_init, trigger)

    def _next_tokens(self, tokens, out, A, z, rows, n_rows):
        """ARMT's hook: the coprocessor (and fusion) for the ``rows`` only; the other rows keep their tokens."""
        if n_rows == rows.shape[0]:
            return self.deliberate(tokens, out, A, z)
        idx = rows.nonzero().squeeze(1)
        new = self.deliberate(tokens[idx], out[idx], [a[idx] for a in A], [b[idx] for b in z])
        return tokens.index_put((idx,), new)

    def deliberate(self, tokens: torch.Tensor, out: torch.Tensor, A: list[torch.Tensor],
                   z: list[torch.Tensor]) -> torch.Tensor:
        """The expensive path, one call: ``tokens: [n, M', d]`` of the closed segment, ``out: [n, M', d]`` their
        outputs, ``A``/``z`` per ARMT layer after the write -> the next segment's tokens ``[n, M', d]``."""
        last = self.n_layers - 1
        reads = [lambda h, i=min(j, last): self.memories[i].read(h, A[i], z[i]) for j in range(self.n_coproc_layers)]
        latents = self.coprocessor(out, reads)
        if self.fusion is None:  # naive: the first M tokens stay the learned ones, the latents follow them
            return torch.cat([tokens[:, : -self.num_latents], latents], 1)
        return self.fusion(tokens, latents)


@register_memory("armt_unified")
class ARMTUnified(ARMT):
    """Experiment 0's unified baseline: a plain ARMT with DARMT's parameter count (0.1% off at the configs' sizes).

    Takes DARMT's knobs, so one config switches between the two; the coprocessor knobs only set the target
    size (:meth:`matched_size`). ``freeze_armt`` must be false (the whole model is ARMT). Forward and state
    are ARMT's. ``self.target_params`` is the DARMT count it matches.
    """

    test_kwargs = DARMT.test_kwargs

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, n_heads: int = 4, d_mem: int = 16,
                 segment_len: int = 8, num_mem_tokens: int = 4, d_ff: int | None = None, eps: float = 1e-5,
                 gate_bias: float = 2.0, residual: str = "gated", correction: bool = False, rule: str = "armt",
                 n_coproc_layers: int = 1, num_latents: int = 4, use_learned_fusion: bool = True,
                 freeze_armt: bool = False):
        name = self.registry_name
        if freeze_armt is not False:
            raise ValueError(f"{name}: freeze_armt must be false (the unified model is all ARMT: true would freeze "
                             f"every parameter), got {freeze_armt!r}")
        armt = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "d_mem": d_mem,
                "segment_len": segment_len, "num_mem_tokens": num_mem_tokens, "d_ff": d_ff, "eps": eps,
                "gate_bias": gate_bias, "residual": residual, "correction": correction,
                "rule": rule}
        try:  # DARMT checks every knob; its messages are re-labelled with this system's name
            target = parameter_count(DARMT, d_in, **armt, n_coproc_layers=n_coproc_layers, num_latents=num_latents,
                                     use_learned_fusion=use_learned_fusion)
        except ValueError as err:
            raise ValueError(str(err).replace(f"{DARMT.registry_name}: ", f"{name}: ", 1)) from None
        armt["n_layers"], armt["d_ff"] = self.matched_size(d_in, armt, target)
        super().__init__(d_in, **armt)
        self.target_params = target

    @staticmethod
    def matched_size(d_in: int, armt: dict, target: int) -> tuple[int, int]:
        """``(n_layers, d_ff)`` of an ARMT (knobs ``armt``) with about ``target`` parameters.

        Deeper first: add whole layers (each with its associative memory) while the count stays at most
        ``target``; then widen every layer's FFN (``d_ff`` adds ``2 d_model + 1`` parameters per unit and
        layer) by the rounded rest. The result is within ``n_layers (2 d_model + 1) / 2`` of ``target``.
        """
        d = armt["d_model"]
        d_ff = 2 * d if armt["d_ff"] is None else armt["d_ff"]
        base = parameter_count(ARMT, d_in, **{**armt, "d_ff": d_ff})
        per_layer = parameter_count(ARMT, d_in, **{**armt, "d_ff": d_ff, "n_layers": armt["n_layers"] + 1}) - base
        extra_layers = max(0, (target - base) // per_layer)
        n_layers = armt["n_layers"] + extra_layers
        rest = target - base - extra_layers * per_layer
        return n_layers, d_ff + max(0, round(rest / (n_layers * (2 * d + 1))))


def parameter_count(cls: type[ARMT], d_in: int, **kwargs) -> int:
    """Number of parameters of ``cls(d_in, **kwargs)``, built on the meta device (no memory, no RNG draws)."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(d_in, **kwargs).parameters())
