"""``adapter``: a frozen pretrained causal LM with memory adapters, as a recurrent memory system.

Each step's input is projected to the LM's hidden size and the LM (frozen; its decoder stack, without the
LM head) reads the last ``window`` steps as ``inputs_embeds``. The adapter's memory bank (cross-attention
reads injected into the LM's blocks, :mod:`rlmem.adapters`) is the learned long-term memory: it is
trained with the rest and is the same in every episode. What an episode has shown is seen only through
the window, which is the recurrent state::

    e_t = W_in x_t                        (slots before the episode start: a learned padding embedding p)
    y_t = LM([e_{t-window+1} .. e_t])[-1]  (the last position's hidden state after the final norm)

State (all in the TensorDict):

- ``window: [B, window - 1, d_in]``: the raw inputs of the last ``window - 1`` steps, oldest first (zeros in
  slots older than the episode start). Raw inputs rather than embeddings, so a replayed sequence projects
  them with the current ``W_in``, exactly as acting does;
- ``valid: [B]`` (int64): how many of those slots belong to the running episode (``0 .. window - 1``).

Sequence mode (T > 1) runs all T windows as one LM batch of ``B * T`` sequences of ``window`` tokens;
step mode is the same computation with T = 1.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from rlmem.adapters import MemoryAdapterConfig, inject_memory
from rlmem.causal_lm import TINY_SOURCES, load_causal_lm
from rlmem.validate import check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.registry import register_memory


@register_memory("adapter")
class AdapterMemory(MemorySystem):
    """Sliding window of inputs read by a frozen causal LM with memory adapters.
    ``x: [B, T, d_in] -> y: [B, T, hidden]``.

    Args:
        d_in: input features per step.
        source: the base LM: ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-gpt2"`` (built from a config with
            ``hidden_size``, ``n_layers``, ``n_heads``, seeded by ``base_seed``) or a local
            ``save_pretrained`` directory (then those four are ignored). Never downloaded.
        window: steps the LM reads (the current one and ``window - 1`` earlier ones, kept in the state); >= 2.
        hidden_size, n_layers, n_heads, base_seed: the tiny base LM.
        **adapter: :class:`rlmem.adapters.MemoryAdapterConfig` fields (``num_memory_tokens``, ``variant``,
            ``placement``, ``sharing``, ``num_chapters``, ``lora_rank``, ...).

    Trainable: ``W_in``, the padding embedding, the memory adapters and LoRA; the LM's weights are frozen, and
    the LM stays in eval mode whatever ``train()`` says (no dropout from its config: acting and the PPO
    replay compute the same features; :meth:`rlmem.adapters.MemoryAdaptedLM.train`).
    Cost of a step: one LM pass over ``window`` tokens per row.
    """

    test_kwargs = {"hidden_size": 16, "n_layers": 2, "n_heads": 2, "window": 4, "num_memory_tokens": 4,
                   "num_heads": 2, "lora_rank": 2}

    def __init__(self, d_in: int, source: str = "tiny", window: int = 16, hidden_size: int = 64, n_layers: int = 2,
                 n_heads: int = 4, base_seed: int = 0, **adapter: Any):
        super().__init__()
        name = self.registry_name
        self.d_in = check_int(f"{name}: d_in", d_in, low=1)
        self.window = check_int(f"{name}: window", window, low=2, why="the state holds window - 1 steps")
        try:
            cfg = MemoryAdapterConfig.from_dict(adapter)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (and the memory system's own: source, window, hidden_size, n_layers, "
                             "n_heads, base_seed)") from None
        self.source = str(source)
        if self.source in TINY_SOURCES:
            base_seed = check_int(f"{name}: base_seed", base_seed, low=0)
            with torch.random.fork_rng(devices=[]):  # the base LM's seed must not move the global RNG
                lm = load_causal_lm(self.source, vocab_size=32, hidden_size=hidden_size, n_layers=n_layers,
                                    n_heads=n_heads, max_positions=max(64, self.window), seed=base_seed)
        else:
            try:
                lm = load_causal_lm(self.source)  # FileNotFoundError / ValueError naming the valid choices
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{name}: source={self.source!r}: {err}") from None
        config = lm.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions is not None and self.window > positions:
            raise ValueError(f"{name}: window={self.window} is longer than the base LM's {positions} positions")
        self.lm = inject_memory(lm, cfg)
        hidden = int(config.hidden_size)
        self.d_out = self.hidden = hidden
        self.embed = nn.Linear(self.d_in, hidden)
        self.pad = nn.Parameter(torch.zeros(hidden))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, window={self.window}, source={self.source!r} (frozen)"

    def initial_state(self, batch_size, device=None):
        dtype = self.embed.weight.dtype
        return TensorDict(
            {
                "window": torch.zeros(batch_size, self.window - 1, self.d_in, device=device, dtype=dtype),
                "valid": torch.zeros(batch_size, dtype=torch.long, device=device),
            },
            batch_size=[batch_size],
        )

    def forward(self, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDict]:
        check_inputs(self, x, state, is_init)
        B, T, _ = x.shape
        W, dev = self.window, x.device
        t = torch.arange(T, device=dev)
        # first step of each step's episode, on a time axis where the state's slots are -(W-1) .. -1
        last_reset = torch.where(is_init, t, -1).cummax(1).values  # [B, T]
        start = torch.where(last_reset >= 0, last_reset, -state["valid"].unsqueeze(1))
        full = torch.cat([state["window"], x], 1)  # [B, W - 1 + T, d_in]: time -(W-1) .. T-1
        emb = self.embed(full)  # [B, W - 1 + T, hidden]
        windows = emb.unfold(1, W, 1).transpose(-1, -2)  # [B, T, W, hidden]: window of step t is times t-W+1 .. t
        slot_time = t.unsqueeze(1) - (W - 1) + torch.arange(W, device=dev)  # [T, W]
        live = slot_time.unsqueeze(0) >= start.unsqueeze(-1)  # [B, T, W]
        windows = torch.where(live.unsqueeze(-1), windows, self.pad)
        h = self.lm.hidden_states(inputs_embeds=windows.reshape(B * T, W, self.hidden))  # [B*T, W, hidden]
        y = h[:, -1].view(B, T, self.hidden)
        # next state: the last W-1 inputs, of which min(W-1, T - start) belong to the running episode
        valid = (T - start[:, -1]).clamp(max=W - 1)
        keep = torch.arange(W - 1, device=dev) >= (W - 1 - valid).unsqueeze(1)  # [B, W-1]
        window = full[:, T:] * keep.unsqueeze(-1).to(full.dtype)
        return y, TensorDict({"window": window, "valid": valid}, batch_size=state.batch_size)

    def aux_loss(self) -> torch.Tensor | None:
        return self.lm.aux_loss()

    def diagnostics(self) -> dict[str, float]:
        if self.lm.adapter is None:
            return {}
        return {f"router/{k}": float(v.detach()) for k, v in self.lm.adapter.router_stats().items()}
