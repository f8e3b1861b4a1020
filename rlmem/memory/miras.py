"""DualTierMiras: two online associative memories, a fast tier always written and a deep tier written
only on surprise (after the MIRAS / Titans view of memory as online regression).

Every step, with per-head queries/keys ``q, k`` (unit length, ``mem_slots`` dims) and values ``v``
(``d_model / n_heads`` dims), each tier is a matrix ``M: [d_head, mem_slots]`` per head:

- read (before writing): ``r = M q`` for both tiers, all heads -> ``out_proj([r_fast; r_deep])``;
- fast tier, delta rule with forgetting: ``M <- (1 - decay) M + lr_fast (v - M k) k^T``;
- deep tier, Titans' momentum update, applied through a surprise gate ``g`` per head::

      e = v - M k,   surprise = |e|^2 / (|v|^2 + eps)          (the tier's own relative prediction error)
      g = sigmoid((surprise - surprise_threshold) / temperature)  (temperature learned)
      S' = momentum S + lr_deep e k^T,   M' = (1 - decay) M + S'
      S <- S + g (S' - S),   M <- M + g (M' - M)

  so an input the deep tier already predicts leaves it untouched (no write, no forgetting), and a novel
  one is written. The gate is a smooth function of the projections, so it is trained by the task loss.

``mem_slots`` is the key dimension: the number of orthogonal keys a head can hold without
interference. A matrix memory needs no slot mask: a never-written memory is zero and reads as zero.
All writes are batched tensor ops; each batch row has its own memory in the state.

Sequence mode (T > 1, the training pass) runs in chunks of ``chunk`` steps, as Titans trains its
neural memory: within a chunk every step's prediction error ``e_t = v_t - M_0 k_t`` (hence its surprise
and gate) is taken against the chunk-start memory ``M_0``, not the previous step's. With ``e_t`` and
``g_t`` fixed, both tiers are linear recurrences in ``(S, M)`` with per-step, per-head scalar
coefficients (``S_t = a_t S_{t-1} + u_t``, ``M_t = b_t M_{t-1} + c_t S_{t-1} + u_t``, ``u_t = w_t e_t k_t^T``),
so the chunk's reads and end state are computed in parallel from cumulative products of the
coefficients: a causal, decay-weighted attention over the chunk plus the chunk-start memory's read.
``chunk=1`` (and every T=1 call, i.e. acting) runs the exact step loop. No exact parallel form exists in
general: ``e_t`` depends on ``M_{t-1}``, and the deep gate is a sigmoid of ``|e_t|^2``, so the deep
tier's step map ``M_{t-1} -> M_t`` is nonlinear in the memory and steps do not compose into a fixed-size
operator (the fast tier's map is affine, but with a matrix coefficient ``(1 - decay) I - lr k k^T``,
not a scalar one).
An episode start inside a chunk is exact: from that step on, the row's chunk-start memory is the
fresh (zero) state and nothing before the reset reaches later steps.

State: ``fast, deep, deep_momentum: [B, n_heads, d_head, mem_slots]``, zero at episode start.

Readable reference (a plain loop over time on this module's parameters): :mod:`rlmem.memory.reference.miras`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from rlmem.validate import check_float, check_int
from rlmem.memory.base import MemorySystem, check_inputs, check_trigger
from rlmem.memory.registry import register_memory

_EPS = 1e-4
#: smallest surprise-gate temperature accepted
MIN_TEMPERATURE = 1e-6
#: largest chunk accepted: a chunk costs O(chunk^2) memory and O(chunk^3) work per row and head
MAX_CHUNK = 256


def _segment_products(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., C]`` (coefficients of steps 1..C) -> ``P: [..., C + 1, C + 1]`` with
    ``P[t, s] = prod_{s < j <= t} x_j`` for ``t >= s`` (1 on the diagonal); entries above it are junk.

    A cumulative product down the columns of ``[1 if j <= s else x_j]``: exact, no logs, so zero
    coefficients (decay 1, momentum 0) are fine."""
    C = x.shape[-1]
    padded = F.pad(x, (1, 0), value=1.0)[..., :, None]  # [..., C + 1, 1]: x_j for row j, x_0 = 1
    below = torch.ones(C + 1, C + 1, dtype=torch.bool, device=x.device).tril(-1)  # j > s
    return torch.where(below, padded, 1.0).cumprod(-2)


def check_chunk_stable(chunk: int, lr_fast: float, lr_deep: float, momentum: float) -> None:
    """Refuse chunked sequence mode where it diverges.

    Within a chunk every step's error is taken against the chunk-start memory, so a key seen on every
    step of a chunk (the blank steps of a delay, any repeated observation) is written ``chunk`` times from
    the same error: the fast tier moves by ``chunk * lr_fast`` times the error (overshooting, and growing
    from chunk to chunk, when that exceeds 2), the deep tier's momentum adds up to ``lr_deep / (1 -
    momentum)`` per step. Measured with the default learning rates (0.5) on a constant input: NaN after
    512 steps with ``chunk`` 4, 8 or 16. Chunks are therefore allowed only where no step can overshoot:
    ``chunk * lr_fast <= 1`` and ``chunk * lr_deep <= 1 - momentum``.
    """
    tol = 1e-9
    if chunk > 1 and (chunk * lr_fast > 1 + tol or chunk * lr_deep > 1 - momentum + tol):
        bounds = [1 / lr_fast if lr_fast else MAX_CHUNK, (1 - momentum) / lr_deep if lr_deep else MAX_CHUNK]
        largest = max(1, int(min(MAX_CHUNK, *bounds) + tol))
        raise ValueError(
            f"miras: chunk={chunk} diverges with lr_fast={lr_fast}, lr_deep={lr_deep}, momentum={momentum}: "
            "a key repeated within a chunk is written chunk times from the same error; chunked sequence mode "
            f"needs chunk * lr_fast <= 1 and chunk * lr_deep <= 1 - momentum (here chunk <= {largest}), "
            "or use chunk=1, the exact step loop")


class _StepLoop(torch.autograd.Function):
    """The exact step loop of :meth:`DualTierMiras.scan_steps` with a hand-written backward.

    Autograd through the loop records about 20 small ops per step and replays them one by one; here the
    forward runs without a graph, keeps the (reset-masked) state before every step, and the backward runs
    the same loop in reverse. Rows and heads are flattened (``N = B * H``) and the three matrices of a
    row-head are stacked, ``Z: [N, 3, d_head, S]`` = (fast, deep, deep momentum), so every step is a few
    whole-state ops. Per step, with ``g`` the deep gate (times ``gate_scale``)::

        F' = (1 - decay) F + lr_fast e_f k^T
        D' = (1 - g decay) D + g momentum S + g lr_deep e_d k^T
        S' = (1 - g (1 - momentum)) S + g lr_deep e_d k^T

    which is the lerp form of the module docstring multiplied out.
    """

    @staticmethod
    def forward(ctx, q, k, v, fast, deep, mom, log_temperature, keep, scale, consts, reset_steps):
        r, final, saved = _step_loop_forward(q, k, v, fast, deep, mom, log_temperature, keep, scale, consts,
                                             reset_steps, save=True)
        ctx.save_for_backward(*saved)
        ctx.consts, ctx.reset_steps, ctx.shape = consts, reset_steps, q.shape
        gates = saved[-1]
        ctx.mark_non_differentiable(gates)
        return r, final, gates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_r, grad_final, _grad_gates):
        return _step_loop_backward(ctx, grad_r, grad_final)


_COEFFICIENTS: dict = {}


def _coefficients(consts, like):
    """``(base, slope)`` of the per-step coefficients ``base + g * slope``, columns
    ``(1 - decay, 1 - g decay, lr_fast, g lr_deep, g momentum, 1 - g (1 - momentum))`` (cached: constants)."""
    key = (consts, like.dtype, like.device)
    if key not in _COEFFICIENTS:
        lr_fast, lr_deep, decay, momentum, _ = consts
        base = torch.tensor([1 - decay, 1.0, lr_fast, 0.0, 0.0, 1.0], dtype=like.dtype, device=like.device)
        slope = torch.tensor([0.0, -decay, 0.0, lr_deep, momentum, -(1 - momentum)], dtype=like.dtype,
                             device=like.device)
        _COEFFICIENTS[key] = (base, slope)
    return _COEFFICIENTS[key]


def _step_loop_forward(q, k, v, fast, deep, mom, log_temperature, keep, scale, consts, reset_steps, save):
    """``q, k: [B, T, H, S]``, ``v: [B, T, H, dh]``, states ``[B, H, dh, S]``, ``keep, scale: [T, N]`` or
    None -> ``(reads [B, T, 2 H dh], final [3, B, H, dh, S], saved tensors)``.

    Every per-step view is made before the loop (``unbind``), so the loop body is the arithmetic only."""
    B, T, H, S = q.shape
    dh, N = v.shape[-1], B * H
    threshold = consts[4]
    QK = torch.stack([q, k], 3).transpose(0, 1).reshape(T, N, 2, S)  # read and predict in one matmul
    vt = v.transpose(0, 1).reshape(T, N, dh)
    V2 = torch.cat([vt, vt], -1)  # [T, N, 2 dh]: the target of both tiers
    v_energy = vt.pow(2).sum(-1) + _EPS  # [T, N]
    tau = log_temperature.detach().exp()
    ivt = 1.0 / (v_energy * tau)  # z = surprise / tau - threshold / tau = |e|^2 ivt - threshold / tau
    neg_c = -threshold / tau
    base, slope = _coefficients(consts, q)
    Z = q.new_empty(T + 1 if save else 2, N, 3, dh, S)  # states before each step (fast, deep, momentum)
    torch.stack([fast, deep, mom], 2, out=Z[0].view(B, H, 3, dh, S))
    O = q.new_empty(T, N, 2, 2 * dh)  # row 0: reads [F q; D q], row 1: predictions [F k; D k]
    E = q.new_empty(T, N, 2, dh)  # errors [e_f; e_d]
    WE = q.new_empty(T, N, 2, dh)  # written values [lr_fast e_f; g lr_deep e_d]
    zs, gates, coefs, sq = q.new_empty(T, N), q.new_empty(T, N), q.new_empty(T, N, 6), q.new_empty(T, N)
    # per-step views
    z_all, fd, d_, s_ = Z.unbind(0), Z[:, :, :2].unbind(0), Z[:, :, 1].unbind(0), Z[:, :, 2].unbind(0)
    fd_t = Z[:, :, :2].reshape(Z.shape[0], N, 2 * dh, S).transpose(2, 3).unbind(0)
    qk, k3 = QK.unbind(0), QK[:, :, 1, None, :].unbind(0)
    o, pred, v2 = O.unbind(0), O[:, :, 1].unbind(0), V2.view(T, N, 2, dh).unbind(0)
    e_, e_d = E.unbind(0), E[:, :, 1].unbind(0)
    we, we_col = WE.unbind(0), WE.view(T, N, 2 * dh, 1).unbind(0)
    outer = q.new_empty(N, 2 * dh, S)  # the step's two written outer products (scratch)
    outer4 = outer.view(N, 2, dh, S)
    z_, sq_, g_, g2 = zs.unbind(0), sq.unbind(0), gates.unbind(0), gates[:, :, None].unbind(0)
    c_, c_fd, c_lr = coefs.unbind(0), coefs[:, :, :2, None, None].unbind(0), coefs[:, :, 2:4, None].unbind(0)
    c_mom, c_a = coefs[:, :, 4, None, None].unbind(0), coefs[:, :, 5, None, None].unbind(0)
    ivt_ = ivt.unbind(0)
    scale_ = None if scale is None else scale.unbind(0)
    keep_ = None if keep is None else keep[:, :, None, None, None].unbind(0)
    for t in range(T):
        i, j = (t, t + 1) if save else (t % 2, (t + 1) % 2)
        if t in reset_steps:
            z_all[i].mul_(keep_[t])
        torch.bmm(qk[t], fd_t[i], out=o[t].view(N, 2, 2 * dh))
        torch.sub(v2[t], pred[t].view(N, 2, dh), out=e_[t])
        torch.linalg.vecdot(e_d[t], e_d[t], out=sq_[t])
        torch.addcmul(neg_c, sq_[t], ivt_[t], out=z_[t])
        torch.sigmoid(z_[t], out=g_[t])
        if scale_ is not None:
            g_[t].mul_(scale_[t])
        torch.addcmul(base, g2[t], slope, out=c_[t])  # [N, 6]
        torch.mul(e_[t], c_lr[t], out=we[t])
        torch.mul(we_col[t], k3[t], out=outer)  # [lr_fast e_f k^T; g lr_deep e_d k^T]
        torch.addcmul(outer4, fd[i], c_fd[t], out=fd[j])
        d_[j].addcmul_(s_[i], c_mom[t])
        torch.addcmul(outer4[:, 1], s_[i], c_a[t], out=s_[j])
    reads = O[:, :, 0].view(T, B, H, 2, dh).permute(1, 0, 3, 2, 4).reshape(B, T, 2 * H * dh)
    final = Z[T if save else T % 2].view(B, H, 3, dh, S).permute(2, 0, 1, 3, 4).contiguous()
    saved = (QK, vt, ivt, Z, E, WE, zs, sq, coefs, keep, scale, gates) if save else (gates,)
    return reads, final, saved


def _one_step(q, k, v, fast, deep, mom, log_temperature, keep, scale, consts):
    """The acting step (``T = 1``, no gradient) of :func:`_step_loop_forward`, with the same arithmetic and
    without its sequence buffers: ``q, k: [B, 1, H, S]``, ``v: [B, 1, H, dh]``, ``keep, scale: [B * H]`` or
    None -> ``(reads [B, 1, 2 H dh], (fast, deep, momentum), gate [N])``."""
    B, _, H, S = q.shape
    dh, N = v.shape[-1], B * H
    lr_fast, lr_deep, decay, momentum, threshold = consts
    Z = torch.stack([fast, deep, mom], 2).view(N, 3, dh, S)
    if keep is not None:
        Z.mul_(keep[:, None, None, None])
    QK = torch.stack([q, k], 3).view(N, 2, S)
    v0 = v.reshape(N, 1, dh)
    out = torch.bmm(QK, Z[:, :2].reshape(N, 2 * dh, S).transpose(1, 2))  # [N, 2, 2 dh]
    e = v0 - out[:, 1].view(N, 2, dh)  # [N, 2, dh]
    e_d = e[:, 1]
    tau = log_temperature.exp()
    v_energy_tau = torch.linalg.vecdot(v0, v0).squeeze(1).add_(_EPS).mul_(tau)  # (|v|^2 + eps) tau
    g = torch.sigmoid(torch.addcdiv(-threshold / tau, torch.linalg.vecdot(e_d, e_d), v_energy_tau))
    if scale is not None:
        g = g * scale
    base, slope = _coefficients(consts, q)
    c = torch.addcmul(base, g[:, None], slope)
    we = e * c[:, 2:4, None]
    outer = (we.view(N, 2 * dh, 1) * QK[:, 1:]).view(N, 2, dh, S)  # [lr_fast e_f k^T; g lr_deep e_d k^T]
    nxt = torch.empty_like(Z)
    torch.addcmul(outer, Z[:, :2], c[:, :2, None, None], out=nxt[:, :2])
    nxt[:, 1].addcmul_(Z[:, 2], c[:, 4, None, None])
    torch.addcmul(outer[:, 1], Z[:, 2], c[:, 5, None, None], out=nxt[:, 2])
    reads = out[:, 0].view(B, 1, H, 2, dh).transpose(2, 3).reshape(B, 1, 2 * H * dh)
    return reads, nxt.view(B, H, 3, dh, S).unbind(2), g


def _step_loop_backward(ctx, grad_r, grad_final):
    QK, vt, ivt, Z, E, WE, zs, sq, coefs, keep, scale, gates = ctx.saved_tensors
    lr_fast, lr_deep, decay, momentum, threshold = ctx.consts
    B, T, H, S = ctx.shape
    N, dh = B * H, vt.shape[-1]
    # d gate / d z = sigmoid'(z) * scale
    sig = torch.sigmoid(zs)
    dgate = sig * (1 - sig)
    if scale is not None:
        dgate = dgate * scale
    neg_ivt2 = -2 * ivt
    neg_lr = -coefs[:, :, 2:4, None]  # [T, N, 2, 1]
    # GO[t]: grads of [reads; predictions] of step t; predictions enter as e = v - p, so row 1 is -de
    GO = Z.new_zeros(T, N, 2, 2 * dh)
    if grad_r is not None:
        GO[:, :, 0] = grad_r.reshape(B, T, 2, H, dh).permute(1, 0, 3, 2, 4).reshape(T, N, 2 * dh)
    GK = Z.new_empty(T, N, 1, S)  # grads of k through the writes
    UK = Z.new_empty(T, N, 1, 2 * dh)  # [gU_f k; gU_d k]
    INNER = Z.new_empty(T, N, 2, 2)
    GG = Z.new_empty(T, N)  # grads of the deep gates
    g_buf = Z.new_empty(2, N, 3, dh, S)
    if grad_final is None:
        g_buf[T % 2].zero_()
    else:
        g_buf[T % 2].view(B, H, 3, dh, S).copy_(grad_final.permute(1, 2, 0, 3, 4))
    # per-step views (g_*: the two gradient buffers, indexed by parity)
    g_all, g_fd, g_d, g_s = g_buf.unbind(0), g_buf[:, :, :2].unbind(0), g_buf[:, :, 1].unbind(0), g_buf[:, :, 2].unbind(0)
    g_fdm = g_buf[:, :, :2].reshape(2, N, 2 * dh, S).unbind(0)
    g_fdm_t = g_buf[:, :, :2].reshape(2, N, 2 * dh, S).transpose(2, 3).unbind(0)
    g_pair = g_buf[:, :, 1:3].reshape(2, N, 2, dh * S).unbind(0)
    z_pair_t = Z[:, :, 1:3].reshape(T + 1, N, 2, dh * S).transpose(2, 3).unbind(0)
    qk, k3 = QK.unbind(0), QK[:, :, 1, None, :].unbind(0)
    e_d, we_row = E[:, :, 1].unbind(0), WE.view(T, N, 1, 2 * dh).unbind(0)
    c_fd, c_mom, c_a = (coefs[:, :, :2, None, None].unbind(0), coefs[:, :, 4, None, None].unbind(0),
                        coefs[:, :, 5, None, None].unbind(0))
    neg_lr_ = neg_lr.unbind(0)
    go_t, go_pred = GO.transpose(2, 3).unbind(0), GO[:, :, 1].view(T, N, 2, dh).unbind(0)
    go_pred_d = GO[:, :, 1, dh:].unbind(0)
    gk_, uk, uk2, uk_d = GK.unbind(0), UK.unbind(0), UK.view(T, N, 2, dh).unbind(0), UK[:, :, 0, dh:].unbind(0)
    inner_, inner4 = INNER.unbind(0), INNER.view(T, N, 4).unbind(0)
    gg_, dz_ivt2_ = GG.unbind(0), (dgate * neg_ivt2).unbind(0)
    keep_ = None if keep is None else keep[:, :, None, None, None].unbind(0)
    inner_w = Z.new_tensor([-decay, momentum, 0.0, -(1 - momentum)])  # d/dg of (D', S') against <gD', .>, <gS', .>
    for t in range(T - 1, -1, -1):
        n, c = (t + 1) % 2, t % 2  # gradient buffers: after the step (given), before it (computed)
        # <gD', D>, <gD', S>, <gS', D>, <gS', S>: the gate's path through the forgetting and the momentum
        torch.bmm(g_pair[n], z_pair_t[t], out=inner_[t])
        # the step's own grads into the pre-step state: F <- (1 - decay), D <- b, S <- a S' + c D'
        torch.mul(g_fd[n], c_fd[t], out=g_fd[c])
        torch.mul(g_s[n], c_a[t], out=g_s[c])
        g_s[c].addcmul_(g_d[n], c_mom[t])
        g_d[n].add_(g_s[n])  # g_fd[n] = grads of the written outer products (fast, deep)
        torch.bmm(k3[t], g_fdm_t[n], out=uk[t])
        torch.bmm(we_row[t], g_fdm[n], out=gk_[t])
        torch.mul(uk2[t], neg_lr_[t], out=go_pred[t])  # -de of both tiers through the writes
        ggate = torch.mv(inner4[t], inner_w, out=gg_[t])
        ggate.add_(torch.linalg.vecdot(e_d[t], uk_d[t]), alpha=lr_deep)
        go_pred_d[t].addcmul_(e_d[t], (ggate * dz_ivt2_[t])[:, None])  # through the surprise |e_d|^2
        # reads and predictions O = QK @ [F; D]^T
        g_fdm[c].add_(torch.bmm(go_t[t], qk[t]))
        if t in ctx.reset_steps:
            g_all[c].mul_(keep_[t])
    gz_all = GG * dgate  # grads of the gates' logits z
    gQK = torch.bmm(GO.view(T * N, 2, 2 * dh), Z[:T, :, :2].reshape(T * N, 2 * dh, S)).view(T, N, 2, S)
    gQK[:, :, 1] += GK.view(T, N, S)
    gq = gQK[:, :, 0].reshape(T, B, H, S).transpose(0, 1)
    gk = gQK[:, :, 1].reshape(T, B, H, S).transpose(0, 1)
    # v: the target of both tiers, and the surprise's denominator |v|^2 + eps
    gve = -gz_all * sq * ivt / (vt.pow(2).sum(-1) + _EPS)
    gv = 2 * vt * gve.unsqueeze(-1) - GO[:, :, 1].view(T, N, 2, dh).sum(2)
    gv = gv.reshape(T, B, H, dh).transpose(0, 1)
    g_logt = -(gz_all * zs).sum()
    gstate = g_buf[0].view(B, H, 3, dh, S)
    return (gq, gk, gv, gstate[:, :, 0], gstate[:, :, 1], gstate[:, :, 2], g_logt.reshape(()).to(Z.dtype),
            None, None, None, None)


@register_memory("miras")
class DualTierMiras(MemorySystem):
    """Fast + surprise-gated deep associative memory. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    ``y_t = LayerNorm(h_t + out_proj([fast.read(q_t); deep.read(q_t)]))`` with ``h_t = in_proj(x_t)``;
    the step's own key/value is written after the read, so ``y_t`` retrieves from steps ``< t``.
    ``chunk``: steps per chunk in sequence mode (see the module docstring); 1 is the exact step loop.
    """

    # chunk=1: the contract's step == sequence check is exact; chunked sequence mode is tested against
    # its own reference and bounded against the step loop in tests/test_miras.py
    trigger_path = "deep-tier write"
    test_kwargs = {"d_model": 16, "mem_slots": 8, "n_heads": 2, "chunk": 1}

    def __init__(self, d_in: int, d_model: int = 64, mem_slots: int = 16, n_heads: int = 4,
                 surprise_threshold: float = 0.5, lr_fast: float = 0.5, lr_deep: float = 0.5, decay: float = 0.01,
                 momentum: float = 0.5, temperature: float = 0.1, chunk: int = 1):
        super().__init__()
        d_model = check_int("miras: d_model", d_model, low=1)
        mem_slots = check_int("miras: mem_slots", mem_slots, low=1)
        n_heads = check_int("miras: n_heads", n_heads, low=1)
        if d_model % n_heads:
            raise ValueError(f"miras: d_model={d_model} must be divisible by n_heads={n_heads}")
        surprise_threshold = check_float("miras: surprise_threshold", surprise_threshold)
        lr_fast = check_float("miras: lr_fast", lr_fast, low=0.0, high=1.0)
        lr_deep = check_float("miras: lr_deep", lr_deep, low=0.0, high=1.0)
        decay = check_float("miras: decay", decay, low=0.0, high=1.0)
        momentum = check_float("miras: momentum", momentum, low=0.0, high=1.0)
        temperature = check_float("miras: temperature", temperature, low=MIN_TEMPERATURE,
                                  why="the surprise gate divides by it in float32")
        self.chunk = check_int("miras: chunk", chunk, low=1, high=MAX_CHUNK,
                               why="steps per chunk in sequence mode; 1 = the exact step loop")
        check_chunk_stable(self.chunk, lr_fast, lr_deep, momentum)
        self.d_in, self.d_out, self.d_model = d_in, d_model, d_model
        self.mem_slots, self.n_heads, self.d_head = mem_slots, n_heads, d_model // n_heads
        self.surprise_threshold, self.lr_fast, self.lr_deep = surprise_threshold, lr_fast, lr_deep
        self.decay, self.momentum = decay, momentum
        self.in_proj = nn.Identity() if d_in == d_model else nn.Linear(d_in, d_model)
        self.q_proj = nn.Linear(d_model, n_heads * mem_slots, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * mem_slots, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(2 * d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"

    def initial_state(self, batch_size, device=None):
        shape = (batch_size, self.n_heads, self.d_head, self.mem_slots)
        return TensorDict(
            {name: torch.zeros(shape, device=device) for name in ("fast", "deep", "deep_momentum")},
            batch_size=[batch_size],
        )

    # -- the pieces ------------------------------------------------------------------------------------

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h: [B, T, d_model]`` -> ``q, k: [B, T, n_heads, mem_slots]`` (unit length),
        ``v: [B, T, n_heads, d_head]``."""
        B, T, _ = h.shape
        H, S = self.n_heads, self.mem_slots
        # one matmul for the three projections, one normalisation for q and k
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qk, v = F.linear(h, weight).split([2 * H * S, self.d_model], -1)
        q, k = F.normalize(qk.view(B, T, 2 * H, S), dim=-1).view(B, T, 2, H, S).unbind(2)
        return q, k, v.view(B, T, H, self.d_head)

    @staticmethod
    def read(memory: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``memory: [..., d_head, S]``, ``query: [..., S]`` -> ``[..., d_head]``."""
        return (memory @ query.unsqueeze(-1)).squeeze(-1)

    def _gate(self, error: torch.Tensor, v_energy: torch.Tensor) -> torch.Tensor:
        """Surprise gate of a prediction error ``error: [..., d_head]`` with ``v_energy = |v|^2 + eps``."""
        surprise = error.pow(2).sum(-1) / v_energy
        return torch.sigmoid((surprise - self.surprise_threshold) / self.log_temperature.exp())

    def retrieve(self, h, state, is_init, chunk: int | None = None, gate_scale: torch.Tensor | None = None):
        """Run the memory over ``h: [B, T, d_model]``: ``-> (reads [B, T, 2 * d_model], next_state)``.

        ``reads[:, t]`` is ``[fast heads; deep heads]`` read before step t's write. ``chunk`` (default
        ``self.chunk``) picks the sequence-mode algorithm: 1 or T = 1 -> :meth:`scan_steps` (exact),
        else :meth:`scan_chunks`. ``gate_scale: [B, T]`` (optional) multiplies the deep-tier gate per row
        and step (0 = no deep write, no deep forgetting). Also sets ``self.last_write_rate``, the mean
        deep-tier gate of this call (detached), for logging.
        """
        if chunk is None:
            chunk = self.chunk
        else:
            chunk = check_int("miras: chunk", chunk, low=1, high=MAX_CHUNK)
            check_chunk_stable(chunk, self.lr_fast, self.lr_deep, self.momentum)
        q, k, v = self.project(h)
        if gate_scale is not None and tuple(gate_scale.shape) != tuple(h.shape[:2]):
            raise ValueError(f"miras: gate_scale must have shape [B, T]={tuple(h.shape[:2])}, "
                             f"got {tuple(gate_scale.shape)}")
        if h.shape[1] == 1 and gate_scale is not None and not bool(gate_scale.any()):
            return self.step_fast_only(q, k, v, state, is_init)  # no row writes the deep tier: skip its cost
        if chunk == 1 or h.shape[1] == 1:  # acting (T = 1) always takes the exact step
            return self.scan_steps(q, k, v, state, is_init, gate_scale)
        return self.scan_chunks(q, k, v, state, is_init, chunk, gate_scale)

    def scan_steps(self, q, k, v, state, is_init, gate_scale=None):
        """The exact step loop: ``q, k: [B, T, H, S]``, ``v: [B, T, H, d_head]`` -> ``(reads, next_state)``.

        Run by :class:`_StepLoop` (rows and heads flattened, the three matrices of a head stacked, a
        hand-written backward): with small tensors the cost of this loop is the number of ops per step.
        """
        B, T, H, _ = q.shape
        args = (q, k, v, state["fast"], state["deep"], state["deep_momentum"], self.log_temperature)
        consts = (self.lr_fast, self.lr_deep, self.decay, self.momentum, self.surprise_threshold)
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        if T == 1 and not grad:  # acting
            keep = (~is_init[:, 0]).to(q.dtype).repeat_interleave(H) if bool(is_init.any()) else None
            scale = None if gate_scale is None else gate_scale[:, 0].to(q.dtype).repeat_interleave(H)
            r, (fast, deep, mom), gates = _one_step(*args, keep, scale, consts)
            self.last_write_rate = gates.mean()
            return r, TensorDict({"fast": fast, "deep": deep, "deep_momentum": mom}, batch_size=state.batch_size)
        reset_steps = frozenset(is_init.any(0).nonzero().flatten().tolist())  # one host sync per call
        keep = (~is_init).to(q.dtype).t().repeat_interleave(H, 1) if reset_steps else None  # [T, B * H]
        scale = None if gate_scale is None else gate_scale.to(q.dtype).t().repeat_interleave(H, 1)
        if grad:
            r, final, gates = _StepLoop.apply(*args, keep, scale, consts, reset_steps)
        else:
            r, final, (gates,) = _step_loop_forward(*args, keep, scale, consts, reset_steps, save=False)
        self.last_write_rate = gates.mean().detach()
        fast, deep, mom = final.unbind(0)
        return r, TensorDict({"fast": fast, "deep": deep, "deep_momentum": mom}, batch_size=state.batch_size)

    def step_fast_only(self, q, k, v, state, is_init):
        """One step (``T = 1``) in which no row writes the deep tier: the same numbers as :meth:`scan_steps`
        with ``gate_scale = 0``, without computing the deep tier's prediction, gate and update (the path a
        trigger switches off; its FLOPs are what the trigger saves)."""
        keep = (~is_init[:, 0]).to(q.dtype)[:, None, None, None]
        fast, deep, mom = (state[key] * keep for key in ("fast", "deep", "deep_momentum"))
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]  # [B, H, S], [B, H, S], [B, H, d_head]
        out = fast @ torch.stack([q0, k0], -1)  # [B, H, d_head, 2]: read and predict
        error = v0 - out[..., 1]
        fast = torch.add(self.lr_fast * error.unsqueeze(-1) * k0.unsqueeze(-2), fast, alpha=1 - self.decay)
        self.last_write_rate = q.new_zeros(())
        r = torch.stack([out[..., 0], self.read(deep, q0)], 1).flatten(1).unsqueeze(1)  # [B, 1, 2 * d_model]
        return r, TensorDict({"fast": fast, "deep": deep, "deep_momentum": mom}, batch_size=state.batch_size)

    def scan_chunks(self, q, k, v, state, is_init, chunk, gate_scale=None):
        """Chunked sequence mode (same arguments and result as :meth:`scan_steps`).

        Per chunk of C steps (head h; steps j = 1..C; state 0 = the chunk start): ``e_j = v_j - M_0 k_j``
        (``M_0 := 0`` after a reset in the row), deep gate ``g_j`` from ``e_j``, and ``a_j = 1 - g_j (1 -
        momentum)``, ``b_j = 1 - g_j decay``, ``c_j = g_j momentum``, ``w_j = g_j lr_deep``. Then ``M_t =
        Pb[t, 0] M_0 + D[t, 0] S_0 + sum_s (Pb + D)[t, s] w_s e_s k_s^T`` with ``Pa, Pb`` the products of
        a, b over ``(s, t]`` and ``D[t, s] = sum_{s<j<=t} Pb[t, j] c_j Pa[j-1, s]`` (the momentum's path
        into M), all ``[C + 1, C + 1]`` per row and head, zero across a reset; the fast tier is the case
        g = 1, momentum 0, whose coefficients do not depend on the memory. Step j reads ``M_{j-1} q_j``:
        the chunk-start memory's read plus a ``k_s . q_j``-weighted sum over ``s < j``.
        """
        B, T, H, S = q.shape
        d = v.shape[-1]
        n = -(-T // chunk)
        C = chunk if n > 1 else T
        pad = n * C - T

        def chunked(x):  # [B, T, ...] -> [n, B, C, ...]; padded steps are identity steps (see `real`)
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x
            return x.view(B, n, C, *x.shape[2:]).transpose(0, 1)

        # state-independent pieces, for all chunks at once; heads next to batch: [n, B, H, C, .]
        qc, kc, vc = (chunked(x).transpose(2, 3) for x in (q, k, v))
        qk = torch.cat([qc, kc], -2).contiguous()  # [n, B, H, 2C, S]: read and predict in one matmul
        scores_qk = qc @ kc.transpose(-1, -2)  # [n, B, H, C, C]: q_j . k_s
        v_energy = vc.pow(2).sum(-1) + _EPS  # [n, B, H, C]
        reset = chunked(is_init)  # [n, B, C]
        real = chunked(torch.ones_like(is_init, dtype=q.dtype))  # 0 on padding
        scale = real if gate_scale is None else chunked(gate_scale.to(q.dtype)) * real
        tril = torch.ones(C + 1, C + 1, dtype=torch.bool, device=q.device).tril()
        seg_id = F.pad(reset.cumsum(-1), (1, 0))  # [n, B, C + 1]: episodes started so far in the chunk
        # segment[t, s], t >= s: no reset in steps (s, t], so state s still reaches state t
        segment = ((seg_id.unsqueeze(-1) == seg_id.unsqueeze(-2)) & tril).unsqueeze(2).to(q.dtype)
        fresh = segment[..., 1:, 0]  # [n, B, 1, C]: step j still sees the chunk-start state
        before = segment[..., 1:, 1:]  # [n, B, 1, C, C]: write s reaches step j's read (s < j, no reset between)
        keep = (~reset).to(q.dtype).unsqueeze(2)  # [n, B, 1, C]
        # the fast tier: decay 1 - decay per real step, write lr_fast e_j k_j^T
        Pf = _segment_products(1 - self.decay * real).unsqueeze(2) * segment  # [n, B, 1, C + 1, C + 1]
        attn_fast = self.lr_fast * Pf[..., :-1, 1:] * before * scores_qk  # [n, B, H, C, C]
        fast_read0, fast_keep, fast_write = Pf[..., :-1, 0] * fresh, Pf[..., -1, :1], self.lr_fast * Pf[..., -1, 1:]

        fast, deep, mom = state["fast"], state["deep"], state["deep_momentum"]  # [B, H, d_head, S]
        v2 = torch.cat([vc, vc], -1)  # [n, B, H, C, 2 d_head]: the target of both tiers
        reads, gates = [], []
        for i in range(n):
            start = qk[i] @ torch.cat([fast, deep, mom], -2).transpose(-1, -2)  # [B, H, 2C, 3 d_head]
            error = v2[i] - fresh[i].unsqueeze(-1) * start[..., C:, : 2 * d]  # [B, H, C, 2 d_head]
            e_fast, e_deep = error[..., :d], error[..., d:]
            read_fast = fast_read0[i].unsqueeze(-1) * start[..., :C, :d] + attn_fast[i] @ e_fast
            fast = fast_keep[i, ..., None] * fast + (e_fast * fast_write[i].unsqueeze(-1)).transpose(-1, -2) @ kc[i]
            # the deep tier: coefficients from the gate of this chunk's errors
            gate = self._gate(e_deep, v_energy[i]) * scale[i].unsqueeze(1)  # [B, H, C]
            gates.append(gate)
            Pa = _segment_products(1 - gate * (1 - self.momentum)) * segment[i]  # [B, H, C + 1, C + 1]
            Pb = _segment_products(1 - gate * self.decay) * segment[i]
            c = gate * self.momentum * keep[i]  # a reset at j cuts the momentum's path S_{j-1} -> M_j
            D = Pb[..., 1:] @ (c.unsqueeze(-1) * Pa[..., :-1, :])  # [B, H, C + 1, C + 1]
            W = Pb + D  # coefficient of u_s = w_s e_s k_s^T (s >= 1) in M_t
            w = self.lr_deep * gate
            attn_deep = W[..., :-1, 1:] * before[i] * w.unsqueeze(-2) * scores_qk[i]  # [B, H, C, C]
            read_deep = (Pb[..., :-1, 0] * fresh[i]).unsqueeze(-1) * start[..., :C, d : 2 * d] \
                + (D[..., :-1, 0] * fresh[i]).unsqueeze(-1) * start[..., :C, 2 * d :] + attn_deep @ e_deep
            reads.append(torch.cat([read_fast, read_deep], 1))  # [B, 2H, C, d_head]: fast heads, then deep
            # end state: M and S written from the same e_s k_s^T with their own coefficients, one matmul
            written = torch.cat([e_deep * (w * W[..., -1, 1:]).unsqueeze(-1),
                                 e_deep * (w * Pa[..., -1, 1:]).unsqueeze(-1)], -1).transpose(-1, -2) @ kc[i]
            deep, mom = (Pb[..., -1, :1, None] * deep + D[..., -1, :1, None] * mom + written[..., :d, :],
                         Pa[..., -1, :1, None] * mom + written[..., d:, :])
        self.last_write_rate = (torch.stack(gates).sum() / (B * H * T)).detach()  # padded steps have gate 0
        r = torch.stack(reads).transpose(2, 3).flatten(3)  # [n, B, C, 2 * d_model]
        r = r.transpose(0, 1).flatten(1, 2)[:, :T]  # [B, T, 2 * d_model]
        next_state = TensorDict({"fast": fast, "deep": deep, "deep_momentum": mom}, batch_size=state.batch_size)
        return r, next_state

    def forward(self, x, state, is_init, trigger=None):
        """``trigger: [B, T]`` bool (None: all True) switches the deep-tier write per row and step."""
        check_inputs(self, x, state, is_init)
        check_trigger(self, trigger, is_init)
        h = self.in_proj(x)
        r, next_state = self.retrieve(h, state, is_init, gate_scale=None if trigger is None else trigger.to(h.dtype))
        return self.norm(h + self.out_proj(r)), next_state
