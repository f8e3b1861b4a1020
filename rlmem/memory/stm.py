"""STM: a fixed K-slot short-term memory refined by a Diffuser and read by a frozen Generator.

A fixed buffer of ``K + 1`` embeddings replaces a growing cache (``K`` content slots and one mode slot), so
memory and per-step cost are constant in the episode length. Each step ``t``:

1. **input encoder**: ``e_t = Enc(x_t)`` (Linear -> GELU -> Linear), ``[B, d]``;
2. **write** (:class:`SlotWriter`, a gated cross-attention): every content slot ``s_k`` makes a query
   ``W_q LN(s_k)``, the input a key ``W_k e_t`` and a value ``v = W_v e_t``; the slots compete for the input
   (softmax over the slots, ``a_k``) and a per-slot gate ``g_k = sigmoid(W_g [LN(s_k); e_t] + gate_bias)``
   decides how much of it they take::

       s_k <- s_k + g_k a_k (v - s_k)

   a convex blend, so slots stay bounded. Content slots start empty (zero) and learned slot keys ``p_k``
   join the queries, so inputs can go to different slots from the first step. With the default
   ``gate_bias = -4`` the write weight ``g_k a_k`` of an untrained slot is below ``sigmoid(-4) = 0.018`` per
   step (the softmax splits it over the slots), so a slot keeps its content for hundreds of steps (about half
   of it after 300 steps of random inputs, ``tests/test_stm.py``); the gate learns when to open;
3. **Diffuser** (:class:`Diffuser`): ``n_refine`` iterations of a small denoising network over the whole
   buffer (self-attention across the K + 1 slots and an MLP, residual, conditioned on an embedding of the
   iteration index), ``b <- D(b, i)`` for ``i = 0 .. n_refine - 1``; its updates are scaled by the RMS of
   the slot they change, and its output projections start at zero (an untrained Diffuser is the identity). By default (``persist_refinement=False``) the refined buffer is
   what the generator reads at this step and the state carries the written buffer: refinement cannot
   erase what the gate keeps, and it does not compound over the episode. With ``persist_refinement=True``
   the refined buffer is the next state; then the Diffuser is applied ``n_refine x T`` times in a row, a
   deep recurrence that in our measurements kept a supervised delayed-cue probe at chance for 300 updates
   where the default reached accuracy 1.0 within 200. It is trained through
   the task loss and, when ``aux_coef > 0``, by a denoising loss (:meth:`STM.aux_loss`): the refined
   buffers of the last call (detached) are noised at the level of a random iteration ``i`` (standard
   deviation ``aux_noise (n_refine - i) / n_refine`` times the buffer's RMS) and ``D(., i)`` must return
   the clean buffer; the loss is the relative squared error times ``aux_coef``;
4. **Generator**: a frozen causal LM from ``transformers`` reads ``[mode slot | K content slots | e_t]`` as
   input embeddings (a soft prompt, scaled to the RMS of the generator's token embeddings; a Linear maps
   ``d`` to the generator's hidden size when they differ) and its last hidden state at the last position (mapped back to ``d``) is the output ``y_t``.

The generator only reads the buffer, so in sequence mode only the (cheap) write recurrence loops over
time; the refinement (unless it persists) and the generator run once on all ``B * T`` buffers.

**The Diffuser is the gated expensive path**: ``forward(x, state, is_init, trigger=None)`` takes an optional
``trigger: [B, T]`` bool; rows where it is False skip the refinement at that step (the write still happens).
None refines every row at every step. Refinement runs only on the chosen rows (none: not at all).

**The generator is frozen**: its weights are registered as (persistent) *buffers* of this module, not
parameters: ``requires_grad`` is False, ``parameters()`` (hence every optimizer built from it) does not
include them, gradients still flow through the generator's computation to the buffer, and ``state_dict``
holds them, so a checkpoint restores the exact generator it was trained with. ``generator="tiny"`` (or
``"tiny-llama"``, ``"tiny-gpt2"``) builds a small random model from a config with its own seed
(``generator_seed``, independent of the global RNG): a fixed random transformer, the same whatever the
training seed; any other value is a local ``save_pretrained`` directory (never downloaded;
``scripts/pretrain_lm.py`` writes one). The generator is kept in eval mode (no dropout) even when the
memory trains.

State: ``buffer: [B, K + 1, d]`` (slot 0 is the mode slot). An episode starts from a learned buffer
(``initial_state`` depends on parameters; at init a random mode slot and empty content slots).

**Fast paths** (same maths as the readable :mod:`rlmem.memory.reference.stm`, checked in float64 by
``tests/test_stm_fast.py``): everything of the write that depends only on the inputs (``W_k e``, ``W_v e``,
the gate's input part, and the query-key products folded into ``W_q^T W_k e``) is computed for all steps
in a few matmuls before the loop, so a step of the write recurrence is LayerNorm, one batched matmul,
softmax, sigmoid and one ``lerp``; the mode slot, which only resets change, is not carried through the
loop; with autograd on, the loop is :class:`WriteRecurrence` (preallocated outputs, a hand-written backward:
one loop of ~10 kernels per step instead of ~10 autograd nodes, the rest batched over all steps); a LLaMA
generator is read by :func:`rlmem.memory.stm_generator.fused_last_hidden` (each position's rotary folded into
the q/k weights so one batched matmul per layer projects every position, merged gate/up, weights derived
from the frozen generator cached until it changes, no mask building, the last layer at the last position
only); other generators go through their ``transformers`` forward. Measured (docs/stm.md, "Speed"): these
last two make a [16 x 64] replay ~1.1x faster (138 -> 123 ms) and the write loop ~1.2x; the rest of a replay
is mostly SDPA over 9-10 positions and compute-bound matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn
from torch.autograd.function import once_differentiable

from rlmem.causal_lm import TINY_SOURCES, load_causal_lm
from rlmem.validate import check_float, check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory
from rlmem.memory.stm_generator import GeneratorCache, fused_last_hidden, supports_fused


def parameters_to_buffers(module: nn.Module) -> nn.Module:
    """Re-register every parameter of ``module`` (recursively) as a persistent buffer without gradient.

    A frozen model's weights then stay out of ``parameters()`` (so out of any optimizer built from it, and
    out of gradient clipping), are still moved by ``.to()`` and saved in ``state_dict``, and autograd still
    differentiates through the computation that uses them.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().requires_grad_(False), persistent=True)
    return module


class SlotWriter(nn.Module):
    """Gated cross-attention write of one input into the ``K`` content slots.

    ``slots: [B, K, d]``, ``e: [B, d]`` -> ``[B, K, d]``: ``s_k + g_k a_k (W_v e - s_k)`` with
    ``a = softmax_k((W_q LN(s_k) + p_k) . W_k e / sqrt(d))`` and ``g_k = sigmoid(W_g [LN(s_k); e] + gate_bias)``
    (``p_k``: learned slot keys).
    """

    def __init__(self, d: int, n_slots: int, gate_bias: float):
        super().__init__()
        self.slot_keys = nn.Parameter(torch.randn(n_slots, d))
        self.norm = nn.LayerNorm(d)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, 1)
        nn.init.normal_(self.gate.weight, std=0.01)  # the bias alone sets the initial retention
        nn.init.constant_(self.gate.bias, gate_bias)
        self.scale = 1.0 / math.sqrt(d)

    def write_weights(self, slots: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``g_k a_k``: how much of the input each slot takes, ``[B, K, 1]`` in ``[0, 1]``."""
        h = self.norm(slots)
        query = self.query(h) + self.slot_keys
        address = torch.softmax((query * self.key(e).unsqueeze(1)).sum(-1) * self.scale, -1)  # [B, K]
        gate = torch.sigmoid(self.gate(torch.cat([h, e.unsqueeze(1).expand_as(h)], -1)))  # [B, K, 1]
        return gate * address.unsqueeze(-1)

    def forward(self, slots: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        w = self.write_weights(slots, e)
        return slots + w * (self.value(e).unsqueeze(1) - slots)

    def prepare(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything of the write that depends only on the inputs, for all steps at once.

        ``e: [..., d]`` -> ``(M: [..., d, 2], Z: [..., K, 2], v: [..., 1, d])`` such that for slots ``s: [..., K, d]``
        ``LN(s) @ M + Z`` holds the address logits (column 0: ``(W_q LN(s_k) + b_q + p_k) . W_k e / sqrt(d)``, as
        ``LN(s_k) . (W_q^T W_k e) + (b_q + p_k) . W_k e``, scaled) and the gate logits (column 1:
        ``W_g [LN(s_k); e] + b_g``), and ``v = W_v e``. See :meth:`step`.
        """
        d = e.shape[-1]
        K = self.slot_keys.shape[0]
        g_w = self.gate.weight  # [1, 2d]: LN(s) part, then e part
        weight = torch.cat([self.key.weight, self.value.weight, g_w[:, d:]], 0)  # [2d + 1, d]
        bias = torch.cat([self.key.bias, self.value.bias, self.gate.bias], 0)
        k, v, g = F.linear(e, weight, bias).split((d, d, 1), -1)
        # query . key = LN(s) . (W_q^T k) + (b_q + p_k) . k: one matmul for both, scaled
        fold = torch.cat([self.query.weight, (self.slot_keys + self.query.bias).t()], 1) * self.scale  # [d, d + K]
        uc = k @ fold  # [..., d + K]
        u, c = uc.split((d, K), -1)
        M = torch.stack([u, g_w[0, :d].expand_as(u)], -1)  # [..., d, 2]
        Z = torch.stack([c, g.expand_as(c)], -1)  # [..., K, 2]
        return M, Z, v.unsqueeze(-2)

    def step(self, slots: torch.Tensor, M: torch.Tensor, Z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One write from :meth:`prepare`'s ``M: [B, d, 2]``, ``Z: [B, K, 2]``, ``v: [B, 1, d]``; ``slots: [B, K, d]``."""
        h = F.layer_norm(slots, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        address, gate = torch.baddbmm(Z, h, M).unbind(-1)  # [B, K] each: address logits, gate logits
        w = torch.softmax(address, -1) * torch.sigmoid(gate)  # g_k a_k
        return torch.lerp(slots, v, w.unsqueeze(-1))  # s + w (v - s)


class WriteRecurrence(torch.autograd.Function):
    """The write loop of :meth:`SlotWriter.step` over ``T`` steps, with resets, and a hand-written backward.

    ``forward(slots, M, Z, v, weight, bias, init, resets, eps)``: ``slots: [B, K, d]`` (before step 0),
    :meth:`SlotWriter.prepare`'s ``M: [T, B, d, 2]``, ``Z: [T, B, K, 2]``, ``v: [T, B, 1, d]``, the LayerNorm's
    ``weight, bias: [d]`` and ``eps``, ``init: [K, d]`` (the content slots a reset restores), ``resets``: a list of
    ``T`` entries, None or ``[B, 1, 1]`` bool (rows reset before step t) -> the written slots ``[B, T, K, d]``.

    The same operations as the step-by-step loop, so the same numbers. Why a Function: autograd records ~10
    nodes per step for these ``[B, K, d]`` tensors and the engine's per-node cost dominates; here the forward
    writes into preallocated outputs and the backward runs one loop of ~10 kernels per step (the gradient
    through the gates needs the LayerNorm of the slots, so it is sequential), then everything that does not
    feed the recurrence (``dM``, ``dv``, the LayerNorm's weight and bias) in a few batched ops over all steps.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, slots, M, Z, v, weight, bias, init, resets, eps):
        T, (B, K, d) = M.shape[0], slots.shape
        pre = slots.new_empty(T, B, K, d)  # the slots each step starts from (after its resets)
        address = slots.new_empty(T, B, K)  # softmax over the slots
        gate = slots.new_empty(T, B, K)  # sigmoid of the gate logits
        out = slots.new_empty(B, T, K, d)
        # per-step views made once (indexing in the loop costs as much as the small kernels)
        steps = zip(pre.unbind(0), address.unbind(0), gate.unbind(0), out.unbind(1), M.unbind(0), Z.unbind(0),
                    v.unbind(0), resets)
        s = slots
        for pre_t, address_t, gate_t, out_t, M_t, Z_t, v_t, reset_t in steps:
            if reset_t is not None:
                s = torch.where(reset_t, init, s)
            pre_t.copy_(s)
            h = F.layer_norm(s, (d,), weight, bias, eps)
            address_logits, gate_logits = torch.baddbmm(Z_t, h, M_t).unbind(-1)  # [B, K] each
            address_t.copy_(torch.softmax(address_logits, -1))
            torch.sigmoid(gate_logits, out=gate_t)
            s = torch.lerp(s, v_t, (address_t * gate_t).unsqueeze(-1), out=out_t)  # s + w (v - s)
        ctx.save_for_backward(pre, address, gate, M, v, weight, bias)
        ctx.resets, ctx.eps = resets, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pre, address, gate, M, v, weight, bias = ctx.saved_tensors
        T, B, K, d = pre.shape
        # everything per step that does not depend on the gradient, for all steps at once
        h, mean, rstd = torch.native_layer_norm(pre, (d,), weight, bias, ctx.eps)  # as the forward computed them
        w = address * gate  # [T, B, K]
        keep = (1 - w).unsqueeze(-1)  # d s' / d s (direct part)
        diff = v - pre  # d s' / d w
        gate_slope = w * (1 - gate)  # d w / d gate logit
        d_logits = pre.new_empty(T, B, K, 2)
        d_h = pre.new_empty(T, B, K, d)
        d_out = pre.new_empty(T, B, K, d)  # gradient at each step's output, recurrence included
        d_address, d_gate = d_logits.unbind(-1)
        steps = list(zip(grad.unbind(1), d_out.unbind(0), diff.unbind(0), gate.unbind(0), address.unbind(0),
                         gate_slope.unbind(0), d_address.unbind(0), d_gate.unbind(0), d_logits.unbind(0),
                         M.transpose(-1, -2).unbind(0), d_h.unbind(0), pre.unbind(0), mean.unbind(0),
                         rstd.unbind(0), keep.unbind(0), ctx.resets))
        d_init = None
        carry = None
        for (grad_t, d_out_t, diff_t, gate_t, address_t, slope_t, d_address_t, d_gate_t, d_logits_t, MT_t, d_h_t,
             pre_t, mean_t, rstd_t, keep_t, reset_t) in reversed(steps):
            g = d_out_t.copy_(grad_t) if carry is None else torch.add(grad_t, carry, out=d_out_t)
            d_w = torch.linalg.vecdot(g, diff_t)  # [B, K]
            d_address_t.copy_(torch._softmax_backward_data(d_w * gate_t, address_t, -1, pre.dtype))
            torch.mul(d_w, slope_t, out=d_gate_t)
            torch.bmm(d_logits_t, MT_t, out=d_h_t)
            d_s = torch.ops.aten.native_layer_norm_backward(d_h_t, pre_t, (d,), mean_t, rstd_t, weight, bias,
                                                            [True, False, False])[0]
            carry = torch.addcmul(d_s, g, keep_t)
            if reset_t is not None:  # reset rows started from init: the gradient goes there, not back
                part = torch.where(reset_t, carry, 0).sum(0)
                d_init = part if d_init is None else d_init + part
                carry = torch.where(reset_t, 0, carry)
        d_M = h.transpose(-1, -2) @ d_logits  # [T, B, d, 2]
        d_v = (w.unsqueeze(-1) * d_out).sum(2, keepdim=True)  # [T, B, 1, d]
        _, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
            d_h, pre, (d,), mean, rstd, weight, bias, [False, weight is not None, bias is not None])
        return carry, d_M, d_logits, d_v, d_weight, d_bias, d_init, None, None


class Diffuser(nn.Module):
    """One denoising step over a buffer, conditioned on the iteration (noise level).

    ``buf: [N, S, d]``, ``level``: an int or ``[N]`` int64 in ``[0, n_levels)`` -> ``[N, S, d]``::

        c = E[level];  b = buf + r(buf) Attn(LN(buf) + c);  out = b + r(b) MLP(LN(b) + c)

    where ``r(.)`` is each slot's RMS (``[N, S, 1]``): updates are relative to the slot they change. Slots hold
    content at very different scales (a slot written a few times with a closed gate is tiny, yet its
    direction is what the generator's normalized layers read), so an update of fixed size would swamp small
    slots; LN makes every slot's content visible at full strength, and an empty slot stays empty. The
    attention's and the MLP's output projections start at zero (the identity at start).
    """

    def __init__(self, d: int, n_heads: int, n_levels: int, d_ff: int):
        super().__init__()
        self.levels = nn.Embedding(n_levels, d)
        nn.init.normal_(self.levels.weight, std=0.1)
        self.norm_attn, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d)
        # attention written out (one fused q/k/v Linear + SDPA): nn.MultiheadAttention's per-call overhead is
        # most of the cost at K + 1 ~ 10 tokens, and the Diffuser runs n_refine times per step
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        for out in (self.out, self.ff[-1]):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, buf: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        N, S, d = buf.shape
        if isinstance(level, int):  # one level for all rows: folded into the LayerNorms' biases
            c = self.levels.weight[level]
            h = self._norm(self.norm_attn, buf, c)
        else:
            c = self.levels(level).unsqueeze(1)  # [N, 1, d]
            h = self._norm(self.norm_attn, buf) + c
        q, k, v = self.qkv(h).view(N, S, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [N, heads, S, d / heads], every slot sees every slot
        buf = torch.addcmul(buf, _rms(buf), self.out(attn.transpose(1, 2).reshape(N, S, d)))
        h = self._norm(self.norm_ff, buf, c) if isinstance(level, int) else self._norm(self.norm_ff, buf) + c
        return torch.addcmul(buf, _rms(buf), self.ff(h))

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``norm(x) + shift`` (``shift: [d]``) in one LayerNorm call."""
        bias = norm.bias if shift is None else norm.bias + shift
        return F.layer_norm(x, norm.normalized_shape, norm.weight, bias, norm.eps)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-row RMS over the last dim, ``[..., 1]``."""
    return x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # eps: a finite gradient at an empty slot


class _LastAux:
    """The auxiliary loss of the last forward. A copy of the module has run no forward, so copies start
    empty (a non-leaf tensor cannot be deep-copied anyway)."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return _LastAux()

    def __getstate__(self):
        return {"value": None}


@register_memory("stm")
class STM(MemorySystem):
    """K-slot short-term memory -> Diffuser -> frozen Generator (module docstring).
    ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    Args:
        d_in: input features per step.
        d_model: width ``d`` of the slots, the encoder and the output.
        n_slots: ``K``, content slots (>= 1); the buffer has ``K + 1`` rows (slot 0: the mode slot).
        n_refine: Diffuser iterations per step (>= 0; 0: no Diffuser at all).
        n_heads: heads of the Diffuser's self-attention across slots (divide ``d_model``).
        d_ff: hidden width of the Diffuser's MLP (None: ``2 d_model``).
        gate_bias: initial bias of the write gate (more negative: slots keep content longer at start).
        aux_coef: weight of the denoising auxiliary loss (0: none; :meth:`aux_loss` returns None).
        aux_noise: noise level of the first iteration in that loss, relative to the buffer's RMS.
        generator: ``"tiny"``, ``"tiny-llama"``, ``"tiny-gpt2"`` (a small random model from a config) or a
            local ``save_pretrained`` directory of a causal LM.
        generator_hidden, generator_layers, generator_heads: sizes of a tiny generator (ignored for a
            directory).
        generator_seed: seed of a tiny generator's weights (independent of the global RNG).
        persist_refinement: False (default): the generator reads the refined buffer, the state carries the
            written one; True: the refined buffer is the next state (refinements compound over the episode).

    Cost of a step: the encoder, the write (``O(K d^2)``), ``n_refine`` Diffuser passes over ``K + 1``
    slots and one generator pass over ``K + 2`` positions; none of it depends on the episode length.
    State: ``(K + 1) d`` numbers per row.
    """

    @property
    def trigger_path(self) -> str | None:
        return None if self.diffuser is None else "Diffuser refinement"

    #: the refinement changes the buffer the generator reads at the same step: y_t depends on trigger t
    trigger_affects_output = True

    test_kwargs = {"d_model": 8, "n_slots": 3, "n_refine": 2, "n_heads": 2, "generator_hidden": 16,
                   "generator_layers": 1, "generator_heads": 2, "aux_coef": 0.1}

    def __init__(self, d_in: int, d_model: int = 32, n_slots: int = 8, n_refine: int = 2, n_heads: int = 2,
                 d_ff: int | None = None, gate_bias: float = -4.0, aux_coef: float = 0.0, aux_noise: float = 0.5,
                 generator: str = "tiny", generator_hidden: int = 32, generator_layers: int = 2,
                 generator_heads: int = 4, generator_seed: int = 0, persist_refinement: bool = False):
        super().__init__()
        name = self.registry_name
        d_model = check_int(f"{name}: d_model", d_model, low=1)
        n_slots = check_int(f"{name}: n_slots", n_slots, low=1, why="K, the number of content slots")
        n_refine = check_int(f"{name}: n_refine", n_refine, low=0, why="Diffuser iterations per step; 0 = none")
        n_heads = check_int(f"{name}: n_heads", n_heads, low=1)
        if d_model % n_heads:
            raise ValueError(f"{name}: d_model={d_model} must be divisible by n_heads={n_heads}")
        d_ff = check_int(f"{name}: d_ff", 2 * d_model if d_ff is None else d_ff, low=1, why="or null for 2 * d_model")
        gate_bias = check_float(f"{name}: gate_bias", gate_bias)
        aux_coef = check_float(f"{name}: aux_coef", aux_coef, low=0.0)
        aux_noise = check_float(f"{name}: aux_noise", aux_noise, low=0.0)
        if not isinstance(persist_refinement, bool):
            raise ValueError(f"{name}: persist_refinement must be true or false, got {persist_refinement!r}")
        if not isinstance(generator, str) or not generator:
            raise ValueError(f"{name}: generator must be one of {', '.join(TINY_SOURCES)} or a local directory, "
                             f"got {generator!r}")
        self.d_in, self.d_out, self.d_model = d_in, d_model, d_model
        self.n_slots, self.n_refine, self.aux_coef, self.aux_noise = n_slots, n_refine, aux_coef, aux_noise
        self.generator_source, self.persist_refinement = generator, persist_refinement

        self.encoder = nn.Sequential(nn.Linear(d_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        # the episode's first buffer: a learned mode slot and empty content slots. Empty matters: the first
        # write into a slot sets its direction (what the generator's normalized layers see) whatever the gate
        init = torch.zeros(n_slots + 1, d_model)
        init[0] = torch.randn(d_model)
        self.init_buffer = nn.Parameter(init)
        self.writer = SlotWriter(d_model, n_slots, gate_bias)
        self.diffuser = Diffuser(d_model, n_heads, n_refine, d_ff) if n_refine else None

        if generator in TINY_SOURCES:
            g_hidden = check_int(f"{name}: generator_hidden", generator_hidden, low=1)
            g_layers = check_int(f"{name}: generator_layers", generator_layers, low=1)
            g_heads = check_int(f"{name}: generator_heads", generator_heads, low=1)
            if g_hidden % g_heads:
                raise ValueError(f"{name}: generator_hidden={g_hidden} must be divisible by generator_heads={g_heads}")
            seed = check_int(f"{name}: generator_seed", generator_seed, low=0)
            with torch.random.fork_rng(devices=[]):  # the tiny generator's seed must not move the global RNG
                lm = load_causal_lm(generator, vocab_size=32, hidden_size=g_hidden, n_layers=g_layers,
                                    n_heads=g_heads, max_positions=max(64, n_slots + 2), seed=seed)
        else:
            try:
                lm = load_causal_lm(generator)  # FileNotFoundError / ValueError with the valid choices
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{name}: generator={generator!r}: {err}") from None
        config = lm.config
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if max_positions is not None and n_slots + 2 > max_positions:
            raise ValueError(f"{name}: the generator reads n_slots + 2 = {n_slots + 2} positions, more than its "
                             f"{max_positions} position embeddings")
        embeddings = lm.get_input_embeddings().weight.detach()
        self.generator = parameters_to_buffers(lm.base_model).eval()  # the decoder stack; the LM head is unused
        hidden = int(config.hidden_size)
        # soft-prompt tokens enter at the scale of the generator's own token embeddings (per-coordinate RMS):
        # much larger inputs would swamp what its layers add to the residual stream, so the last position would
        # barely read the slots. A buffer, so a checkpoint keeps it consistent with the generator it holds.
        self.register_buffer("input_scale", embeddings.float().pow(2).mean().sqrt().to(embeddings.dtype))
        self.generator_hidden = hidden
        self.to_generator = nn.Linear(d_model, hidden) if hidden != d_model else nn.Identity()
        self.from_generator = nn.Linear(hidden, d_model) if hidden != d_model else nn.Identity()
        self._aux = _LastAux()
        # a LLaMA generator is read by the fused forward (same numbers; rlmem/memory/stm_generator.py)
        self._fused_read = supports_fused(self.generator)
        self._generator_cache = GeneratorCache()

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_model={self.d_model}, n_slots={self.n_slots}, n_refine={self.n_refine}, "
                f"generator={self.generator_source!r} (hidden {self.generator_hidden}, frozen)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator.eval()  # frozen: no dropout, whatever the rest does
        return self

    def initial_state(self, batch_size, device=None):
        buf = self.init_buffer.to(device).unsqueeze(0).expand(batch_size, -1, -1)
        return TensorDict({"buffer": buf}, batch_size=[batch_size])

    # -- the pieces ------------------------------------------------------------------------------------------

    def write(self, buf: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``buf: [B, K+1, d]``, ``e: [B, d]`` -> the buffer with ``e`` written into its content slots."""
        return torch.cat([buf[:, :1], self.writer(buf[:, 1:], e)], 1)

    def refine(self, buf: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``n_refine`` Diffuser iterations on ``buf: [B, K+1, d]``, on the rows where ``rows: [B]`` (bool) is
        True (None: all); the other rows are returned unchanged."""
        if self.diffuser is None:
            return buf
        if rows is None or bool(rows.all()):
            for i in range(self.n_refine):
                buf = self.diffuser(buf, i)
            return buf
        index = rows.nonzero().squeeze(1)
        if index.numel() == 0:
            return buf
        sub = buf.index_select(0, index)
        for i in range(self.n_refine):
            sub = self.diffuser(sub, i)
        return buf.index_copy(0, index, sub)

    def read(self, buf: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The generator on ``[mode | content | e]``: ``buf: [N, K+1, d]``, ``e: [N, d]`` -> ``[N, d]``."""
        tokens = torch.cat([buf, e.unsqueeze(1)], 1)  # [N, K+2, d]
        if isinstance(self.to_generator, nn.Linear):  # the input scale folded into the projection
            lin = self.to_generator
            tokens = F.linear(tokens, lin.weight * self.input_scale, lin.bias * self.input_scale)
        else:
            tokens = self.to_generator(tokens) * self.input_scale  # [N, K+2, hidden]
        if self._fused_read:
            return self.from_generator(fused_last_hidden(self.generator, tokens, self._generator_cache))
        hidden = self.generator(inputs_embeds=tokens, use_cache=False).last_hidden_state
        return self.from_generator(hidden[:, -1])

    def denoising_loss(self, clean: torch.Tensor) -> torch.Tensor:
        """Noise ``clean: [N, K+1, d]`` at a random iteration's level, relative squared error of ``D``'s answer."""
        clean = clean.detach()
        level = torch.randint(self.n_refine, (clean.shape[0],), device=clean.device)
        sigma = self.aux_noise * (self.n_refine - level).to(clean.dtype) / self.n_refine  # first iteration: noisiest
        rms = clean.pow(2).mean((1, 2), keepdim=True).sqrt()
        noisy = clean + sigma.view(-1, 1, 1) * rms * torch.randn_like(clean)
        return F.mse_loss(self.diffuser(noisy, level), clean) / clean.pow(2).mean().clamp_min(1e-12)

    # -- the contract ----------------------------------------------------------------------------------------

    def forward(self, x, state, is_init, trigger: torch.Tensor | None = None):
        """``x: [B, T, d_in]``, ``is_init: [B, T]``, ``trigger: [B, T]`` bool or None (always) -> ``y: [B, T,
        d_model]``; ``trigger`` False skips the Diffuser's refinement at that row and step."""
        check_inputs(self, x, state, is_init)
        refine = trigger
        B, T = x.shape[:2]
        if refine is not None:
            if tuple(refine.shape) != (B, T) or refine.dtype != torch.bool:
                raise ValueError(f"{self.registry_name}: trigger must be a bool tensor of shape [B, T]={(B, T)}, "
                                 f"got {refine.dtype} {tuple(refine.shape)}")
        e = self.encoder(x)  # [B, T, d]
        buf = state["buffer"]
        resets = is_init.any(0).tolist()  # one host sync: which steps need the initial buffer
        any_reset = any(resets)
        init = self.init_buffer.to(x.device) if any_reset else None
        # the inputs' part of every step's write, computed for all steps before the loop, time-major so that
        # a step's slices are contiguous
        M, Z, v = self.writer.prepare(e.transpose(0, 1))  # [T, B, d, 2], [T, B, K, 2], [T, B, 1, d]
        if self.persist_refinement:  # the refined buffer is the next state: write and refine in the loop
            bufs = []
            for t in range(T):
                if resets[t]:
                    buf = torch.where(is_init[:, t].view(B, 1, 1), init, buf)
                buf = torch.cat([buf[:, :1], self.writer.step(buf[:, 1:], M[t], Z[t], v[t])], 1)
                buf = self.refine(buf, None if refine is None else refine[:, t])
                bufs.append(buf)
            seen = torch.stack(bufs, 1).flatten(0, 1)  # [B * T, K+1, d]
        else:
            # only resets change the mode slot: the loop carries the content slots alone
            slots = buf[:, 1:]
            if torch.is_grad_enabled():  # the loop with a hand-written backward (same numbers)
                norm = self.writer.norm
                masks = [is_init[:, t].view(B, 1, 1) if resets[t] else None for t in range(T)]
                content = WriteRecurrence.apply(slots, M, Z, v, norm.weight, norm.bias,
                                                init[1:] if any_reset else None, masks, norm.eps)
            else:
                written = []
                for t in range(T):
                    if resets[t]:
                        slots = torch.where(is_init[:, t].view(B, 1, 1), init[1:], slots)
                    slots = self.writer.step(slots, M[t], Z[t], v[t])
                    written.append(slots)
                content = torch.stack(written, 1)  # [B, T, K, d]
            mode = buf[:, :1].unsqueeze(1)  # [B, 1, 1, d]
            if any_reset:  # the initial mode slot from a row's first reset on
                mode = torch.where(is_init.cummax(1).values.view(B, T, 1, 1), init[:1], mode)
            seen = torch.cat([mode.expand(B, T, 1, self.d_model), content], 2)  # [B, T, K+1, d]
            buf = seen[:, -1]
            seen = self.refine(seen.flatten(0, 1), None if refine is None else refine.flatten())
        y = self.read(seen, e.flatten(0, 1)).view(B, T, self.d_model)
        self._aux.value = None
        if self.aux_coef > 0 and self.diffuser is not None and self.training and torch.is_grad_enabled():
            self._aux.value = self.aux_coef * self.denoising_loss(seen)
        return y, TensorDict({"buffer": buf}, batch_size=state.batch_size)

    def aux_loss(self) -> torch.Tensor | None:
        """``aux_coef`` x the denoising loss of the last forward in training mode with autograd on, else None."""
        return self._aux.value
