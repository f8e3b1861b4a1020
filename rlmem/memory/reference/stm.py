"""STM, the slow and obvious way: the implementation :mod:`rlmem.memory.stm` had before its fast paths.

:class:`STMReference` subclasses :class:`rlmem.memory.stm.STM` (the same constructor, parameters,
``state_dict`` keys, state TensorDict, aux loss, ``train()`` keeping the generator in eval mode) and replaces
only the computation, written out as the maths says:

- **write** (:func:`write_reference`): per step, the gated cross-attention of the input into the K content
  slots, ``s_k <- s_k + g_k a_k (W_v e - s_k)`` with ``a = softmax_k((W_q LN(s_k) + p_k) . W_k e / sqrt(d))`` and
  ``g_k = sigmoid(W_g [LN(s_k); e] + b_g)``; the mode slot is carried along by concatenation;
- **Diffuser** (:func:`diffuser_reference`): ``c = E[i]; b = buf + r(buf) Attn(LN(buf) + c);
  out = b + r(b) MLP(LN(b) + c)`` (``r``: each slot's RMS), ``n_refine`` times, on the rows that ask;
- **Generator**: the frozen ``transformers`` model called as it is meant to be called
  (``generator(inputs_embeds=[mode | content | e] * input_scale)``), its last hidden state at the last
  position.

The loop over time resets the rows that start an episode, writes, and (``persist_refinement``) refines;
the refinement (otherwise) and the generator then run once over all ``B x T`` buffers.

Not registered as a memory system (build it directly, or name it by class path:
``memory: rlmem.memory.reference.stm:STMReference``). tests/test_stm_fast.py compares the fast module
against it in float64 (outputs, next states, aux loss, gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlmem.memory.base import check_inputs
from rlmem.memory.stm import STM, Diffuser, SlotWriter


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-row RMS over the last dim, ``[..., 1]``."""
    return x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # eps: a finite gradient at an empty slot


def write_reference(writer: SlotWriter, slots: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``slots: [B, K, d]``, ``e: [B, d]`` -> ``s_k + g_k a_k (W_v e - s_k)``."""
    h = writer.norm(slots)
    query = writer.query(h) + writer.slot_keys
    address = torch.softmax((query * writer.key(e).unsqueeze(1)).sum(-1) * writer.scale, -1)  # [B, K]
    gate = torch.sigmoid(writer.gate(torch.cat([h, e.unsqueeze(1).expand_as(h)], -1)))  # [B, K, 1]
    w = gate * address.unsqueeze(-1)
    return slots + w * (writer.value(e).unsqueeze(1) - slots)


def diffuser_reference(diffuser: Diffuser, buf: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
    """One Diffuser iteration, ``buf: [N, S, d]``, ``level``: int or ``[N]`` -> ``[N, S, d]``."""
    if isinstance(level, int):
        c = diffuser.levels.weight[level].view(1, 1, -1)
    else:
        c = diffuser.levels(level).unsqueeze(1)  # [N, 1, d]
    N, S, d = buf.shape
    h = diffuser.norm_attn(buf) + c
    q, k, v = diffuser.qkv(h).view(N, S, 3, diffuser.n_heads, d // diffuser.n_heads).permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v)  # [N, heads, S, d / heads], every slot sees every slot
    buf = buf + _rms(buf) * diffuser.out(attn.transpose(1, 2).reshape(N, S, d))
    return buf + _rms(buf) * diffuser.ff(diffuser.norm_ff(buf) + c)


class STMReference(STM):
    """The step-by-step STM (module docstring): same parameters and state as :class:`~rlmem.memory.stm.STM`."""

    def write(self, buf: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``buf: [B, K+1, d]``, ``e: [B, d]`` -> the buffer with ``e`` written into its content slots."""
        return torch.cat([buf[:, :1], write_reference(self.writer, buf[:, 1:], e)], 1)

    def refine(self, buf: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``n_refine`` Diffuser iterations on the rows where ``rows: [B]`` is True (None: all)."""
        if self.diffuser is None:
            return buf
        if rows is None or bool(rows.all()):
            for i in range(self.n_refine):
                buf = diffuser_reference(self.diffuser, buf, i)
            return buf
        index = rows.nonzero().squeeze(1)
        if index.numel() == 0:
            return buf
        sub = buf.index_select(0, index)
        for i in range(self.n_refine):
            sub = diffuser_reference(self.diffuser, sub, i)
        return buf.index_copy(0, index, sub)

    def read(self, buf: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The generator on ``[mode | content | e]``: ``buf: [N, K+1, d]``, ``e: [N, d]`` -> ``[N, d]``."""
        tokens = self.to_generator(torch.cat([buf, e.unsqueeze(1)], 1)) * self.input_scale  # [N, K+2, hidden]
        hidden = self.generator(inputs_embeds=tokens, use_cache=False).last_hidden_state
        return self.from_generator(hidden[:, -1])

    def denoising_loss(self, clean: torch.Tensor) -> torch.Tensor:
        """Noise ``clean: [N, K+1, d]`` at a random iteration's level, relative squared error of ``D``'s answer."""
        clean = clean.detach()
        level = torch.randint(self.n_refine, (clean.shape[0],), device=clean.device)
        sigma = self.aux_noise * (self.n_refine - level).to(clean.dtype) / self.n_refine  # first iteration: noisiest
        rms = clean.pow(2).mean((1, 2), keepdim=True).sqrt()
        noisy = clean + sigma.view(-1, 1, 1) * rms * torch.randn_like(clean)
        return F.mse_loss(diffuser_reference(self.diffuser, noisy, level), clean) / clean.pow(2).mean().clamp_min(1e-12)

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
        init = self.initial_state(B, x.device)["buffer"] if any(resets) else None
        bufs = []
        for t in range(T):
            if resets[t]:
                buf = torch.where(is_init[:, t].view(B, 1, 1), init, buf)
            buf = self.write(buf, e[:, t])
            if self.persist_refinement:
                buf = self.refine(buf, None if refine is None else refine[:, t])
            bufs.append(buf)
        seen = torch.stack(bufs, 1).flatten(0, 1)  # [B * T, K+1, d]
        if not self.persist_refinement:  # the refined view is read only: all steps in one batch
            seen = self.refine(seen, None if refine is None else refine.flatten())
        y = self.read(seen, e.flatten(0, 1)).view(B, T, self.d_model)
        self._aux.value = None
        if self.aux_coef > 0 and self.diffuser is not None and self.training and torch.is_grad_enabled():
            self._aux.value = self.aux_coef * self.denoising_loss(seen)
        return y, TensorDict({"buffer": buf}, batch_size=state.batch_size)
