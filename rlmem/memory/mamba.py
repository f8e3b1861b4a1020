"""Mamba: a selective state-space model (Gu & Dao 2023) with its full recurrent state in a TensorDict.

Per layer (pre-norm residual block ``h <- h + Mixer(RMSNorm(h))``, final RMSNorm):

- ``in_proj``: ``d_model -> (x, z)``, each ``d_inner = expand * d_model``;
- causal depthwise conv1d over ``x`` (kernel ``d_conv``), then SiLU -> ``u``; its last ``d_conv - 1``
  inputs are part of the state, so one step sees the same window as the sequence does;
- selective SSM: ``(dt, B, C) = x_proj(u)``, ``delta = softplus(dt_proj(dt))`` (input-dependent),
  ``A = -exp(A_log)`` diagonal, ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``;
- output ``out_proj(y * SiLU(z))``.

The recurrence runs as :class:`_SelectiveScan`: one in-place ``addcmul`` per step over ``[B, N, D]``
(measured on a CPU, one thread, a ``[16, 64]`` batch at ``d_inner 64, d_state 8``: faster forward and
backward than parallel Hillis-Steele rounds, whose every round is a pass over the whole
``[B, T, d_inner, d_state]`` sequence) with a hand-written backward; acting (T=1 without gradients) runs
the same arithmetic as one step without the autograd Function (:func:`_selective_step`; constant time per
step). :func:`linear_scan`, the chunked parallel scan, is StreamingSSM's.
Episode starts inside a sequence zero the decay at that step (so ``h`` restarts from the zero initial
state) and mask conv inputs from before the start. On CUDA with ``mamba_ssm`` installed, sequences that
start fresh in every row and contain no other reset use its fused selective-scan kernel.

State (``L = n_layers``): ``conv: [B, L, d_inner, d_conv - 1]``, ``ssm: [B, L, d_inner, d_state]``.

Readable reference (a plain loop over time on this module's parameters): :mod:`rlmem.memory.reference.mamba`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn
from torch.autograd.function import once_differentiable

from rlmem.validate import check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory


#: steps per chunk of the sequence-mode scan (parallel inside a chunk, carried across chunks). On this
#: 2-core CPU a full-length parallel scan was measured ~2x slower than chunks of 8: its O(T log T) passes
#: over the [B, T, d_inner, d_state] tensors cost more than the T / 8 Python iterations save.
SCAN_CHUNK = 8


def _parallel_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele prefix scan over ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``: ``ceil(log2 T)`` rounds
    of whole-tensor ops. Only products of the ``a`` (decays in [0, 1]) are formed, never their logs, so a
    zero decay (an episode start) is exact and nothing overflows."""
    T, span = a.shape[1], 1
    while span < T:
        # b uses the a of the previous round, so it is updated first
        b = torch.cat([b[:, :span], torch.addcmul(b[:, span:], a[:, span:], b[:, :-span])], 1)
        a = torch.cat([a[:, :span], a[:, span:] * a[:, :-span]], 1)
        span *= 2
    return torch.addcmul(b, a, h0.unsqueeze(1))


def _chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int) -> torch.Tensor:
    out, h = torch.empty_like(b), h0
    for start in range(0, a.shape[1], chunk):
        block = _parallel_scan(a[:, start : start + chunk], b[:, start : start + chunk], h)
        out[:, start : start + chunk] = block
        h = block[:, -1]
    return out


class _LinearScan(torch.autograd.Function):
    """The scan with a hand-written backward: autograd through the parallel scan would keep every
    round's intermediates; the gradient of a linear recurrence is the same recurrence run backwards,
    ``g_t = dL/dh_t + a_{t+1} g_{t+1}``, so only ``a`` and ``h`` are saved."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = _chunked_scan(a, b, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        g = _chunked_scan(a_next.flip(1), grad_h.flip(1), torch.zeros_like(h0), ctx.chunk).flip(1)
        grad_a = g * torch.cat([h0.unsqueeze(1), h[:, :-1]], 1) if ctx.needs_input_grad[0] else None
        grad_h0 = a[:, 0] * g[:, 0] if ctx.needs_input_grad[2] else None
        return grad_a, g, grad_h0, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """All ``h_t = a_t * h_{t-1} + b_t`` of a sequence, with ``h_{-1} = h0``.

    ``a, b: [B, T, *S]``, ``h0: [B, *S]`` -> ``h: [B, T, *S]``. Chunks of ``chunk`` steps are scanned in
    parallel (``log2(chunk)`` rounds) and carried one to the next; ``chunk >= T`` is one parallel scan.
    """
    return _LinearScan.apply(a, b, h0, chunk)


def _selective_step(u, delta, A, Bm, Cm, h0, keep):
    """One step (``T = 1``, no gradient) of :class:`_SelectiveScan`, the same arithmetic without the
    autograd Function around it: same arguments, ``-> (y: [B, 1, D], h: [B, D, N])``."""
    decay = torch.mul(delta.unsqueeze(2), A.t().contiguous()).exp_()  # [B, 1, N, D]
    if keep is not None:
        decay.mul_(keep[:, :, None, None])
    h = torch.mul((delta * u).unsqueeze(2), Bm.unsqueeze(-1))[:, 0]  # [B, N, D]
    h.addcmul_(decay[:, 0], h0.transpose(1, 2))
    return torch.bmm(Cm, h), h.transpose(1, 2)


class _SelectiveScan(torch.autograd.Function):
    """Mamba's selective scan with a hand-written backward, for the CPU (and any device without the
    fused kernel): ``u, delta: [B, T, D]``, ``A: [D, N]``, ``Bm, Cm: [B, T, N]``, ``h0: [B, D, N]``,
    ``keep: [B, T]`` float or None -> ``(y: [B, T, D] = C_t h_t, h_T: [B, D, N])``.

    The ``[B, T, D, N]`` tensors are laid out ``[B, T, N, D]`` inside (every broadcast then runs along the
    contiguous ``D``), the recurrence is one in-place ``addcmul`` per step, and the backward is the same
    recurrence reversed (``g_t = dL/dh_t + a_{t+1} g_{t+1}``) with every gradient formed from ``g``."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0, keep):
        B, T, D = u.shape
        N = A.shape[1]
        At = A.t().contiguous()  # [N, D]
        decay = torch.mul(delta.unsqueeze(2), At).exp_()  # [B, T, N, D]
        if keep is not None:
            decay.mul_(keep[:, :, None, None])  # h restarts from zero at episode starts
        du = delta * u
        H = torch.mul(du.unsqueeze(2), Bm.unsqueeze(-1))  # the drive, scanned in place into h
        h0t = h0.transpose(1, 2)
        H[:, 0].addcmul_(decay[:, 0], h0t)
        for t in range(1, T):
            H[:, t].addcmul_(decay[:, t], H[:, t - 1])
        y = torch.bmm(Cm.reshape(B * T, 1, N), H.view(B * T, N, D)).view(B, T, D)
        ctx.save_for_backward(u, delta, At, Bm, Cm, h0t, decay, H, du)
        return y, H[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hT):
        u, delta, At, Bm, Cm, h0t, decay, H, du = ctx.saved_tensors
        T = u.shape[1]
        G = torch.mul(Cm.unsqueeze(-1), grad_y.unsqueeze(2))  # dL/dh_t through y_t, then the total
        G[:, -1] += grad_hT.transpose(1, 2)
        scratch = torch.mul(H, grad_y.unsqueeze(2))
        grad_C = scratch.sum(-1)
        for t in range(T - 2, -1, -1):
            G[:, t].addcmul_(decay[:, t + 1], G[:, t + 1])
        grad_h0 = (G[:, 0] * decay[:, 0]).transpose(1, 2)
        grad_du = torch.mul(G, Bm.unsqueeze(-1), out=scratch).sum(2)
        grad_B = torch.mul(G, du.unsqueeze(2), out=scratch).sum(-1)
        # d/d(delta A) of decay = exp(delta A) * keep is decay itself: G <- g_t h_{t-1} decay_t
        G.mul_(decay)
        G[:, 1:].mul_(H[:, :-1])
        G[:, 0].mul_(h0t)
        grad_delta = torch.mul(G, At, out=scratch).sum(2).addcmul_(grad_du, u)
        grad_A = torch.mul(G, delta.unsqueeze(2), out=scratch).sum((0, 1)).t()
        return grad_du * delta, grad_delta, grad_A, grad_B, grad_C, grad_h0, None


def episode_ids(is_init: torch.Tensor, n_before: int) -> torch.Tensor:
    """``is_init: [B, T] -> [B, n_before + T]`` episode index of every position; the ``n_before``
    buffered positions (from the state) belong to the episode that was running before the sequence."""
    seg = is_init.long().cumsum(1)
    return torch.cat([seg.new_zeros(seg.shape[0], n_before), seg], 1)


def causal_depthwise_conv(
    x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seg: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv whose left context comes from the state.

    ``x: [B, T, C]``, ``buffer: [B, C, k-1]`` (the last k-1 inputs), ``weight: [C, k]``, ``bias: [C]``,
    ``seg: [B, k-1+T]`` episode ids (None: no reset anywhere) -> ``(y: [B, T, C], next buffer [B, C, k-1])``.
    Inputs from another episode than the output's are masked out, which is what resetting the buffer to
    zeros at the episode start does when stepping.
    """
    k = weight.shape[1]
    if x.shape[1] == 1:  # one step (acting): the window is the buffer and the input
        if seg is not None:  # an episode start empties the buffer
            buffer = buffer * (seg[:, -1] == seg[:, -2]).to(x.dtype)[:, None, None]
        full = torch.cat([buffer, x.transpose(1, 2)], 2)  # [B, C, k]
        return ((full * weight).sum(-1) + bias).unsqueeze(1), full[:, :, 1:]
    full = torch.cat([buffer.transpose(1, 2), x], 1)  # [B, k-1+T, C]
    tail = full[:, full.shape[1] - (k - 1) :]
    same = None
    if seg is not None:
        same = (seg.unfold(1, k, 1) == seg[:, k - 1 :, None]).to(x.dtype)  # [B, T, k]: tap j is in t's episode
        tail = tail * (seg[:, seg.shape[1] - (k - 1) :] == seg[:, -1:]).unsqueeze(-1).to(x.dtype)
    y = _DepthwiseConv.apply(full, weight, bias, same)
    return y, tail.transpose(1, 2)


class _DepthwiseConv(torch.autograd.Function):
    """``y[:, t] = bias + sum_j weight[:, j] * full[:, t + j] * same[:, t, j]`` as ``k`` shifted multiply-adds
    (forward and a hand-written backward) instead of an unfolded ``[B, T, C, k]`` window tensor:
    ``full: [B, k-1+T, C]``, ``weight: [C, k]``, ``bias: [C]``, ``same: [B, T, k]`` or None."""

    @staticmethod
    def forward(ctx, full, weight, bias, same):
        k = weight.shape[1]
        T = full.shape[1] - (k - 1)
        y = bias.expand(full.shape[0], T, -1).clone()
        taps = []
        for j in range(k):
            tap = full[:, j : j + T] if same is None else full[:, j : j + T] * same[:, :, j, None]
            y.addcmul_(tap, weight[:, j])
            taps.append(tap)
        ctx.save_for_backward(weight, same, *taps)
        ctx.full_shape = full.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        weight, same, *taps = ctx.saved_tensors
        k = weight.shape[1]
        T = grad_y.shape[1]
        grad_full = grad_y.new_zeros(ctx.full_shape)
        grad_w = torch.empty_like(weight)
        for j in range(k):
            g = grad_y if same is None else grad_y * same[:, :, j, None]
            grad_full[:, j : j + T].addcmul_(g, weight[:, j])
            grad_w[:, j] = (grad_y * taps[j]).sum((0, 1))
        return grad_full, grad_w, grad_y.sum((0, 1)), None


@functools.cache
def _cuda_selective_scan():
    """``mamba_ssm``'s fused selective scan, or None when it is not installed (it needs its CUDA build)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn


def _kernel_applies(ssm_state: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """True when ``mamba_ssm`` is importable and the scan starts from zero with no reset after t=0."""
    if _cuda_selective_scan() is None or (keep is not None and not bool(keep[:, 1:].all())):
        return False
    h0 = ssm_state if keep is None else ssm_state * keep[:, :1, None]  # a reset at t=0 zeroes h0
    return not bool(h0.any())


class MambaMixer(nn.Module):
    """One Mamba mixer. ``x: [B, T, d_model]`` -> ``[B, T, d_model]`` plus its next (conv, ssm) state."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int,
                 dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)  # weights only; applied by hand
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        # Mamba's initialisation: delta starts log-uniform in [dt_min, dt_max], A_n = -n (S4D-real)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x, conv_state, ssm_state, seg, keep):
        """``x: [B, T, d_model]``, ``conv_state: [B, d_inner, d_conv-1]``, ``ssm_state: [B, d_inner, d_state]``,
        ``seg: [B, d_conv-1+T]`` or None, ``keep: [B, T]`` float (0 where an episode starts) or None."""
        xs, z = self.in_proj(x).chunk(2, -1)
        u, conv_state = causal_depthwise_conv(xs, conv_state, self.conv.weight.squeeze(1), self.conv.bias, seg)
        u = F.silu(u)  # [B, T, d_inner]
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = F.softplus(self.dt_proj(dt))  # [B, T, d_inner]
        A = -torch.exp(self.A_log)  # [d_inner, d_state]
        if x.is_cuda and _kernel_applies(ssm_state, keep):
            # the fused kernel starts from h = 0 and knows no resets: fresh sequences without inner resets
            u_, delta_, B_, C_ = (t.transpose(1, 2).contiguous() for t in (u, delta, Bm, Cm))  # [B, *, T]
            y, ssm_state = _cuda_selective_scan()(u_, delta_, A, B_, C_, self.D, return_last_state=True)
            y = y.transpose(1, 2)
        else:
            step = x.shape[1] == 1 and not torch.is_grad_enabled()  # acting
            y, ssm_state = (_selective_step if step else _SelectiveScan.apply)(u, delta, A, Bm, Cm, ssm_state, keep)
            y = y + self.D * u
        return self.out_proj(y * F.silu(z)), conv_state, ssm_state


class ResidualScanStack(MemorySystem):
    """Shared body of Mamba and StreamingSSM: ``Linear`` embedding, then pre-norm residual layers
    ``h <- h + layer(RMSNorm(h))``, final RMSNorm. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    Every layer is called as ``layer(x, conv_state, scan_state, seg, keep) -> (out, conv_state, scan_state)``;
    the state stacks them over layers: ``conv: [B, L, d_inner, d_conv - 1]`` and
    ``<scan_key>: [B, L, *scan_shape]``, zero at episode start.
    """

    scan_key: str

    def __init__(self, d_in: int, d_model: int, layers: list[nn.Module], d_inner: int, d_conv: int,
                 scan_shape: tuple[int, ...]):
        super().__init__()
        self.d_in, self.d_out, self.d_model, self.n_layers = d_in, d_model, d_model, len(layers)
        self.d_inner, self.d_conv, self.scan_shape = d_inner, d_conv, scan_shape
        self.embed = nn.Linear(d_in, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in layers)
        self.layers = nn.ModuleList(layers)
        self.norm_f = nn.RMSNorm(d_model)

    def initial_state(self, batch_size, device=None):
        L = self.n_layers
        return TensorDict(
            {
                "conv": torch.zeros(batch_size, L, self.d_inner, self.d_conv - 1, device=device),
                self.scan_key: torch.zeros(batch_size, L, *self.scan_shape, device=device),
            },
            batch_size=[batch_size],
        )

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        resets = bool(is_init.any())
        seg = episode_ids(is_init, self.d_conv - 1) if resets else None
        keep = (~is_init).to(x.dtype) if resets else None
        h = self.embed(x)
        convs, scans = [], []
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            out, conv, scan = layer(norm(h), state["conv"][:, i], state[self.scan_key][:, i], seg, keep)
            h = h + out
            convs.append(conv)
            scans.append(scan)
        next_state = {"conv": torch.stack(convs, 1), self.scan_key: torch.stack(scans, 1)}
        return self.norm_f(h), TensorDict(next_state, batch_size=state.batch_size)


@register_memory("mamba")
class MambaMemory(ResidualScanStack):
    """Stack of Mamba blocks. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    State: ``conv: [B, n_layers, d_inner, d_conv - 1]``, ``ssm: [B, n_layers, d_inner, d_state]``,
    zero at episode start; ``d_inner = expand * d_model``.
    """

    scan_key = "ssm"
    test_kwargs = {"d_model": 16, "n_layers": 2, "d_state": 4, "d_conv": 3, "expand": 2}

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 1, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | None = None):
        d_model = check_int("mamba: d_model", d_model, low=1)
        n_layers = check_int("mamba: n_layers", n_layers, low=1)
        d_state = check_int("mamba: d_state", d_state, low=1)
        d_conv = check_int("mamba: d_conv", d_conv, low=2)
        expand = check_int("mamba: expand", expand, low=1)
        if dt_rank is None:
            dt_rank = math.ceil(d_model / 16)
        dt_rank = check_int("mamba: dt_rank", dt_rank, low=1, why="or null for ceil(d_model / 16)")
        layers = [MambaMixer(d_model, d_state, d_conv, expand, dt_rank) for _ in range(n_layers)]
        super().__init__(d_in, d_model, layers, expand * d_model, d_conv, (expand * d_model, d_state))
        self.d_state = d_state
