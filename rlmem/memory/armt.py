"""ARMT: Associative Recurrent Memory Transformer (Rodkin et al. 2024, arXiv 2407.04841).

The stream is cut into segments of ``segment_len`` consecutive steps. A small transformer (the windowed
transformer's layers, :class:`rlmem.memory.transformer.WindowLayer`: GTrXL-gated or plain pre-norm
residuals) runs inside a segment: every step attends causally to the earlier steps of its segment (their
layer inputs are cached in the state, so acting one step at a time sees what a replayed sequence sees)
and has an output at once. When a segment closes, the
``num_mem_tokens`` learned memory tokens are processed after its last step (they attend to the whole
segment and, causally, to each other) and their outputs are written into an associative memory, one per
layer, which carries information from segment to segment. Nothing else crosses a segment boundary.

Per layer ``l``, an associative matrix ``A: [d_key, d_model]`` and normalizer ``z: [d_key]`` (zero at an
episode start), with the DPFP feature map ``phi`` (nu = 3, ``d_key = 2 nu d_mem``, :func:`dpfp`):

- read, before the layer, for every token (segment steps and memory tokens)::

      h <- h + phi(W_q h) A / (z . phi(W_q h) + eps)

- write, after the layer, from the memory tokens' outputs ``m: [M, d_model]`` (all M tokens at once,
  against the memory as it was before the write)::

      k = phi(W_k m),  v_bar = k A / (z . k + eps),  beta = sigmoid(W_b m)          (per memory token)
      A <- A + sum_m beta_m k_m (W_v m_m - v_bar_m)^T
      z <- z + sum_m k_m                                (correction=False, the default)
      z <- z + sum_m gamma_m k_m,  gamma = clip(1 - z . k / (|k|^2 + eps), 0, 1)   (correction=True)

  The paper's ``gamma`` (detached: it only scales the normalizer update) lets a key clipped to
  ``gamma = 0`` enter ``A`` but not ``z``, so a query overlapping it reads a large numerator over a tiny
  normalizer (reads of 1e7 and a NaN loss in training). With ``z`` the plain sum of the keys, every read is
  a weighted mean of the written differences, bounded by what was written.

  ``W_v`` starts at zero (as in the official code), so an untrained ARMT reads zeros and starts as a
  plain segment transformer; the first gradient reaches ``W_v`` and, once it is non-zero, ``W_q``,
  ``W_k``, ``W_b``.

``rule="delta"`` (``rule="armt"`` is all of the above) keeps the DPFP keys, ``beta`` and the memory tokens but
drops the normalizer: keys and queries are scaled to unit length, ``read = unit(phi(W_q h)) A`` and
``A <- A + sum_m beta_m k_m (W_v m_m - k_m A)^T`` (the plain delta rule; ``z`` stays zero). A normalized read
is a weighted mean of what was written, so a query that barely overlaps one written key reads all of that
key's value, and ``v_bar`` subtracts it in full from a new, barely overlapping key's value. With unit keys a
read scales with how well the query matches, and a write under a key replaces what that key held. On
assoc_recall with one pair per segment the delta rule learned the task (1.000 at seed 0; not at every
seed) and the armt rule stayed at chance (docs/memory.md).

An episode start (``is_init`` True at step t) resets the state *before* step t: a new segment starts
there with ``A = 0``, ``z = 0`` and an empty cache; an unfinished segment is dropped without a write.

State (flat keys, fixed shapes; ``L = n_layers``, ``S = segment_len``, ``K = d_key``):

- ``A: [B, L, K, d_model]``, ``z: [B, L, K]``: the associative memory of each layer;
- ``cache: [B, L, S-1, d_model]``: each layer's inputs (after the read) at the earlier steps of the
  running segment, right-aligned (newest last), zeros in slots that hold no step of it;
- ``pos: [B]`` (int64): the position of the next step in its segment, ``0 .. S-1``.

Sequence mode (T > 1) does not loop over steps. A row's steps between episode starts form a *chain*; a
reset zeroes the whole state, so chains share nothing and all chains of all rows run side by side. Every
step gets its position in its segment (counted from the last reset, else from the state's ``pos``) and
its segment number inside its chain; round ``r`` then processes the r-th segment of every chain that has
one, whole segments at once (causally masked, ``[chains, S + M]`` tokens), so the number of rounds is the
segment count of the longest chain, not T. A chain's last segment may be unfinished: it does not write.
A write that nothing reads (a chain's last segment, unless the chain is its row's last: its memory is the
next state) is skipped, so a round runs memory tokens only for its writing chains (apart from the steps
when they are few: the steps do not attend to them) and a round without writers runs on its used slots
only. The first chain of a row continues the given state (its memory, and in round 0 the cached layer
inputs of a segment begun earlier) unless the row starts with a reset; only those chains read the memory
in round 0 (an empty memory reads 0). Step mode (T = 1) runs the new step's query against the cache, plus
the memory tokens, read and write of the rows whose segment closes.

Recurrent memory tokens (the hook DARMT builds on, :mod:`rlmem.memory.darmt`): ARMT appends the same learned
tokens to every segment. If the state has a key ``"mem": [B, M, d_model]``, those are the tokens of each
row's running segment instead: an episode start resets them to the learned tokens, and after a segment's
write :meth:`ARMT._next_tokens` gives the next segment's tokens of the rows it is asked for (those named by
the optional per-step ``gate``; all closing rows without one). ARMT's own state has no ``"mem"``.

Readable reference (a plain loop over rows and time on this module's parameters): :mod:`rlmem.memory.reference.armt`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from rlmem.validate import check_float, check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory
from rlmem.memory.transformer import RESIDUALS, WindowLayer

#: DPFP order: the feature map multiplies [relu(x), relu(-x)] with its rolls by 1..NU
NU = 3
#: accepted range of ``eps`` (the read/write normalizer's stabilizer)
MIN_EPS, MAX_EPS = 1e-10, 1.0
#: the associative memory's read/write rule (module docstring)
RULES = ("armt", "delta")


def dpfp(x: torch.Tensor, nu: int = NU) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): ``x: [..., d] -> [..., 2 nu d]``.

    ``u = [relu(x), relu(-x)]`` (``2d``), then ``[u * roll(u, 1), ..., u * roll(u, nu)]`` along the last
    dim (``roll(u, j)[i] = u[i - j]``). Nonnegative, so ``z . phi(q)`` is a sum of nonnegative terms.
    """
    u = F.relu(torch.cat([x, -x], -1))  # [relu(x), relu(-x)]
    return torch.cat([u * u.roll(j, -1) for j in range(1, nu + 1)], -1)


def _stack(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer ``[B, ...]`` tensors -> ``[B, L, ...]`` (one layer: a view, not a copy)."""
    return per_layer[0].unsqueeze(1) if len(per_layer) == 1 else torch.stack(per_layer, 1)


class AssociativeMemory(nn.Module):
    """One layer's associative memory: the projections ``W_q, W_k, W_v, W_b``; ``A, z`` live in the state.

    Public so that a coprocessor (DARMT) can read and write the same memory: :meth:`read` with its own
    queries, :meth:`write` with its own memory-token outputs.
    """

    def __init__(self, d_model: int, d_mem: int, eps: float, correction: bool = False, rule: str = "armt"):
        super().__init__()
        self.eps, self.correction, self.rule = eps, correction, rule
        self.d_key = 2 * NU * d_mem
        self.w_q = nn.Linear(d_model, d_mem, bias=False)
        self.w_k = nn.Linear(d_model, d_mem, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.w_v.weight)  # the memory starts silent: ARMT starts as a plain segment transformer
        self.w_b = nn.Linear(d_model, 1)

    def read(self, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``h: [B, Q, d_model]``, ``A: [B, K, d_model]``, ``z: [B, K]`` -> ``[B, Q, d_model]``:
        ``phi(W_q h) A / (z . phi(W_q h) + eps)`` (rule ``armt``) or ``unit(phi(W_q h)) A`` (rule ``delta``);
        zero for a never-written memory."""
        q = dpfp(self.w_q(h))  # [B, Q, K]
        if self.rule == "delta":
            return F.normalize(q, dim=-1, eps=self.eps) @ A
        return (q @ A) / (q @ z.unsqueeze(-1) + self.eps)

    def write(self, m: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the memory-token outputs ``m: [B, M, d_model]`` into ``A: [B, K, d_model]``, ``z: [B, K]``;
        returns the new ``(A, z)`` (the inputs are not modified; rule ``delta`` leaves ``z`` at zero)."""
        k = dpfp(self.w_k(m))  # [B, M, K]
        beta = torch.sigmoid(self.w_b(m))  # [B, M, 1] per-token write strength
        if self.rule == "delta":  # unit keys: k A is what a read with k returns now, so only the difference is written
            k = F.normalize(k, dim=-1, eps=self.eps)
            return torch.baddbmm(A, (beta * k).transpose(1, 2), self.w_v(m) - k @ A), z  # A + (beta k)^T (...)
        zk = k @ z.unsqueeze(-1)  # [B, M, 1]
        v_bar = (k @ A) / (zk + self.eps)  # what the memory returns for k now: only the difference is written
        A = torch.baddbmm(A, (beta * k).transpose(1, 2), self.w_v(m) - v_bar)  # no [B, K, d] temporary
        if not self.correction:  # z = the sum of all keys: a read is a weighted mean of the written differences
            return A, z + k.sum(1)
        # the normalizer grows only by the part of k that z does not already cover (delta-rule correction)
        gamma = (1 - zk / (k.pow(2).sum(-1, keepdim=True) + self.eps)).clamp(0, 1).detach()
        return A, z + (gamma * k).sum(1)


@register_memory("armt")
class ARMT(MemorySystem):
    """Segment transformer with per-layer associative memory. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    Args:
        d_in: input features per step.
        d_model: width of the transformer and of the memory values (the output width).
        n_layers: transformer layers, each with its own associative memory.
        n_heads: attention heads (divide ``d_model``).
        d_mem: width of the memory keys/queries before DPFP; ``d_key = 6 d_mem`` (nu = 3).
        segment_len: steps per segment (1 allowed: every step is written). Information crosses a
            segment boundary only through the associative memory.
        num_mem_tokens: learned memory tokens appended at the end of every segment; their outputs are
            written into the memory.
        d_ff: hidden width of the feed-forward blocks (None: ``2 d_model``).
        eps: stabilizer of the read/write normalizers, in ``[1e-10, 1]``.
        gate_bias: GTrXL gate bias (larger: the layers start closer to the identity).
        residual: ``"gated"`` (GTrXL gated residuals, stable for RL) or ``"plain"`` (pre-norm residual
            layers, which learn to compose attention heads as recall tasks need; see ``WindowLayer``).
        correction: the paper's clipped normalizer update (True) or ``z += k`` (False: reads stay bounded;
            module docstring). Rule ``armt`` only.
        rule: ``"armt"`` (the paper's normalized read and write) or ``"delta"`` (unit-norm keys, plain
            delta rule: module docstring).

    Cost of an acting step, per layer: one token through the layer (attending to at most ``segment_len``
    keys) and an ``O(d_key d_model)`` read; the step that closes a segment also runs the memory tokens and
    the write. State: ``n_layers (d_key (d_model + 1) + (segment_len - 1) d_model) + 1`` numbers per row.
    """

    test_kwargs = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_mem": 4, "segment_len": 3, "num_mem_tokens": 2}

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, n_heads: int = 4, d_mem: int = 16,
                 segment_len: int = 8, num_mem_tokens: int = 4, d_ff: int | None = None, eps: float = 1e-5,
                 gate_bias: float = 2.0, residual: str = "gated", correction: bool = False, rule: str = "armt"):
        super().__init__()
        name = self.registry_name  # "armt", or a subclass's name: errors name the system that was built
        d_model = check_int(f"{name}: d_model", d_model, low=1)
        n_layers = check_int(f"{name}: n_layers", n_layers, low=1)
        n_heads = check_int(f"{name}: n_heads", n_heads, low=1)
        if d_model % n_heads:
            raise ValueError(f"{name}: d_model={d_model} must be divisible by n_heads={n_heads}")
        d_mem = check_int(f"{name}: d_mem", d_mem, low=1)
        segment_len = check_int(f"{name}: segment_len", segment_len, low=1)
        num_mem_tokens = check_int(f"{name}: num_mem_tokens", num_mem_tokens, low=1)
        if d_ff is None:
            d_ff = 2 * d_model
        d_ff = check_int(f"{name}: d_ff", d_ff, low=1, why="or null for 2 * d_model")
        eps = check_float(f"{name}: eps", eps, low=MIN_EPS, high=MAX_EPS)
        gate_bias = check_float(f"{name}: gate_bias", gate_bias)
        if not isinstance(residual, str) or residual not in RESIDUALS:
            raise ValueError(f"{name}: residual must be one of {list(RESIDUALS)}, got {residual!r}")
        if not isinstance(correction, bool):
            raise ValueError(f"{name}: correction must be true or false, got {correction!r}")
        if not isinstance(rule, str) or rule not in RULES:
            raise ValueError(f"{name}: rule must be one of {list(RULES)}, got {rule!r}")
        if correction and rule != "armt":
            raise ValueError(f"{name}: correction=true is the armt rule's normalizer update; rule={rule!r} has no "
                             "normalizer (set correction=false or rule=armt)")
        self.d_in, self.d_out, self.d_model, self.n_layers = d_in, d_model, d_model, n_layers
        self.d_mem, self.d_key, self.eps = d_mem, 2 * NU * d_mem, eps
        self.segment_len, self.num_mem_tokens, self.d_ff = segment_len, num_mem_tokens, d_ff
        self.n_heads, self.gate_bias, self.residual = n_heads, gate_bias, residual
        self.rule = rule
        self.embed = nn.Linear(d_in, d_model)
        self.mem_tokens = nn.Parameter(torch.randn(num_mem_tokens, d_model) / d_model**0.5)
        # relative-position attention over [segment; memory tokens]: distances 0 .. S + M - 1
        self.window = segment_len + num_mem_tokens - 1
        self.layers = nn.ModuleList(
            WindowLayer(d_model, n_heads, self.window, d_ff, gate_bias, residual) for _ in range(n_layers)
        )
        self.memories = nn.ModuleList(AssociativeMemory(d_model, d_mem, eps, correction, rule)
                                      for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(d_model)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_model={self.d_model}, d_key={self.d_key}, segment_len={self.segment_len}, "
                f"num_mem_tokens={self.num_mem_tokens}, rule={self.rule}")

    def initial_state(self, batch_size, device=None):
        L, K, d = self.n_layers, self.d_key, self.d_model
        dtype = self.embed.weight.dtype  # float64 models get float64 states
        return TensorDict(
            {
                "A": torch.zeros(batch_size, L, K, d, device=device, dtype=dtype),
                "z": torch.zeros(batch_size, L, K, device=device, dtype=dtype),
                "cache": torch.zeros(batch_size, L, self.segment_len - 1, d, device=device, dtype=dtype),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
            },
            batch_size=[batch_size],
        )

    # -- for a coprocessor (DARMT) ------------------------------------------------------------------------

    def memory_token_embeddings(self) -> torch.Tensor:
        """The learned memory tokens appended to every segment: ``[num_mem_tokens, d_model]``."""
        return self.mem_tokens

    def read_memory(self, queries: torch.Tensor, state: TensorDict, layer: int) -> torch.Tensor:
        """Read layer ``layer``'s associative memory in ``state`` with ``queries: [B, Q, d_model]``
        (hidden states, projected by that layer's ``W_q``) -> ``[B, Q, d_model]``."""
        return self.memories[layer].read(queries, state["A"][:, layer], state["z"][:, layer])

    def _next_tokens(self, tokens: torch.Tensor, out: torch.Tensor, A: list[torch.Tensor], z: list[torch.Tensor],
                     rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Memory tokens kept in the state (key ``"mem"``, module docstring): the next segment's tokens.

        ``tokens: [n, M, d_model]`` the running segment's tokens, ``out: [n, M, d_model]`` their outputs from
        the last layer, ``A``/``z``: per layer ``[n, K, d_model]``/``[n, K]``, the memory just written;
        ``rows: [n]`` (bool, ``n_rows`` of them True) the rows whose tokens may change (their segment closed and
        the gate is on); every other row's tokens must be returned unchanged. Default: unchanged.
        """
        return tokens

    # -- the model -----------------------------------------------------------------------------------------

    def _distances(self, q_index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries at positions ``q_index: [Q]`` of the context ``[segment (S); memory tokens (M)]``:
        ``dist: [Q, S+M]`` (clamped to 0..window, as WindowLayer wants) and the causal mask ``[Q, S+M]``."""
        raw = q_index.unsqueeze(1) - torch.arange(self.window + 1, device=device)
        return raw.clamp(0, self.window), raw >= 0

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        if x.shape[1] == 1:
            return self._step(x, state, is_init[:, 0])
        return self._sequence(x, state, is_init)

    def _step(self, x, state, is_init, gate=None):
        """One step (acting): the new step's query against the cache; memory tokens only if a row closes.
        ``x: [B, 1, d_in]``, ``is_init: [B]``; ``gate: [B]`` bool or None (which closing rows call
        :meth:`_next_tokens`, when the state has recurrent memory tokens; None: all)."""
        B, S, M = x.shape[0], self.segment_len, self.num_mem_tokens
        A, z, cache, pos = state["A"], state["z"], state["cache"], state["pos"]
        tokens = state.get("mem", None)  # recurrent memory tokens (a subclass's); None: the learned constants
        if bool(is_init.any()):  # one host sync per step; saves copies of the memory when no row resets
            keep = ~is_init
            A, z = A * keep.view(B, 1, 1, 1), z * keep.view(B, 1, 1)
            pos = pos * keep
            if tokens is not None:
                tokens = torch.where(keep.view(B, 1, 1), tokens, self.mem_tokens)
        closing = pos == S - 1  # [B]
        n_closing = int(closing.sum())  # host sync: run the memory tokens only if some row closes
        # the new step's query against [cache (indices S-1-pos .. S-2 hold this segment's earlier steps); itself]
        dist, causal = self._distances(torch.arange(S - 1, S + M, device=x.device), x.device)  # [1 + M, S + M]
        allowed = (torch.arange(S, device=x.device) >= (S - 1 - pos).view(B, 1)).unsqueeze(1)  # [B, 1, S]
        tok = self.embed(x)
        if n_closing:  # the closing rows' memory tokens, [n_closing, M, d]: their cache is full, so only causal
            every = n_closing == B
            idx = None if every else closing.nonzero().squeeze(1)
            if tokens is None:
                mem = self.mem_tokens.expand(n_closing, M, self.d_model)
            else:
                mem = tokens if every else tokens[idx]
        As, zs, caches, written = [], [], [], []
        for i, (layer, memory) in enumerate(zip(self.layers, self.memories)):
            A_i, z_i = A[:, i], z[:, i]
            inp = tok + memory.read(tok, A_i, z_i)
            context = torch.cat([cache[:, i], inp], 1)  # [B, S, d]
            caches.append(context[:, 1:S])  # the last S-1 layer inputs, the new step's included
            tok = layer(inp, context, allowed, dist[:1, :S])
            if n_closing:  # the memory tokens attend to the closing rows' segment and causally to each other
                A_c, z_c = (A_i, z_i) if every else (A_i[idx], z_i[idx])
                m_inp = mem + memory.read(mem, A_c, z_c)
                mem = layer(m_inp, torch.cat([context if every else context[idx], m_inp], 1), causal[None, 1:], dist[1:])
                A_c, z_c = memory.write(mem, A_c, z_c)
                written.append((A_c, z_c))
                A_i, z_i = (A_c, z_c) if every else (A_i.index_copy(0, idx, A_c), z_i.index_copy(0, idx, z_c))
            As.append(A_i)
            zs.append(z_i)
        next_pos = (pos + 1) % S
        next_state = TensorDict(
            {"A": _stack(As), "z": _stack(zs), "cache": self._clear_stale(_stack(caches), next_pos), "pos": next_pos},
            batch_size=state.batch_size,
        )
        if tokens is not None:
            if n_closing:
                rows = None if gate is None else gate if every else gate[idx]  # of the closing rows
                n_rows = n_closing if gate is None else int(rows.sum())  # host sync: skip the hook if no row
                if n_rows:
                    if rows is None:
                        rows = closing.new_ones(n_closing)
                    new = self._next_tokens(tokens if every else tokens[idx], mem, [a for a, _ in written],
                                            [b for _, b in written], rows, n_rows)
                    tokens = new if every else tokens.index_copy(0, idx, new)
            next_state["mem"] = tokens
        return self.norm_f(tok), next_state

    def _clear_stale(self, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Zero the slots of a right-aligned ``cache: [B, L, S-1, d]`` that hold no step of the running
        segment (``pos`` steps of it are cached), so step and sequence mode return the same state."""
        S = self.segment_len
        live = torch.arange(S - 1, device=cache.device) >= (S - 1 - pos).unsqueeze(1)  # [B, S-1]
        return cache * live[:, None, :, None].to(cache.dtype)

    def _sequence(self, x, state, is_init, gate=None):
        """Whole segments in parallel: one round per segment depth of the longest episode (module docstring).
        ``gate: [B, T]`` bool or None: as in :meth:`_step`, read at the step that closes a segment."""
        B, T, _ = x.shape
        S, M, L, d, dev = self.segment_len, self.num_mem_tokens, self.n_layers, self.d_model, x.device
        pos0 = state["pos"]
        # position of every step in its segment: counted from the last reset, else from the state's position
        t = torch.arange(T, device=dev)
        last_reset = torch.where(is_init, t, -1).cummax(1).values
        p = torch.where(last_reset >= 0, t - last_reset, pos0.unsqueeze(1) + t) % S  # [B, T]
        # chains: a row's steps from t=0 or an episode start to the next start. A reset zeroes the whole state,
        # so chains share nothing and run side by side; rounds only go as deep as the longest chain.
        first = is_init.clone()
        first[:, 0] = True
        first, pf = first.flatten(), p.flatten()  # everything per step below is in (row, time) order: [B*T]
        chain = first.long().cumsum(0) - 1  # chain id of each step
        seg_starts = (pf == 0).long().cumsum(0)
        first_at = first.nonzero().squeeze(1)  # [C] index of each chain's first step
        k = seg_starts - seg_starts[first_at][chain]  # segment number of each step inside its chain
        last_at = torch.cat([first_at[1:] - 1, first_at.new_tensor([B * T - 1])])
        n_seg = k[last_at] + 1  # [C] segments per chain
        C = n_seg.shape[0]
        # a write is read by a later segment of its chain or, from a row's last chain, as the next state; a
        # chain's last segment writes for nothing unless it closes and the chain is its row's last
        last_writes = (pf[last_at] == S - 1) & ((last_at + 1) % T == 0)  # [C]
        # deepest chains first (round r runs a prefix); among equally deep ones, those whose last write counts
        order = torch.argsort(2 * n_seg + last_writes.long(), descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(C, device=dev))
        slot = rank[chain]  # [B*T] row of each step's chain in the round batches
        R = int(n_seg.max())  # host sync: the number of rounds
        depth = torch.zeros(R, C, dtype=torch.long, device=dev)
        rounds = torch.arange(R, device=dev).unsqueeze(1)
        n_seg_s, last_writes_s = n_seg[order].unsqueeze(0), last_writes[order].unsqueeze(0)
        active = (n_seg_s > rounds).sum(1)  # [R]
        # [R]: round r's first `writing` chains write (a prefix, by the order above); the others end in round r
        writing = ((n_seg_s > rounds + 1) | ((n_seg_s == rounds + 1) & last_writes_s)).sum(1)
        tokens = state.get("mem", None)  # recurrent memory tokens (a subclass's); None: the learned constants
        hooked = depth[:, :0]  # [R, C]: where _next_tokens runs
        last = (T - 1) + T * torch.arange(B, device=dev)  # [B] each row's last step
        if tokens is not None:
            closes = depth.index_put((k, slot), (pf == S - 1).long(), accumulate=True) > 0  # [R, C]: segment complete
            hooked = closes
            if gate is not None:
                hooked = depth.index_put((k, slot), ((pf == S - 1) & gate.flatten()).long(), accumulate=True) > 0
            # new tokens are read only by a later segment of the chain that writes them (one that closes) or
            # as the next state (each row's last chain): skip the rest, whose tokens nothing would read
            closes_later = torch.zeros_like(closes)
            closes_later[:-1] = closes.long().flip(0).cummax(0).values.flip(0)[1:] > 0
            in_state = torch.zeros(C, dtype=torch.bool, device=dev).index_fill(0, slot[last], True)
            hooked = hooked & (closes_later | in_state)
        # a round in which no segment completes writes nothing: it runs without memory tokens, on its used slots
        used = torch.zeros(R, dtype=torch.long, device=dev).scatter_reduce(0, k, pf + 1, "amax")
        active_n, writing_n, used_n, hooked_n = torch.stack([active, writing, used, hooked.sum(1)]).tolist()
        grid = x.new_zeros(R, C, S, d).index_put_((k, slot, pf), self.embed(x).flatten(0, 1))  # empty slots: 0
        # each row's first chain continues the state unless it starts with a reset; later chains start from 0
        row_chain = rank[chain.view(B, T)[:, 0]]  # [B]
        carries = (~is_init[:, 0]).to(x.dtype)
        A0 = x.new_zeros(C, L, self.d_key, d).index_put_((row_chain,), state["A"] * carries.view(B, 1, 1, 1))
        z0 = x.new_zeros(C, L, self.d_key).index_put_((row_chain,), state["z"] * carries.view(B, 1, 1))
        A, z = list(A0.unbind(1)), list(z0.unbind(1))
        # in round 0 the chains that start with a reset read an empty memory (0): only the carried ones read
        carry_slots = row_chain[~is_init[:, 0]]
        n_carry = carry_slots.shape[0]
        if tokens is not None:  # every chain starts from the learned tokens, a continuing first chain from its state's
            row_tokens = torch.where(is_init[:, 0].view(B, 1, 1), self.mem_tokens, tokens)
            tokens = self.mem_tokens.expand(C, M, d).index_put((row_chain,), row_tokens)
        # round 0 of a continuing first chain: its first pos0 slots are the cached layer inputs
        n_cached = torch.where(is_init[:, 0], 0, pos0)
        cached = None
        if S > 1 and bool((n_cached > 0).any()):
            src = (torch.arange(S - 1, device=dev) + (S - 1) - pos0.unsqueeze(1)).clamp(max=S - 2)  # slot -> index
            rows_h = state["cache"].gather(2, src[:, None, :, None].expand(B, L, S - 1, d))
            rows_h = torch.cat([rows_h, rows_h.new_zeros(B, L, 1, d)], 2)  # [B, L, S, d]
            mask = torch.arange(S, device=dev) < n_cached.unsqueeze(1)  # [B, S]
            cached = (torch.zeros(C, S, 1, dtype=torch.bool, device=dev).index_put_((row_chain,), mask.unsqueeze(-1)),
                      x.new_zeros(C, L, S, d).index_put_((row_chain,), rows_h))
        dist, allowed = self._distances(torch.arange(S + M, device=dev), dev)
        allowed = allowed.unsqueeze(0)
        finished = [([], []) for _ in range(L)]  # per layer: (A, z) of chains as they finish, deepest last
        finished_tokens = []
        outs, inps = [], []
        for r in range(R):
            c, w = active_n[r], writing_n[r]
            if c < A[0].shape[0]:
                for i in range(L):  # chains that ended in the last round keep their final memory
                    finished[i][0].append(A[i][c:])
                    finished[i][1].append(z[i][c:])
                    A[i], z[i] = A[i][:c], z[i][:c]
                if tokens is not None:
                    finished_tokens.append(tokens[c:])
                    tokens = tokens[:c]
            # memory tokens only for the writing chains: a segment's steps do not attend to them (causal)
            if w == 0:  # no write: the round runs on its used slots only
                n_tok = used_n[r]
                tok, r_dist, r_allowed = grid[r, :c, :n_tok], dist[:n_tok, :n_tok], allowed[:, :n_tok, :n_tok]
            else:  # the writers' segments are complete, so all S slots are used
                n_tok = S
                mem = self.mem_tokens.expand(w, M, d) if tokens is None else tokens[:w]
                split = 2 * w < c  # few writers: their memory tokens run apart from the steps (fewer tokens)
                if split:
                    tok, r_dist, r_allowed = grid[r, :c], dist[:S, :S], allowed[:, :S, :S]
                else:  # most chains write: one batch, the non-writers' memory tokens computed and dropped
                    mem = mem if w == c else torch.cat([mem, self.mem_tokens.expand(c - w, M, d)])
                    tok, r_dist, r_allowed = torch.cat([grid[r, :c], mem], 1), dist, allowed  # [c, S+M, d]
            round_inps = []
            for i, (layer, memory) in enumerate(zip(self.layers, self.memories)):
                if r > 0 or n_carry == c:
                    inp = tok + memory.read(tok, A[i], z[i])
                elif n_carry:
                    read = memory.read(tok[carry_slots], A[i][carry_slots], z[i][carry_slots])
                    inp = tok.index_add(0, carry_slots, read)
                else:
                    inp = tok
                if r == 0 and cached is not None:
                    seg = torch.where(cached[0][:, :n_tok], cached[1][:, i, :n_tok], inp[:, :n_tok])
                    inp = torch.cat([seg, inp[:, n_tok:]], 1)
                round_inps.append(F.pad(inp[:, :n_tok], (0, 0, 0, S - n_tok)))
                tok = layer(inp, inp, r_allowed, r_dist)
                if w and split:  # [w, M, d] queries against [the writers' steps; memory tokens]
                    m_inp = mem + memory.read(mem, A[i][:w], z[i][:w])
                    mem = layer(m_inp, torch.cat([inp[:w], m_inp], 1), allowed[:, S:], dist[S:])
                if w:
                    written = memory.write(mem if split else tok[:w, S:], A[i][:w], z[i][:w])
                    if w < c:  # the non-writers end here with their memory unchanged
                        finished[i][0].append(A[i][w:])
                        finished[i][1].append(z[i][w:])
                    A[i], z[i] = written
            if tokens is not None:
                if hooked_n[r]:  # hooked chains are writers
                    new = self._next_tokens(tokens[:w], mem if split else tok[:w, S:], A, z, hooked[r, :w],
                                            hooked_n[r])
                    tokens = new if w == c else torch.cat([new, tokens[w:]])
                if w and w < c:
                    finished_tokens.append(tokens[w:])
                    tokens = tokens[:w]
            outs.append(F.pad(tok[:, :n_tok], (0, 0, 0, S - n_tok)))
            inps.append(torch.stack(round_inps, 1))
        # round r's chains are rows offset[r] .. offset[r] + active[r] - 1 of the concatenated round outputs
        offset = torch.cumsum(active, 0) - active
        y = torch.cat(outs)[offset[k] + slot, pf].view(B, T, d)
        # next state: each row's last chain's memory, and its last segment's layer inputs right-aligned
        A_end = [torch.cat([A[i], *reversed(finished[i][0])])[slot[last]] for i in range(L)]
        z_end = [torch.cat([z[i], *reversed(finished[i][1])])[slot[last]] for i in range(L)]
        next_pos = (p[:, -1] + 1) % S
        if S > 1:
            seg = torch.cat(inps)[offset[k[last]] + slot[last]]  # [B, L, S, d]
            src = (torch.arange(S - 1, device=dev) - (S - 1) + next_pos.unsqueeze(1)).clamp(min=0)
            cache = self._clear_stale(seg.gather(2, src[:, None, :, None].expand(B, L, S - 1, d)), next_pos)
        else:
            cache = state["cache"]
        next_state = TensorDict(
            {"A": torch.stack(A_end, 1), "z": torch.stack(z_end, 1), "cache": cache, "pos": next_pos},
            batch_size=state.batch_size,
        )
        if tokens is not None:
            next_state["mem"] = torch.cat([tokens, *reversed(finished_tokens)])[slot[last]]
        return self.norm_f(y), next_state
