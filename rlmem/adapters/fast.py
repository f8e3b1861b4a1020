"""The decoder stack of a memory-adapted LLaMA or GPT-2, written out for the ``adapter`` memory system.

:class:`rlmem.memory.adapter.AdapterMemory` runs the frozen LM over one window of ``W`` tokens per step.
Going through ``transformers``' forward (with the adapter's hooks and ``peft``'s LoRA layers) computes
every layer at every position of every window; the functions here compute the same numbers with less
work, on the same modules and weights (nothing is copied, so gradients reach the same parameters):

- **window mode** (:func:`window_hidden`, exact):
    - the last layer is computed at the last position only (its keys/values at every position): the only
      position the memory system reads. Used when that layer's memory read has no chapter router (a
      router's decisions and losses would cover the other positions too); otherwise the last layer runs
      at every position;
    - LLaMA-style (rotary) models: layer 0's input norm and q/k/v projections (with LoRA) are computed
      once per *token* (``W - 1 + T`` per row) instead of once per window slot (``W T``) and gathered into
      the windows; rotary is applied after the projection, with the slot's position, so this is exact.
      GPT-2 adds its absolute position embedding to the input before layer 0, so there the projections
      depend on the slot and are computed per slot;
    - the attention, norms, LoRA and memory reads are called directly (no ``transformers`` masks or
      caches, no hooks, no ``peft`` dispatch).
- **streaming mode** (:func:`stream_hidden`, a different model): each token is computed once per layer
  when it arrives; every layer attends from it to its own cached keys/values of the previous ``W - 1``
  tokens (kept in the recurrent state), as a causal LM with a KV cache does. See :func:`stream_hidden` for
  when it equals window mode.

Only LLaMA (``model_type="llama"``) and GPT-2 are written out (:func:`supported`); other models use the
``transformers`` forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlmem.adapters.read import bank_attention, read_folded
from rlmem.causal_lm import decoder_layers


def supported(lm) -> str | None:
    """``"llama"`` or ``"gpt2"`` when :func:`window_hidden` / :func:`stream_hidden` can run ``lm`` (a
    :class:`~rlmem.adapters.MemoryAdaptedLM`), else None."""
    config = lm.model.config
    kind = getattr(config, "model_type", None)
    if kind == "llama":
        return kind
    if kind == "gpt2" and not getattr(config, "scale_attn_by_inverse_layer_idx", False) \
            and not getattr(config, "add_cross_attention", False):
        return kind
    return None


def _lin(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a linear layer, computing a ``peft`` LoRA layer's ``base(x) + s B A drop(x)``
    directly (what its forward does when the adapters are active, unmerged and not DoRA)."""
    base = getattr(module, "base_layer", None)
    if base is None or module.merged or module.disable_adapters or any(module.use_dora.get(a, False)
                                                                       for a in module.active_adapters):
        return module(x)
    y = base(x)
    for a in module.active_adapters:
        if a in module.lora_A:
            y = y + module.lora_B[a](module.lora_A[a](module.lora_dropout[a](x))) * module.scaling[a]
    return y


class Stack:
    """The per-layer pieces of a supported model, looked up once per forward."""

    def __init__(self, lm):
        self.lm, self.kind = lm, supported(lm)
        model = lm.model
        self.layers = decoder_layers(model)
        self.adapter = lm.adapter
        self.sites = {} if self.adapter is None else {i: s for s, i in enumerate(self.adapter.layer_indices)}
        self.folded = {}  # site -> its read's bank side (read.bank_attention), computed once per forward
        config = model.config
        self.n_heads = int(config.num_attention_heads)
        if self.kind == "llama":
            self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
            self.n_kv = int(config.num_key_value_heads)
            self.final_norm = model.model.norm
            self.rotary = model.model.rotary_emb
        else:
            self.head_dim = int(config.hidden_size) // self.n_heads
            self.n_kv = self.n_heads
            self.final_norm = model.transformer.ln_f
            self.wpe = model.transformer.wpe
            self.rotary = None

    # -- pieces -----------------------------------------------------------------------------------------

    def qkv(self, i: int, x: torch.Tensor, last_q: bool = False, q_rows: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s q/k/v (no rotary): ``x: [..., W, D] -> ([..., W, H, dh], [..., W, Hkv, dh] x 2)``;
        ``last_q``: LLaMA's q at the last position only (``[..., 1, H, dh]``; GPT-2 fuses q/k/v: all);
        ``q_rows``: ``x: [R, D]``, q at these rows only (``[len(q_rows), H, dh]``)."""
        layer, dh = self.layers[i], self.head_dim
        if self.kind == "llama":
            attn = layer.self_attn
            xn = layer.input_layernorm(x)
            q = _lin(attn.q_proj, xn[..., -1:, :] if last_q else xn if q_rows is None else xn.index_select(0, q_rows))
            k, v = _lin(attn.k_proj, xn), _lin(attn.v_proj, xn)
        else:
            xn = layer.ln_1(x)
            q, k, v = _lin(layer.attn.c_attn, xn).split(self.n_heads * dh, dim=-1)
            if q_rows is not None:
                q = q.index_select(0, q_rows)
        return q.unflatten(-1, (-1, dh)), k.unflatten(-1, (-1, dh)), v.unflatten(-1, (-1, dh))

    def rope(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin of positions ``0 .. n-1``: ``[n, 1, dh]`` each (None without rotary)."""
        if self.rotary is None:
            return None
        pos = torch.arange(n, device=like.device).unsqueeze(0)
        cos, sin = self.rotary(like, pos)
        return cos[0].unsqueeze(-2), sin[0].unsqueeze(-2)

    @staticmethod
    def rotate(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """LLaMA's rotary ``x * cos + rotate_half(x) * sin`` at the positions of ``cs`` (``[P, 1, dh]`` each):
        ``x: [..., P, heads, dh]`` (P = 1: the same position everywhere).

        Written as one matmul per position with the rotation matrix of that position (``x @ R_p``, R_p
        holding the same cos/sin entries): on CPU one batched matmul is cheaper than the five elementwise
        passes (and their backward) over a window-sized tensor; the same numbers up to rounding of the sums
        (the other terms are exact zeros)."""
        if cs is None:
            return x
        return torch.einsum("...phe,ped->...phd", x, Stack.rotation(cs, x.dtype))

    @staticmethod
    def rotation(cs: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The matrices of :meth:`rotate`: ``[P, dh, dh]`` (``x @ R_p``)."""
        cos, sin = cs[0][:, 0], cs[1][:, 0]  # [P, dh]
        dh = cos.shape[1]
        half = dh // 2
        sign = torch.ones(dh, dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
        # R[p, e, d]: out[d] = x[d] cos[d] + x[(d + half) % dh] sin[d] sign[d]
        eye = torch.eye(dh, dtype=cos.dtype, device=cos.device)
        rot = torch.diag_embed(cos) + eye.roll(half, 0) * (sin * sign).unsqueeze(1)  # [P, dh, dh]
        return rot.to(dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """``q: [N, Tq, H, dh]``, ``k, v: [N, Tk, Hkv, dh]`` -> ``[N, Tq, H * dh]`` (scaled dot product)."""
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=-2)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=-2)
        # heads-major contiguous copies: the CPU kernel is slower (forward and backward) on the gathered and
        # rotated layouts than the copies cost
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale(q))
        return out.transpose(1, 2).flatten(-2)

    def scale(self, q: torch.Tensor) -> float:
        layer = self.layers[0]
        return float(layer.self_attn.scaling if self.kind == "llama" else layer.attn.scaling)

    def finish(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of layer ``i`` after its attention's heads: output projection, memory read, MLP.
        ``h``: the layer's input (at the positions computed), ``attn_out: [..., H * dh]``."""
        layer, site = self.layers[i], self.sites.get(i)
        variant_a = site is not None and self.adapter.cfg.variant == "A"
        if self.kind == "llama":
            a = _lin(layer.self_attn.o_proj, attn_out)
            if variant_a:
                a = a + self.read(site, h + a)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        else:
            a = layer.attn.resid_dropout(_lin(layer.attn.c_proj, attn_out))
            if variant_a:
                a = a + self.read(site, h + a)
            h = h + a
            h = h + layer.mlp(layer.ln_2(h))
        if site is not None and self.adapter.cfg.variant == "B":
            h = h + self.read(site, h)
            h = self.adapter.mlps[site](h)
        return h

    def read(self, site: int, h: torch.Tensor) -> torch.Tensor:
        """The adapter's read at ``site``; a read without a router with its bank side folded once per
        forward (:func:`rlmem.adapters.read.bank_attention`)."""
        read = self.adapter.reads[site]
        if read.router is not None:
            return self.adapter.read(site, h)
        if site not in self.folded:
            bank = self.adapter.banks[self.adapter.bank_index[site]].tokens().to(h.dtype)
            self.folded[site] = bank_attention(read, bank)
        return read_folded(read, h, self.folded[site])

    def routed(self) -> bool:
        """Whether any memory read has a chapter router (its decisions pool over a window's positions)."""
        return self.adapter is not None and any(r.router is not None for r in self.adapter.reads)

    def last_only(self) -> bool:
        """Whether the last layer may be computed at the last position only: its read (if any) has no
        chapter router, whose decisions and losses would cover every position."""
        site = self.sites.get(len(self.layers) - 1)
        return site is None or self.adapter.reads[site].router is None

    def full_layer(self, i: int, h: torch.Tensor, cs, qkv=None, keep_kv: bool = False):
        """Layer ``i`` at every position of ``h: [N, W, D]`` (causal). ``qkv``: precomputed unrotated
        q/k/v. Returns ``h`` (and the unrotated k, v with ``keep_kv``)."""
        q, k, v = self.qkv(i, h) if qkv is None else qkv
        out = self.attend(self.rotate(q, cs), self.rotate(k, cs), v, causal=True)
        h = self.finish(i, h, out)
        return (h, k, v) if keep_kv else h

    def last_layer(self, i: int, h: torch.Tensor, cs, qkv=None) -> torch.Tensor:
        """Layer ``i`` at the last position of ``h: [N, W, D]`` only -> ``[N, 1, D]``."""
        q, k, v = self.qkv(i, h, last_q=True) if qkv is None else qkv
        last = None if cs is None else (cs[0][-1:], cs[1][-1:])
        out = self.attend(self.rotate(q[:, -1:], last), self.rotate(k, cs), v, causal=False)
        return self.finish(i, h[:, -1:], out)


def window_hidden(lm, emb: torch.Tensor, live: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The last position's final hidden state of every window: what ``lm.hidden_states(inputs_embeds=
    windows)[:, -1]`` gives, for the windows ``where(live, unfold(emb), pad)``.

    ``emb: [B, W - 1 + T, D]`` (the embedded inputs, oldest first), ``live: [B, T, W]`` (slot s of step t's
    window holds ``emb[:, t + s]`` where True, ``pad: [D]`` where False) -> ``[B, T, D]``.

    Padding slots are a prefix of their window and attend (causally) only to padding, so at every layer
    slot s of any window's padding holds what slot s of an all-padding window holds. Without chapter
    routers (whose decisions pool over the window) and with two or more layers, the per-position work of
    every layer (projections, memory reads, MLPs) is done once per *live* slot plus once per slot of one
    all-padding window (:func:`_compact_hidden`); only the attention runs on the whole windows.
    """
    st = Stack(lm)
    B, T, W = live.shape
    D = emb.shape[-1]
    n = len(st.layers)
    if lm.adapter is not None:
        lm.adapter.begin(None)
    try:
        cs = st.rope(W, emb)
        L = W - 1 + T
        # row of [B * L tokens; padding] that slot s of step t's window holds: token t + s of its row, or the padding
        rows = (torch.arange(B, device=emb.device) * L).view(B, 1, 1) + torch.arange(T, device=emb.device).view(T, 1) \
            + torch.arange(W, device=emb.device)
        rows = torch.where(live, rows, B * L).flatten()
        compact = n >= 2 and st.last_only() and not st.routed()
        if compact:  # one more window, all padding, after the B * T real ones
            rows = torch.cat([rows, rows.new_full((W,), B * L)])
        N = B * T + compact

        def gather(per_token: torch.Tensor, per_pad: torch.Tensor) -> torch.Tensor:
            """``[B, W - 1 + T, F]``, ``[F]`` -> windows ``[N, W, F]`` (one index_select: a copy per slot,
            and a scatter-add back in backward)."""
            table = torch.cat([per_token.reshape(B * L, -1), per_pad.view(1, -1)])
            return table.index_select(0, rows).view(N, W, -1)

        qkv = None
        if st.kind == "llama":  # layer 0's norm and q/k/v once per token (and once for the padding)
            tokens = torch.cat([emb.reshape(B * L, D), pad.view(1, D)])  # the table gather() reads
            q, k, v = st.qkv(0, tokens)  # [B * L + 1, heads, dh]
            # one gather each (the backward of one gather split four ways would concatenate the four grads)
            h, q, k, v = (x.flatten(1).index_select(0, rows).view(N, W, *x.shape[1:]) for x in (tokens, q, k, v))
            qkv = (q, k, v)
        else:  # GPT-2: absolute positions enter before layer 0
            h = gather(emb, pad) + st.wpe.weight[:W].to(emb.dtype)
            h = lm.model.transformer.drop(h)
        if compact:
            return st.final_norm(_compact_hidden(st, h, qkv, live, cs)).view(B, T, D)
        last_only = st.last_only()
        for i in range(n):
            if i == n - 1 and last_only:
                h = st.last_layer(i, h, cs, qkv)
            else:
                h = st.full_layer(i, h, cs, qkv)
            qkv = None
        return st.final_norm(h[:, -1]).view(B, T, D)
    finally:
        if lm.adapter is not None:
            lm.adapter._now.mask = None


def _compact_hidden(st: Stack, h: torch.Tensor, qkv, live: torch.Tensor, cs) -> torch.Tensor:
    """The last layer's output at the last slot, ``[B * T, D]``, from layer 0's input windows ``h: [N, W, D]``
    (``N = B * T + 1``: the real windows and one all-padding window last; ``qkv``: layer 0's gathered
    unrotated q/k/v, or None) and ``live: [B, T, W]``.

    Rows are kept *compact*: ``[R, D]``, the live slots of the real windows, then the W slots of the
    padding window. Each layer gathers its keys/values (and queries) from the compact rows into whole
    windows (``dense``: the padding slots of a real window read the padding window's row of that slot),
    attends, and runs the rest of the layer on the compact rows only."""
    N, W, _ = h.shape
    dev = h.device
    flat_live = torch.cat([live.reshape(-1), torch.ones(W, dtype=torch.bool, device=dev)])  # [N * W]
    to_compact = flat_live.nonzero().squeeze(1)  # [R]: dense position of each compact row
    R = to_compact.shape[0]
    slot = torch.arange(W, device=dev).repeat(N)
    to_dense = torch.where(flat_live, flat_live.long().cumsum(0) - 1, R - W + slot)  # [N * W]: compact row
    last = to_dense.view(N, W)[:-1, -1]  # [N - 1]: compact rows of the real windows' last slots (always live)

    def dense(x: torch.Tensor) -> torch.Tensor:
        """``[R, heads, dh]`` -> ``[N, W, heads, dh]``."""
        return x.flatten(1).index_select(0, to_dense).view(N, W, *x.shape[1:])

    def attend_compact(q, k, v):
        """Whole-window causal attention of dense q/k/v, kept at the compact rows: ``[R, H * dh]``."""
        out = st.attend(st.rotate(q, cs), st.rotate(k, cs), v, causal=True)
        return out.flatten(0, 1).index_select(0, to_compact)

    n = len(st.layers)
    h = h.flatten(0, 1).index_select(0, to_compact)  # [R, D]
    for i in range(n - 1):
        if qkv is not None:  # layer 0 of a LLaMA: gathered per token, already whole windows
            q, k, v = qkv
            qkv = None
        else:
            q, k, v = (dense(x) for x in st.qkv(i, h))
        h = st.finish(i, h, attend_compact(q, k, v))
    # the last layer at the real windows' last slots: keys/values of every slot, the query of the last
    i = n - 1
    q, k, v = st.qkv(i, h, q_rows=last)
    k, v = dense(k)[:-1], dense(v)[:-1]  # [N - 1, W, Hkv, dh]
    last_cs = None if cs is None else (cs[0][-1:], cs[1][-1:])
    out = st.attend(st.rotate(q.unsqueeze(1), last_cs), st.rotate(k, cs), v, causal=False)
    return st.finish(i, h.index_select(0, last), out.squeeze(1))


def pad_cache(lm, pad: torch.Tensor, W: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the unrotated keys and values of a window of ``W - 1`` padding tokens (what the slots
    before an episode start hold in window mode): ``[W - 1, Hkv, dh]`` each."""
    st = Stack(lm)
    h = pad.expand(1, W - 1, pad.shape[-1])
    if st.kind == "gpt2":
        h = h + st.wpe.weight[:W - 1].to(pad.dtype)
    cs = st.rope(W - 1, pad)
    ks, vs = [], []
    for i in range(len(st.layers)):
        h, k, v = st.full_layer(i, h, cs, keep_kv=True)
        ks.append(k[0])
        vs.append(v[0])
    return ks, vs


def stream_hidden(lm, emb: torch.Tensor, live: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                  pad_k: list[torch.Tensor], pad_v: list[torch.Tensor]):
    """Streaming: every token computed once per layer, attending at each layer to that layer's cached
    keys/values of the previous ``W - 1`` tokens.

    ``emb: [B, T, D]`` (this call's embedded inputs), ``live: [B, T, W]`` (as in :func:`window_hidden`: slot s
    of step t's window is live where True; else it holds the padding's keys/values ``pad_k[l][s]``),
    ``cache_k, cache_v: [B, L, W - 1, Hkv, dh]`` (unrotated keys / values of the previous W - 1 tokens, oldest
    first) -> ``(y: [B, T, D], keys [B, L, W - 1 + T, Hkv, dh], values)`` (the caller keeps the last W - 1).

    A token is placed at the window's last position (rotary: keys of slot s rotated to position s, the
    query to W - 1; GPT-2: its position embedding is that of position W - 1 when it arrives). Equal to window
    mode at the first step of an episode (it attends to the padding's own keys/values, as the window does);
    after that, window mode recomputes the earlier tokens of each window in the current window (layer
    l >= 1 keys/values of a token depend on what precedes it in the window, and with GPT-2 on its slot),
    streaming keeps those computed when the token arrived. One-layer LLaMA-style models: equal at every
    step (layer 0's keys/values are per-token, rotary is relative).
    """
    st = Stack(lm)
    B, T, W = live.shape
    if lm.adapter is not None:
        lm.adapter.begin(None)
    try:
        cs = st.rope(W, emb)
        q_cs = None if cs is None else (cs[0][-1:], cs[1][-1:])
        h = emb
        if st.kind == "gpt2":
            h = lm.model.transformer.drop(h + st.wpe.weight[W - 1].to(emb.dtype))
        mask = live.unsqueeze(-1).unsqueeze(-1)  # [B, T, W, 1, 1]
        keys, values = [], []
        for i in range(len(st.layers)):
            q, k, v = st.qkv(i, h)  # [B, T, H(kv), dh]
            k_all = torch.cat([cache_k[:, i], k], 1)  # [B, W - 1 + T, Hkv, dh]
            v_all = torch.cat([cache_v[:, i], v], 1)
            keys.append(k_all)
            values.append(v_all)
            pk = torch.cat([pad_k[i], k.new_zeros(1, *k.shape[2:])], 0)  # slot W - 1 is always live
            pv = torch.cat([pad_v[i], v.new_zeros(1, *v.shape[2:])], 0)
            kw = torch.where(mask, k_all.unfold(1, W, 1).permute(0, 1, 4, 2, 3), pk)  # [B, T, W, Hkv, dh]
            vw = torch.where(mask, v_all.unfold(1, W, 1).permute(0, 1, 4, 2, 3), pv)
            qr = st.rotate(q, q_cs).reshape(B * T, 1, *q.shape[2:])
            out = st.attend(qr, st.rotate(kw, cs).reshape(B * T, W, *k.shape[2:]), vw.reshape(B * T, W, *v.shape[2:]),
                            causal=False)
            h = st.finish(i, h, out.view(B, T, -1))
        return st.final_norm(h), torch.stack(keys, 1), torch.stack(values, 1)
    finally:
        if lm.adapter is not None:
            lm.adapter._now.mask = None
