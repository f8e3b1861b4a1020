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

State: ``fast, deep, deep_momentum: [B, n_heads, d_head, mem_slots]``, zero at episode start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from rlmem.envs.core import check_float, check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory

_EPS = 1e-4
#: smallest surprise-gate temperature accepted
MIN_TEMPERATURE = 1e-6


@register_memory("miras")
class DualTierMiras(MemorySystem):
    """Fast + surprise-gated deep associative memory. ``x: [B, T, d_in] -> y: [B, T, d_model]``.

    ``y_t = LayerNorm(h_t + out_proj([fast.read(q_t); deep.read(q_t)]))`` with ``h_t = in_proj(x_t)``;
    the step's own key/value is written after the read, so ``y_t`` retrieves from steps ``< t``.
    """

    test_kwargs = {"d_model": 16, "mem_slots": 8, "n_heads": 2}

    def __init__(self, d_in: int, d_model: int = 64, mem_slots: int = 16, n_heads: int = 4,
                 surprise_threshold: float = 0.5, lr_fast: float = 0.5, lr_deep: float = 0.5, decay: float = 0.01,
                 momentum: float = 0.5, temperature: float = 0.1):
        super().__init__()
        d_in = check_int("miras: d_in", d_in, low=1)
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
        q = F.normalize(self.q_proj(h).view(B, T, self.n_heads, self.mem_slots), dim=-1)
        k = F.normalize(self.k_proj(h).view(B, T, self.n_heads, self.mem_slots), dim=-1)
        return q, k, self.v_proj(h).view(B, T, self.n_heads, self.d_head)

    @staticmethod
    def read(memory: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``memory: [..., d_head, S]``, ``query: [..., S]`` -> ``[..., d_head]``."""
        return (memory @ query.unsqueeze(-1)).squeeze(-1)

    def retrieve(self, h, state, is_init):
        """Run the memory over ``h: [B, T, d_model]``: ``-> (reads [B, T, 2 * d_model], next_state)``.

        ``reads[:, t]`` is ``[fast heads; deep heads]`` read before step t's write. Both tiers are updated
        by one stacked Titans step (tier 0 = fast: momentum 0, gate 1; tier 1 = deep) to keep the number
        of small ops in this time loop low: it is the cost of the system. Also sets
        ``self.last_write_rate``, the mean deep-tier gate of this call (detached), for logging.
        """
        B, T, _ = h.shape
        q, k, v = self.project(h)
        qk = torch.stack([q, k], -1).unsqueeze(2)  # [B, T, 1, H, S, 2]: read and predict in one matmul
        k_row = k[:, :, None, :, None, :]  # [B, T, 1, H, 1, S]
        v_tier = v.unsqueeze(2)  # [B, T, 1, H, d_head]
        v_energy = v.pow(2).sum(-1) + _EPS  # [B, T, H]
        lr = h.new_tensor([self.lr_fast, self.lr_deep]).view(2, 1, 1, 1)
        eta = h.new_tensor([0.0, self.momentum]).view(2, 1, 1, 1)
        is_fast = torch.tensor([True, False], device=h.device).view(2, 1)
        temperature = self.log_temperature.exp()
        keep = (~is_init).to(h.dtype)[:, :, None, None, None, None]
        reset_steps = set(is_init.any(0).nonzero().flatten().tolist())  # one host sync per call
        mem = torch.stack([state["fast"], state["deep"]], 1)  # [B, 2, H, d_head, S]
        mom = torch.stack([torch.zeros_like(state["deep_momentum"]), state["deep_momentum"]], 1)
        reads, gates = [], []
        for t in range(T):  # the delta rule is sequential in t; everything inside is batched over rows and heads
            if t in reset_steps:
                mem, mom = mem * keep[:, t], mom * keep[:, t]
            out = mem @ qk[:, t]  # [B, 2, H, d_head, 2]
            reads.append(out[..., 0])
            error = v_tier[:, t] - out[..., 1]  # the tier's prediction error on the new pair
            surprise = error.pow(2).sum(-1) / v_energy[:, t, None]  # [B, 2, H]
            gate = torch.sigmoid((surprise - self.surprise_threshold) / temperature)
            gates.append(gate[:, 1])
            g = torch.where(is_fast, 1.0, gate)[..., None, None]  # the fast tier always writes
            full_mom = torch.addcmul(eta * mom, lr * error.unsqueeze(-1), k_row[:, t])
            full_mem = torch.add(full_mom, mem, alpha=1 - self.decay)
            mem, mom = torch.lerp(mem, full_mem, g), torch.lerp(mom, full_mom, g)
        self.last_write_rate = torch.stack(gates).mean().detach()
        r = torch.stack(reads, 1).flatten(2)  # [B, T, 2 * d_model]: fast heads, then deep heads
        next_state = TensorDict({"fast": mem[:, 0], "deep": mem[:, 1], "deep_momentum": mom[:, 1]},
                                batch_size=state.batch_size)
        return r, next_state

    def forward(self, x, state, is_init):
        check_inputs(self, x, state, is_init)
        h = self.in_proj(x)
        r, next_state = self.retrieve(h, state, is_init)
        return self.norm(h + self.out_proj(r)), next_state
