"""CMRN: Composable Memory Routing Network (sparse top-k experts with persistent memory slots over a
multi-timescale recurrent core).

One step ``t`` of a row (``x_t: [d_in]``; ``d = d_model``, ``E = n_experts``, ``S = mem_slots``,
``L = n_timescales``):

1. **Temporal abstraction.** ``e_t = W_in x_t``; ``L`` GRU cells stacked, layer ``i`` at timescale
   ``2^i``: it *updates only at the steps* ``c % 2^i == 0`` (``c`` = steps since the episode start, so
   every layer sees the first step of an episode) and keeps its state exactly unchanged in between
   (clockwork RNN). Layer 0 reads ``e_t``, layer ``i > 0`` reads layer ``i-1``'s new state, so slower
   layers summarize what faster ones saw. Features ``z_t = LayerNorm(W_mix [h_0; ..; h_{L-1}] + e_t)``.
2. **Router.** ``logits = W_r z_t``; in training mode Shazeer-style noisy gating
   ``logits + router_noise * N(0, 1) * softplus(W_noise z_t)`` (greedy, no noise, in eval mode); the
   top-k experts of the (noisy) logits are chosen and their gates are the softmax over those k only
   (renormalized). ``top_k`` may be overridden per row and step (``forward(..., top_k=[B, T])``).
3. **Experts with persistent memory.** Expert ``e`` owns ``S`` key/value slots per row in the state.
   A chosen expert reads its slots by similarity, ``w = softmax_s(q . K_s / sqrt(d_key))`` over the
   slots written so far (``q = W_q^e z_t``; an empty memory reads zero), computes
   ``o_e = core_e([z_t; w V])`` and writes ``(W_k^e z_t, W_v^e z_t)`` into its least-recently-used slot.
   Usage counters (``mem_used``: the step count ``c + 1`` at a slot's last use, 0 = never written) are
   refreshed by a write and by a read (the slot with the largest read weight), *before* the LRU slot is
   picked; ties go to the lowest slot index (``argmin`` returns the first minimum), so the choice is
   deterministic. Expert cores (``expert_types``): ``general`` (MLP), ``symbolic`` (differentiable fuzzy
   logic over learned soft predicates: product t-norm AND, probabilistic-sum OR, NOT = 1 - p) and
   ``pattern`` (soft matching against learned prototypes).
4. ``y_t = LayerNorm(z_t + W_o sum_{e in top-k} g_e o_e)``.

**How it runs** (vectorized over a slice of ``T`` steps; the per-step loop it replaced is kept as the
readable reference, :class:`rlmem.memory.reference.cmrn.CMRNReference`, and tests/test_cmrn_fast.py checks
that both compute the same outputs, states, aux losses and gradients in float64):

- clockwork layers: layer ``i`` is one ``torch.gru`` call (on the ``GRUCell``'s own weights) over only its
  update steps, cut into segments at episode starts; between update steps it holds its last output;
- router, top-k and gates for all steps at once; the experts' q/k/v projections are one stacked matmul;
- memories: every step's query is scored against ``[the S slots at the slice start, the slice's T writes,
  a zero slot]`` in one matmul; a loop over time follows only which candidate each slot holds and the
  usage stamps (the LRU: read refresh, then the write into the least-recently-used slot); the reads are
  one masked softmax over the held candidates and one matmul; no host syncs inside;
- ``dispatch="sparse"`` (the default) runs each expert core only on the tokens that chose it (one gather
  per expert and call), so the trigger's extra experts cost FLOPs only where it fires, also while acting;
  ``dispatch="dense"`` runs every core on every token, gated (zero gates where not chosen): the same
  numbers, no gathers (no host syncs), more FLOPs.

**Auxiliary losses** of the last ``forward`` (``aux_loss()``), over its ``N`` tokens (rows x steps):
Switch-style load balance ``E * sum_e f_e P_e`` (``f_e`` the fraction of routed assignments that went to
``e``, ``P_e`` the mean router probability of ``e``; 1 when both are uniform) times ``balance_coef``,
plus the router z-loss ``mean(logsumexp(logits)^2)`` times ``z_coef``. Their gradients reach the router's
weights only (the logits are recomputed from detached features): a steady pull on the shared features
would keep moving what the experts and the policy read after the task loss has converged. ``diagnostics()`` reports the
expert usage fractions (``expert_usage/<i>``), the mean per-token routing entropy (nats), the entropy of
the usage fractions and both raw losses.

**Router noise and step == sequence.** Noise is drawn from torch's RNG in training mode only, so a
training-mode replay routes differently from the acting pass that produced the data. PPO's ratio needs
the replayed network to be the acting network, so the RL agent config sets ``router_noise: 0`` (PPO
explores through its sampled actions; the load-balance loss keeps experts in use). Supervised training
(``train_lm``) runs only in sequence mode and uses the noise. In eval mode (evaluation, the contract
checks) routing is greedy and step mode equals sequence mode.

**Continual learning**: :func:`add_expert` appends an expert (the router gains an output), freezing the
existing experts.

State (per row; an episode start resets all of it to zeros, i.e. to ``initial_state``):

- ``h: [B, L, d]`` temporal layer states, ``count: [B]`` (int64) steps since the episode start;
- ``mem_k: [B, E, S, d_key]``, ``mem_v: [B, E, S, d]``, ``mem_used: [B, E, S]`` (int64) expert memories.

Step mode (acting) and sequence mode (replay) compute the same numbers (up to float rounding; the usage
stamps, hence the slots written, exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from rlmem.validate import check_float, check_int
from rlmem.memory.base import MemorySystem, check_inputs, check_trigger
from rlmem.memory.registry import register_memory

DISPATCH = ("sparse", "dense")


# -- fuzzy logic (product t-norm) ---------------------------------------------------------------------

def fuzzy_and(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Product t-norm over ``dim``: ``prod_i a_i`` (``a`` in [0, 1])."""
    return a.prod(dim)


def fuzzy_or(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Probabilistic sum (the product t-norm's dual) over ``dim``: ``1 - prod_i (1 - a_i)``."""
    return 1 - (1 - a).prod(dim)


def fuzzy_not(a: torch.Tensor) -> torch.Tensor:
    """Standard negation ``1 - a``."""
    return 1 - a


# -- expert cores: [n, 2d] -> [n, d] --------------------------------------------------------------------

class GeneralExpert(nn.Module):
    """An MLP: ``u: [n, 2d] -> [n, d]``."""

    def __init__(self, d_model: int, d_hidden: int, **_):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u)


class SymbolicExpert(nn.Module):
    """Differentiable fuzzy logic: ``u: [n, 2d] -> [n, d]``.

    Predicates ``p = sigmoid(W_p u): [n, P]``. Clause ``c`` is a soft conjunction of literals: literal
    ``j`` is ``p_j`` or NOT ``p_j`` (soft polarity ``s_cj = sigmoid(.)``: ``l = s p + (1 - s)(1 - p)``) and
    is in the clause with soft membership ``m_cj = sigmoid(.)``; an excluded literal is AND's identity
    (``1 - m (1 - l)``), so ``AND_c = prod_j (1 - m_cj (1 - l_cj))``. Disjunction ``g`` is the
    probabilistic-sum OR of its clauses with soft membership ``o_gc``: ``OR_g = 1 - prod_c (1 - o_gc AND_c)``.
    Output ``W_out [AND; OR]``.
    """

    def __init__(self, d_model: int, n_predicates: int, n_clauses: int, **_):
        super().__init__()
        self.predicates = nn.Linear(2 * d_model, n_predicates)
        # clauses start with few literals (membership ~ sigmoid(-2) = 0.12), else products vanish
        self.membership = nn.Parameter(torch.randn(n_clauses, n_predicates) * 0.5 - 2.0)
        self.polarity = nn.Parameter(torch.randn(n_clauses, n_predicates))
        self.or_membership = nn.Parameter(torch.randn(n_clauses, n_clauses) * 0.5)
        self.out = nn.Linear(2 * n_clauses, d_model)

    def logic(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``p: [n, P]`` truth values -> ``(AND: [n, C], OR: [n, C])``."""
        s = torch.sigmoid(self.polarity)
        literal = s * p.unsqueeze(1) + (1 - s) * fuzzy_not(p.unsqueeze(1))  # [n, C, P]
        m = torch.sigmoid(self.membership)
        conj = fuzzy_and(1 - m * (1 - literal))  # [n, C]
        o = torch.sigmoid(self.or_membership)  # [G, C]
        disj = fuzzy_or(o * conj.unsqueeze(1))  # [n, G]
        return conj, disj

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        conj, disj = self.logic(torch.sigmoid(self.predicates(u)))
        return self.out(torch.cat([conj, disj], -1))


class PatternExpert(nn.Module):
    """Soft matching against learned prototypes: ``u: [n, 2d] -> [n, d]``.

    ``a = W_a u: [n, d_key]``; ``w = softmax_j(-|a - P_j|^2 * exp(tau) / sqrt(d_key))`` over ``n_prototypes``
    prototypes ``P_j`` (temperature ``tau`` learned); output ``w @ V + W_skip u`` (``V`` one learned value
    per prototype).
    """

    def __init__(self, d_model: int, d_key: int, n_prototypes: int, **_):
        super().__init__()
        self.proj = nn.Linear(2 * d_model, d_key)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, d_key))
        self.values = nn.Parameter(torch.randn(n_prototypes, d_model) / math.sqrt(d_model))
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.skip = nn.Linear(2 * d_model, d_model)
        self.scale = 1 / math.sqrt(d_key)

    def match(self, u: torch.Tensor) -> torch.Tensor:
        """Prototype weights ``[n, n_prototypes]`` (rows sum to 1)."""
        dist2 = (self.proj(u).unsqueeze(1) - self.prototypes).pow(2).sum(-1)
        return torch.softmax(-dist2 * self.log_temperature.exp() * self.scale, -1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.match(u) @ self.values + self.skip(u)


EXPERT_TYPES: dict[str, type[nn.Module]] = {"general": GeneralExpert, "symbolic": SymbolicExpert,
                                            "pattern": PatternExpert}


class Expert(nn.Module):
    """A typed core plus the projections of its persistent memory (query, key, value)."""

    def __init__(self, kind: str, d_model: int, d_key: int, **core_kwargs):
        super().__init__()
        self.kind = kind
        self.core = EXPERT_TYPES[kind](d_model=d_model, d_key=d_key, **core_kwargs)
        self.w_q = nn.Linear(d_model, d_key, bias=False)
        self.w_k = nn.Linear(d_model, d_key, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.scale = 1 / math.sqrt(d_key)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def read_slots(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity read of ``keys: [n, S, d_key]``, ``values: [n, S, d]`` with ``q: [n, d_key]`` over the
    slots written so far (``used > 0``): ``(read [n, d], weights [n, S])``; zero where no slot is written."""
    written = used > 0
    scores = (keys @ q.unsqueeze(-1)).squeeze(-1) * scale
    scores = scores.masked_fill(~written, torch.finfo(scores.dtype).min)
    w = torch.softmax(scores, -1) * written  # a row with no written slot gets all-zero weights
    return (w.unsqueeze(1) @ values).squeeze(1), w


def lru_update(used: torch.Tensor, read_w: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``used: [n, S]`` last-use stamps (0 = never written), ``read_w: [n, S]``, ``stamp: [n]`` (the current
    step count + 1) -> ``(used after the read and the write, the slot written: [n])``.

    The slot read most strongly (if any slot is written) is refreshed first; the write goes to the least
    recently used slot, the lowest index among equals."""
    read_any = (used > 0).any(-1)
    top = read_w.argmax(-1)
    refreshed = torch.where(read_any, stamp, used.gather(1, top.unsqueeze(1)).squeeze(1))
    used = used.scatter(1, top.unsqueeze(1), refreshed.unsqueeze(1))
    slot = used.argmin(-1)  # first minimum: deterministic tie-break
    return used.scatter(1, slot.unsqueeze(1), stamp.unsqueeze(1)), slot


class _LastCall:
    """Routing statistics of the last ``forward``; not copied with the module (it may hold a graph)."""

    def __init__(self, **stats):
        self.__dict__.update(stats)

    def __deepcopy__(self, memo):
        return None


@register_memory("cmrn")
class CMRN(MemorySystem):
    """Sparse top-k expert routing with per-expert memory slots over a multi-timescale recurrent core.
    ``x: [B, T, d_in] -> y: [B, T, d_model]`` (module docstring).

    Args:
        d_in: input features per step.
        d_model: width of the features, experts and outputs.
        n_timescales: temporal layers; layer ``i`` updates every ``2^i`` steps (>= 1).
        n_experts: number of experts ``E`` (>= 1).
        top_k: experts per token (1 .. n_experts); overridable per row and step in ``forward``.
        expert_types: one of ``general``/``symbolic``/``pattern`` per expert (a list of ``n_experts``), one
            type for all, or None to cycle general, symbolic, pattern.
        mem_slots: key/value slots per expert and row (>= 1).
        d_key: width of memory keys/queries (and of the pattern experts' prototypes).
        d_hidden: hidden width of the general experts (None: ``2 d_model``).
        n_predicates, n_clauses: the symbolic experts' predicates and clauses (= disjunctions).
        n_prototypes: the pattern experts' prototypes.
        router_noise: scale of the noisy gating in training mode (0: none; module docstring on PPO).
        balance_coef: weight of the load-balance loss in ``aux_loss()`` (>= 0).
        z_coef: weight of the router z-loss in ``aux_loss()`` (>= 0).
        dispatch: ``sparse`` (each core only on the tokens that chose it) or ``dense`` (every core on every
            token, gated); the same numbers.

    Cost of a step (acting): the ``L`` GRU cells on every row, the router, per row the ``k`` chosen expert
    cores (all ``E`` with ``dispatch="dense"``), per expert an ``O(S d_key + S d)`` read and an
    ``O(d_key + d)`` write. Over a slice of ``T``
    steps the reads cost ``O(T (S + T) (d_key + d))`` per expert and row (scores against every candidate
    slot), a few hundred small ops in all plus ~15 integer ops per step for the LRU.
    State: ``L d + E S (d_key + d + 1) + 1`` numbers per row.
    """

    #: the trigger at step t changes y_t (more experts compute it), so a critic must not read it
    trigger_affects_output = True

    @property
    def trigger_path(self) -> str | None:
        return None if self.top_k == 1 else f"experts 2..{self.top_k} of top_k"

    test_kwargs = {"d_model": 16, "n_timescales": 3, "n_experts": 3, "top_k": 2, "mem_slots": 3, "d_key": 8,
                   "n_predicates": 6, "n_clauses": 4, "n_prototypes": 4}

    def __init__(self, d_in: int, d_model: int = 64, n_timescales: int = 3, n_experts: int = 4, top_k: int = 2,
                 expert_types: Sequence[str] | str | None = None, mem_slots: int = 8, d_key: int = 16,
                 d_hidden: int | None = None, n_predicates: int = 16, n_clauses: int = 8, n_prototypes: int = 16,
                 router_noise: float = 1.0, balance_coef: float = 0.01, z_coef: float = 0.001,
                 dispatch: str = "sparse"):
        super().__init__()
        self.d_in = d_in
        self.d_model = self.d_out = check_int("cmrn: d_model", d_model, low=1)
        self.n_timescales = check_int("cmrn: n_timescales", n_timescales, low=1)
        n_experts = check_int("cmrn: n_experts", n_experts, low=1)
        self.top_k = check_int("cmrn: top_k", top_k, low=1, high=n_experts, why=f"n_experts={n_experts}")
        self.mem_slots = check_int("cmrn: mem_slots", mem_slots, low=1)
        self.d_key = check_int("cmrn: d_key", d_key, low=1)
        d_hidden = 2 * d_model if d_hidden is None else d_hidden
        self.core_kwargs = {
            "d_hidden": check_int("cmrn: d_hidden", d_hidden, low=1, why="or null for 2 * d_model"),
            "n_predicates": check_int("cmrn: n_predicates", n_predicates, low=1),
            "n_clauses": check_int("cmrn: n_clauses", n_clauses, low=1),
            "n_prototypes": check_int("cmrn: n_prototypes", n_prototypes, low=1),
        }
        self.router_noise = check_float("cmrn: router_noise", router_noise, low=0.0)
        self.balance_coef = check_float("cmrn: balance_coef", balance_coef, low=0.0)
        self.z_coef = check_float("cmrn: z_coef", z_coef, low=0.0)
        if dispatch not in DISPATCH:
            raise ValueError(f"cmrn: dispatch must be one of {list(DISPATCH)}, got {dispatch!r}")
        self.dispatch = dispatch
        types = expert_type_list(expert_types, n_experts)

        L, d = self.n_timescales, d_model
        self.embed = nn.Linear(d_in, d)
        self.temporal = nn.ModuleList(nn.GRUCell(d, d) for _ in range(L))
        self.mix = nn.Linear(L * d, d)
        self.norm_z = nn.LayerNorm(d)
        self.router = nn.Linear(d, n_experts)
        self.noise = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(self._new_expert(kind) for kind in types)
        self.out = nn.Linear(d, d)
        self.norm_out = nn.LayerNorm(d)
        self._last: _LastCall | None = None

    def _new_expert(self, kind: str) -> Expert:
        return Expert(kind, self.d_model, self.d_key, **self.core_kwargs)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_types(self) -> list[str]:
        return [e.kind for e in self.experts]

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_model={self.d_model}, n_timescales={self.n_timescales}, "
                f"experts={self.expert_types}, top_k={self.top_k}, mem_slots={self.mem_slots}, "
                f"dispatch={self.dispatch!r}")

    def initial_state(self, batch_size, device=None):
        B, E, S, d = batch_size, self.n_experts, self.mem_slots, self.d_model
        dtype = self.embed.weight.dtype
        return TensorDict(
            {
                "h": torch.zeros(B, self.n_timescales, d, device=device, dtype=dtype),
                "count": torch.zeros(B, dtype=torch.long, device=device),
                "mem_k": torch.zeros(B, E, S, self.d_key, device=device, dtype=dtype),
                "mem_v": torch.zeros(B, E, S, d, device=device, dtype=dtype),
                "mem_used": torch.zeros(B, E, S, dtype=torch.long, device=device),
            },
            batch_size=[B],
        )

    # -- forward ---------------------------------------------------------------------------------------

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
            k_rows, k_max = torch.where(trigger, self.top_k, 1), self.top_k  # in range by construction: no check
        else:
            k_rows, k_max = self._check_top_k(top_k, x.shape[0], x.shape[1], x.device)
        B, T = x.shape[:2]
        E, dev = self.n_experts, x.device
        is_init = is_init.to(torch.bool)

        # steps since the episode start, before each step (after its reset): drives clocks and usage stamps
        tt = torch.arange(T, device=dev)
        last_reset = torch.where(is_init, tt, -1).cummax(1).values
        cnt = torch.where(last_reset >= 0, tt - last_reset, state["count"].unsqueeze(1) + tt)  # [B, T]

        # 1. temporal abstraction (clockwork GRU layers) for the whole slice
        e_seq = self.embed(x)
        hs = self._temporal(e_seq, state["h"], cnt, is_init)
        z = self.norm_z(self.mix(torch.cat(hs, -1)) + e_seq)  # [B, T, d]

        # 2. router for every step at once
        logits = self.router(z)  # [B, T, E]
        noisy = logits
        if self.training and self.router_noise > 0:
            noise = torch.randn(T, B, E, dtype=logits.dtype, device=dev).transpose(0, 1)
            noisy = logits + self.router_noise * noise * F.softplus(self.noise(z))
        top_vals, top_idx = noisy.topk(k_max, -1)  # [B, T, k]
        hit = top_idx.unsqueeze(-1) == torch.arange(E, device=dev)  # [B, T, k, E]
        if k_rows is not None:
            chosen = torch.arange(k_max, device=dev) < k_rows.unsqueeze(-1)  # column 0 always chosen
            top_vals = top_vals.masked_fill(~chosen, float("-inf"))
            hit = hit & chosen.unsqueeze(-1)
        gates = torch.softmax(top_vals, -1)  # renormalized over the chosen experts
        gate_e = (gates.unsqueeze(-1) * hit).sum(2)  # [B, T, E]: each expert's gate, 0 if not chosen
        hit_e = hit.any(2)  # [B, T, E]
        # aux losses see the router's logits of detached features (module docstring)
        aux_logits = self.router(z.detach())
        probs = torch.softmax(aux_logits, -1)
        self._last = _LastCall(
            n_tokens=B * T, prob_sum=probs.sum((0, 1)), lse2_sum=torch.logsumexp(aux_logits, -1).pow(2).sum(),
            entropy_sum=(-(probs * probs.clamp_min(1e-12).log()).sum(-1)).sum().detach(),
            assigned=hit_e.sum((0, 1)).detach())

        # 3. experts' memories: every step's query against [initial slots, this slice's writes, a zero slot]
        read, mem_k, mem_v, mem_used = self._memory(z, state, cnt, is_init, hit_e)  # read: [B, E, T, d]

        # 4. expert cores, gated sum
        moe = self._cores(z, read, gate_e, hit_e)
        y = self.norm_out(z + self.out(moe))
        next_state = TensorDict(
            {"h": torch.stack([h[:, -1] for h in hs], 1), "count": cnt[:, -1] + 1, "mem_k": mem_k, "mem_v": mem_v,
             "mem_used": mem_used},
            batch_size=state.batch_size,
        )
        return y, next_state

    def _check_top_k(self, top_k, B, T, device) -> tuple[torch.Tensor | None, int]:
        """``(top_k as int64 [B, T] or None, its largest value)``; out-of-range values raise."""
        if top_k is None:
            return None, self.top_k
        top_k = torch.as_tensor(top_k, device=device)
        if top_k.is_floating_point() or top_k.dtype == torch.bool:
            raise ValueError(f"cmrn: top_k must be an integer tensor [B, T], got dtype {top_k.dtype}")
        if tuple(top_k.shape) != (B, T):
            raise ValueError(f"cmrn: top_k must have shape [B, T]={[B, T]}, got {list(top_k.shape)}")
        low, high = torch.stack([top_k.min(), top_k.max()]).tolist()
        if low < 1 or high > self.n_experts:
            raise ValueError(f"cmrn: top_k values must be in [1, n_experts={self.n_experts}], got {low}..{high}")
        return top_k.long(), int(high)

    # -- the pieces of forward ----------------------------------------------------------------------------

    def _temporal(self, e_seq, h0, cnt, is_init) -> list[torch.Tensor]:
        """The clockwork layers over a slice: ``e_seq: [B, T, d]``, ``h0: [B, L, d]`` (the state before the
        slice), ``cnt: [B, T]`` -> each layer's state after every step, ``[B, T, d]`` per layer.

        One step (acting): each cell on every row, kept where it is the layer's update step. A slice: layer
        ``i`` runs as one ``torch.gru`` call (the cell's own weights) over its update steps only, cut into
        segments at episode starts (a segment starts from zeros after a reset, else from the carried state);
        between its update steps a layer holds the output of its last one."""
        B, T, d = e_seq.shape
        if T == 1:
            keep = ~is_init[:, 0]
            below, hs = e_seq[:, 0], []
            for i, cell in enumerate(self.temporal):
                h_i = torch.where(keep.unsqueeze(1), h0[:, i], 0)
                new = cell(below, h_i)
                if i > 0:
                    new = torch.where((cnt[:, 0] % (2**i) == 0).unsqueeze(1), new, h_i)
                hs.append(new.unsqueeze(1))
                below = new
            return hs
        plans = [self._segments(cnt % (2**i) == 0, is_init) for i in range(self.n_timescales)]
        sizes = torch.stack([torch.stack([p[-1].sum(), p[3].max()]) for p in plans]).tolist()  # one host sync
        below, hs, BT = e_seq, [], B * T
        for i, (cell, (upd, has_prev, seg, pos, start_reset, start), (n_seg, max_pos)) in enumerate(
                zip(self.temporal, plans, sizes)):
            n_seg, length = int(n_seg), int(max_pos) + 1
            slots = n_seg * length
            dst = torch.where(upd, seg * length + pos, slots)  # position in the padded [n_seg, length] input
            inp = below.new_zeros(slots + 1, d).index_put((dst,), below.reshape(BT, d), accumulate=True)
            rows = torch.arange(B, device=e_seq.device).repeat_interleave(T)
            seg_dst = torch.where(start, seg, n_seg)
            seg_row = rows.new_zeros(n_seg + 1).index_put((seg_dst,), rows)[:n_seg]
            seg_reset = start_reset.new_zeros(n_seg + 1).index_put((seg_dst,), start_reset)[:n_seg]
            carried = h0[:, i]
            h_start = torch.where(seg_reset.unsqueeze(1), 0, carried.index_select(0, seg_row))
            out, _ = torch.gru(inp[:slots].view(n_seg, length, d), h_start.unsqueeze(0),
                               (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), True, 1, 0.0, False,
                               False, True)
            src = torch.where(has_prev, seg * length + pos, 0)
            h_i = torch.where(has_prev.unsqueeze(1), out.reshape(slots, d).index_select(0, src),
                              carried.repeat_interleave(T, 0))
            h_i = h_i.view(B, T, d)
            hs.append(h_i)
            below = h_i
        return hs

    @staticmethod
    def _segments(upd, is_init):
        """Index plan of one clockwork layer over a slice (flattened row-major ``[B * T]``): ``(upd, has_prev,
        seg, pos, start_reset, start)``: update step; an update step at or before this one in the row; the
        segment and position in it of the last update step (at or before); whether a segment starts here
        from a reset; whether a segment starts here. A segment is a row's run of update steps between
        episode starts."""
        first = upd & (upd.cumsum(1) == 1)
        has_prev = upd.cumsum(1) > 0
        start = (upd & (is_init | first)).reshape(-1)
        upd_f = upd.reshape(-1)
        seg = start.cumsum(0) - 1
        done = upd_f.cumsum(0)  # update steps up to and including this position
        base = torch.where(start, done - 1, -1).cummax(0).values  # index of its segment's first update step
        pos = torch.where(has_prev.reshape(-1), done - 1 - base, 0)
        return upd_f, has_prev.reshape(-1), seg, pos, (is_init.reshape(-1) & start), start

    def _memory(self, z, state, cnt, is_init, hit_e):
        """Reads and writes of every expert's slots over a slice. ``z: [B, T, d]``, ``hit_e: [B, T, E]`` ->
        ``(read [B, E, T, d], mem_k, mem_v, mem_used)`` (the next state's memories).

        Candidates per row and expert: the ``S`` slots at the slice start, the ``T`` writes of the slice, one
        zero slot (what a reset leaves). A loop over time follows only which candidate each slot holds
        and its usage stamp (the LRU); the scores of every step against every candidate are one matmul,
        the read one masked softmax over the held candidates and one matmul."""
        B, T, d = z.shape
        E, S, dk = self.n_experts, self.mem_slots, self.d_key
        C = S + T + 1
        weight = torch.cat([ex.w_q.weight for ex in self.experts] + [ex.w_k.weight for ex in self.experts]
                           + [ex.w_v.weight for ex in self.experts])
        proj = F.linear(z, weight)  # [B, T, E (2 dk + d)]
        q = proj[..., : E * dk].view(B, T, E, dk).transpose(1, 2)  # [B, E, T, dk]
        k_new = proj[..., E * dk : 2 * E * dk].view(B, T, E, dk).transpose(1, 2)
        v_new = proj[..., 2 * E * dk :].view(B, T, E, d).transpose(1, 2)
        cand_k = torch.cat([state["mem_k"], k_new, z.new_zeros(B, E, 1, dk)], 2)  # [B, E, C, dk]
        cand_v = torch.cat([state["mem_v"], v_new, z.new_zeros(B, E, 1, d)], 2)
        scores = (q @ cand_k.transpose(-1, -2)) * (1 / math.sqrt(dk))  # [B, E, T, C]
        holder, used, held, useds = self._lru(scores.detach(), state["mem_used"], cnt, is_init, hit_e)
        written = useds > 0  # [B, E, T, S]
        sc = scores.gather(-1, held).masked_fill(~written, torch.finfo(scores.dtype).min)
        w = torch.softmax(sc, -1) * written
        read = scores.new_zeros(B, E, T, C).scatter_add(-1, held, w) @ cand_v  # [B, E, T, d]
        mem_k = cand_k.gather(2, holder.unsqueeze(-1).expand(B, E, S, dk))
        mem_v = cand_v.gather(2, holder.unsqueeze(-1).expand(B, E, S, d))
        return read, mem_k, mem_v, used

    def _lru(self, scores, used, cnt, is_init, hit_e):
        """The integer loop over time. ``scores: [B, E, T, C]`` (no graph), ``used: [B, E, S]`` -> ``(holder,
        used)`` after the slice and, per step, the candidate each slot holds and the usage stamps at its
        read (``[B, E, T, S]`` each). Per step and chosen expert, as :func:`lru_update`: the slot read most
        strongly is refreshed, the write goes to the least recently used slot (the first among equals)."""
        B, E, T, C = scores.shape
        S = used.shape[-1]
        zero = C - 1
        holder = torch.arange(S, device=used.device).expand(B, E, S)
        # per-step views taken once (each indexing op in the loop costs as much as a small computation)
        actives = hit_e.transpose(1, 2).unsqueeze(-1).unbind(2)  # T x [B, E, 1]
        stamps = (cnt + 1).view(B, 1, T, 1).expand(B, E, T, 1).unbind(2)
        step_scores = scores.unbind(2)  # T x [B, E, C]
        resets = is_init.any(0).tolist() if T > 1 else [True]
        fmin = torch.finfo(scores.dtype).min
        held, useds = [], []
        for t in range(T):
            if resets[t]:
                r = is_init[:, t].view(B, 1, 1)
                used = used.masked_fill(r, 0)
                holder = holder.masked_fill(r, zero)
            held.append(holder)
            useds.append(used)
            unwritten = used == 0
            # the read's weights are softmax(scores) over the written slots (exactly 0 elsewhere): their argmax
            top = torch.softmax(step_scores[t].gather(-1, holder).masked_fill(unwritten, fmin), -1).argmax(
                -1, keepdim=True)
            stamp = stamps[t]
            # refresh the slot read most strongly; an unwritten memory has nothing to refresh
            new_used = used.scatter(-1, top, stamp.masked_fill(unwritten.all(-1, keepdim=True), 0))
            slot = new_used.argmin(-1, keepdim=True)  # first minimum: deterministic tie-break
            new_used = new_used.scatter(-1, slot, stamp)
            new_holder = holder.scatter(-1, slot, S + t)
            used = torch.where(actives[t], new_used, used)
            holder = torch.where(actives[t], new_holder, holder)
        return holder, used, torch.stack(held, 2), torch.stack(useds, 2)

    def _cores(self, z, read, gate_e, hit_e):
        """``sum_e gate_e o_e`` with ``o_e = core_e([z; read_e])``: ``[B, T, d]``. Sparse dispatch: each core on
        the tokens that chose it (one gather per expert), so a trigger that fires fewer experts saves their
        FLOPs, also while acting; dense: each core on every token, weighted by its gate (0 where not chosen)."""
        B, T, d = z.shape
        moe = torch.zeros_like(z)
        if self.dispatch == "sparse":
            zf, gf, moe = z.reshape(B * T, d), gate_e.reshape(B * T, -1), moe.view(B * T, d)
            for e, expert in enumerate(self.experts):
                rows = hit_e[..., e].reshape(-1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                u = torch.cat([zf.index_select(0, rows), read[:, e].reshape(B * T, d).index_select(0, rows)], -1)
                moe = moe.index_add(0, rows, gf.index_select(0, rows)[:, e : e + 1] * expert.core(u))
            return moe.view(B, T, d)
        for e, expert in enumerate(self.experts):  # the cores take [n, 2d]
            o = expert.core(torch.cat([z, read[:, e]], -1).view(B * T, 2 * d)).view(B, T, d)
            moe = moe + gate_e[..., e : e + 1] * o
        return moe


    # -- losses and diagnostics -----------------------------------------------------------------------------

    def balance_loss(self) -> torch.Tensor | None:
        """Switch load balance of the last forward: ``E * sum_e f_e P_e`` (1 when uniform)."""
        last = self._last
        if last is None:
            return None
        f = last.assigned.to(last.prob_sum.dtype)
        return self.n_experts * (f / f.sum() * last.prob_sum / last.n_tokens).sum()

    def z_loss(self) -> torch.Tensor | None:
        """Router z-loss of the last forward: ``mean(logsumexp(logits)^2)``."""
        return None if self._last is None else self._last.lse2_sum / self._last.n_tokens

    def aux_loss(self) -> torch.Tensor | None:
        """``balance_coef * balance_loss + z_coef * z_loss`` of the last forward (None before any, or with
        both coefficients 0)."""
        if self._last is None or (self.balance_coef == 0 and self.z_coef == 0):
            return None
        return self.balance_coef * self.balance_loss() + self.z_coef * self.z_loss()

    def diagnostics(self) -> dict[str, float]:
        """Of the last forward: ``expert_usage/<i>`` (fraction of routed assignments to expert i),
        ``routing_entropy`` (mean entropy of the router's distribution per token, nats), ``usage_entropy``
        (entropy of the usage fractions, nats; ``ln E`` when uniform), ``balance_loss``, ``z_loss``."""
        last = self._last
        if last is None:
            return {}
        f = last.assigned.double() / last.assigned.sum()
        out = {f"expert_usage/{i}": float(v) for i, v in enumerate(f)}
        out["routing_entropy"] = float(last.entropy_sum) / last.n_tokens
        out["usage_entropy"] = float(-(f * f.clamp_min(1e-12).log()).sum())
        out["balance_loss"] = float(self.balance_loss().detach())
        out["z_loss"] = float(self.z_loss().detach())
        return out


def expert_type_list(expert_types: Sequence[str] | str | None, n_experts: int) -> list[str]:
    """The type of each expert; unknown types raise naming the valid ones."""
    if expert_types is None:
        cycle = list(EXPERT_TYPES)
        types = [cycle[i % len(cycle)] for i in range(n_experts)]
    elif isinstance(expert_types, str):
        types = [expert_types] * n_experts
    elif isinstance(expert_types, Sequence):
        types = list(expert_types)
        if len(types) != n_experts:
            raise ValueError(f"cmrn: expert_types has {len(types)} entries, n_experts={n_experts}")
    else:
        raise TypeError(f"cmrn: expert_types must be a type name or a list of them, got {expert_types!r}")
    unknown = sorted({t for t in types if not isinstance(t, str) or t not in EXPERT_TYPES}, key=str)
    if unknown:
        raise ValueError(f"cmrn: unknown expert_types {unknown}; valid: {list(EXPERT_TYPES)}")
    return types


def add_expert(memory: CMRN, expert_type: str = "general", freeze_existing: bool = True) -> int:
    """Continual learning: append an expert of ``expert_type`` to ``memory`` and return its index.

    The router (and its noise gate) gains one output; the old outputs keep their weights, the new one
    starts at zero weight and a bias one below the lowest old bias (so the new expert is not chosen
    everywhere at once). With ``freeze_existing`` the existing experts' parameters (cores and memory
    projections) stop requiring gradients, so an optimizer step leaves them unchanged; the router stays
    trainable (it must learn when to use the new expert). Build the optimizer after this call (the router's
    parameters are new tensors), and new states with ``initial_state``: the memory tensors gain an expert.
    """
    if not isinstance(memory, CMRN):
        raise TypeError(f"add_expert needs a CMRN memory, got {type(memory).__name__}")
    expert_type_list([expert_type], 1)
    ref = memory.router.weight
    expert = memory._new_expert(expert_type).to(device=ref.device, dtype=ref.dtype)
    if freeze_existing:
        for old in memory.experts:
            old.requires_grad_(False)
    memory.experts.append(expert)
    for name in ("router", "noise"):
        old = getattr(memory, name)
        new = nn.Linear(old.in_features, old.out_features + 1, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.weight[:-1] = old.weight
            new.weight[-1] = 0
            new.bias[:-1] = old.bias
            new.bias[-1] = old.bias.min() - 1
        setattr(memory, name, new)
    memory._last = None
    return memory.n_experts - 1
