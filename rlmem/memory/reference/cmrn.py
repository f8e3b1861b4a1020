"""CMRN, the slow and obvious way: one Python step per time step, a loop over the experts inside.

This is the implementation :mod:`rlmem.memory.cmrn` had before it was vectorized over time, kept as the
readable statement of what the fast one computes. :class:`CMRNReference` subclasses
:class:`rlmem.memory.cmrn.CMRN` (the same constructor, parameters, ``state_dict`` keys, state TensorDict,
aux losses and diagnostics) and replaces only ``forward``: per step, reset the rows that start an episode,
update the clockwork GRU cells whose step it is, route, and for each expert gather the rows that chose it
(``nonzero`` + indexing; ``dispatch="dense"``: every row, masked), read its slots
(:func:`~rlmem.memory.cmrn.read_slots`), run its core, refresh and write its least-recently-used slot
(:func:`~rlmem.memory.cmrn.lru_update`) and scatter the gated output back.

Not registered as a memory system (build it directly, or name it by class path:
``memory: rlmem.memory.reference.cmrn:CMRNReference``). tests/test_cmrn_fast.py compares the fast module
against it in float64 (outputs, states, aux losses, diagnostics, gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlmem.memory.base import check_inputs, check_trigger
from rlmem.memory.cmrn import CMRN, _LastCall, lru_update, read_slots


class CMRNReference(CMRN):
    """The per-step CMRN (module docstring): same parameters and state as :class:`~rlmem.memory.cmrn.CMRN`."""

    def forward(self, x, state, is_init, top_k: torch.Tensor | None = None, trigger: torch.Tensor | None = None):
        """``x: [B, T, d_in]``, ``is_init: [B, T]``, ``top_k: [B, T]`` integer experts per token (1 ..
        n_experts) or None for the configured ``top_k`` -> ``(y: [B, T, d_model], next_state)``.
        ``trigger: [B, T]`` bool (the contract's switch; give it or ``top_k``): the configured ``top_k``
        experts where True, one where False."""
        check_inputs(self, x, state, is_init)
        if trigger is not None:
            check_trigger(self, trigger, is_init)
            if top_k is not None:
                raise ValueError("cmrn: give top_k or trigger, not both")
            top_k = torch.where(trigger, self.top_k, 1)
        B, T = x.shape[:2]
        k_rows = self._check_top_k_ref(top_k, B, T, x.device)
        h, count = state["h"], state["count"]
        mem = [list(state[key].unbind(1)) for key in ("mem_k", "mem_v", "mem_used")]  # per expert [B, S, ...]
        stats = {"prob_sum": 0, "lse2_sum": 0, "entropy_sum": 0, "assigned": 0}
        ys = []
        for t in range(T):
            y, h, count = self._step(x[:, t], h, count, mem, is_init[:, t], None if k_rows is None else k_rows[:, t],
                                     stats)
            ys.append(y)
        next_state = TensorDict(
            {"h": h, "count": count, "mem_k": torch.stack(mem[0], 1), "mem_v": torch.stack(mem[1], 1),
             "mem_used": torch.stack(mem[2], 1)},
            batch_size=state.batch_size,
        )
        self._last = _LastCall(n_tokens=B * T, **stats)
        return torch.stack(ys, 1), next_state

    def _check_top_k_ref(self, top_k, B, T, device) -> torch.Tensor | None:
        if top_k is None:
            return None
        top_k = torch.as_tensor(top_k, device=device)
        if top_k.is_floating_point() or top_k.dtype == torch.bool:
            raise ValueError(f"cmrn: top_k must be an integer tensor [B, T], got dtype {top_k.dtype}")
        if tuple(top_k.shape) != (B, T):
            raise ValueError(f"cmrn: top_k must have shape [B, T]={[B, T]}, got {list(top_k.shape)}")
        low, high = int(top_k.min()), int(top_k.max())
        if low < 1 or high > self.n_experts:
            raise ValueError(f"cmrn: top_k values must be in [1, n_experts={self.n_experts}], got {low}..{high}")
        return top_k.long()

    def _step(self, x, h, count, mem, is_init, k_row, stats):
        """One step: ``x: [B, d_in]``, ``h: [B, L, d]``, ``count: [B]``, ``mem``: per-expert lists (updated in
        the list, never in place), ``is_init: [B]``, ``k_row: [B]`` or None -> ``(y [B, d], h, count)``."""
        E, keys, values, used = self.n_experts, *mem
        if bool(is_init.any()):  # the initial state is all zeros
            keep = ~is_init
            h = torch.where(keep.view(-1, 1, 1), h, 0)
            count = torch.where(keep, count, 0)
            for e in range(E):
                keys[e] = torch.where(keep.view(-1, 1, 1), keys[e], 0)
                values[e] = torch.where(keep.view(-1, 1, 1), values[e], 0)
                used[e] = torch.where(keep.view(-1, 1), used[e], 0)

        # 1. temporal abstraction: layer i updates where count % 2^i == 0, else keeps its state exactly
        e_t = self.embed(x)
        below, hs = e_t, []
        for i, cell in enumerate(self.temporal):
            h_i = h[:, i]
            update = count % (2**i) == 0
            if i == 0 or bool(update.any()):
                h_i = torch.where(update.unsqueeze(1), cell(below, h_i), h_i)
            hs.append(h_i)
            below = h_i
        z = self.norm_z(self.mix(torch.cat(hs, -1)) + e_t)

        # 2. router
        logits = self.router(z)  # [B, E]
        noisy = logits
        if self.training and self.router_noise > 0:
            noisy = logits + self.router_noise * torch.randn_like(logits) * F.softplus(self.noise(z))
        k_max = self.top_k if k_row is None else int(k_row.max())
        top_vals, top_idx = noisy.topk(k_max, -1)  # [B, k]
        chosen = None if k_row is None else torch.arange(k_max, device=x.device) < k_row.unsqueeze(1)
        if chosen is not None:
            top_vals = top_vals.masked_fill(~chosen, float("-inf"))  # column 0 is always chosen (k >= 1)
        gates = torch.softmax(top_vals, -1)  # renormalized over the chosen experts
        # the aux losses shape the router, not the features the experts and the policy read: they see the
        # router's logits of detached features (same values), so their steady pull cannot drift the trunk
        aux_logits = self.router(z.detach())
        probs = torch.softmax(aux_logits, -1)
        hit = F.one_hot(top_idx, E).to(torch.bool)  # [B, k, E]
        if chosen is not None:
            hit = hit & chosen.unsqueeze(-1)
        gate_e = (gates.unsqueeze(-1) * hit).sum(1)  # [B, E]: each expert's gate, 0 if not chosen
        hit_e = hit.any(1)  # [B, E]
        stats["prob_sum"] = stats["prob_sum"] + probs.sum(0)
        stats["lse2_sum"] = stats["lse2_sum"] + torch.logsumexp(aux_logits, -1).pow(2).sum()
        stats["entropy_sum"] = stats["entropy_sum"] + (-(probs * probs.clamp_min(1e-12).log()).sum(-1)).sum().detach()
        stats["assigned"] = stats["assigned"] + hit_e.sum(0).detach()

        # 3. experts: read, compute, write (sparse: only the rows that chose the expert)
        stamp = count + 1
        moe = torch.zeros_like(z)
        for e, expert in enumerate(self.experts):
            if self.dispatch == "sparse":
                rows = hit_e[:, e].nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                z_e, K, V, U, st = z[rows], keys[e][rows], values[e][rows], used[e][rows], stamp[rows]
            else:
                rows, z_e, K, V, U, st = None, z, keys[e], values[e], used[e], stamp
            read, w = read_slots(expert.w_q(z_e), K, V, U, expert.scale)
            o = expert.core(torch.cat([z_e, read], -1))
            U_new, slot = lru_update(U, w, st)
            idx = slot.view(-1, 1, 1)
            K_new = K.scatter(1, idx.expand(-1, 1, K.shape[-1]), expert.w_k(z_e).unsqueeze(1))
            V_new = V.scatter(1, idx.expand(-1, 1, V.shape[-1]), expert.w_v(z_e).unsqueeze(1))
            if rows is None:  # dense: every row computed, only the rows that chose the expert keep the write
                m = hit_e[:, e]
                keys[e] = torch.where(m.view(-1, 1, 1), K_new, K)
                values[e] = torch.where(m.view(-1, 1, 1), V_new, V)
                used[e] = torch.where(m.view(-1, 1), U_new, U)
                moe = moe + gate_e[:, e : e + 1] * o
            else:
                keys[e] = keys[e].index_put((rows,), K_new)
                values[e] = values[e].index_put((rows,), V_new)
                used[e] = used[e].index_put((rows,), U_new)
                moe = moe.index_add(0, rows, gate_e[rows, e : e + 1] * o)
        y = self.norm_out(z + self.out(moe))
        return y, torch.stack(hs, 1), stamp
