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
step mode is the same computation with T = 1. For LLaMA- and GPT-2-style base models the LM is run by
:func:`rlmem.adapters.fast.window_hidden`, exact rewrites of that computation (the last layer at the last
position only, LLaMA's layer-0 norm and q/k/v once per token, the per-position work on the live slots
only: padding slots hold the same numbers in every window); :mod:`rlmem.memory.reference.adapter` is the
plain ``transformers`` forward it equals (tests/test_adapter_fast.py).

``mode="streaming"`` is a different, cheaper model: each step's token runs through the LM once, and every
layer attends to its own cached keys/values of the previous ``window - 1`` steps (computed when those
steps arrived, as a causal LM's KV cache holds them). State: ``k, v: [B, n_layers, window - 1, kv_heads,
head_dim]`` (unrotated keys, values; zeros in slots older than the episode start) and ``valid: [B]``. Slots
before the episode start attend to the padding embedding's keys/values, recomputed each call from the current
weights. It equals window mode at the first step of every episode and, for a one-layer LLaMA-style model, at
every step; otherwise the two differ (:func:`rlmem.adapters.fast.stream_hidden`, docs/adapters.md).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from rlmem.adapters import MemoryAdapterConfig, inject_memory
from rlmem.adapters import fast
from rlmem.causal_lm import TINY_SOURCES, load_causal_lm
from rlmem.validate import check_int
from rlmem.memory.base import MemorySystem, check_inputs
from rlmem.memory.reference import adapter as reference
from rlmem.memory.registry import register_memory

#: how the LM reads the window (see the module docstring)
MODES = ("window", "streaming")


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
        mode: ``"window"`` (every step runs the LM over its whole window) or ``"streaming"`` (each step's token
            runs once per layer against cached keys/values of the window; cheaper, a different model: see the
            module docstring). Streaming needs a LLaMA- or GPT-2-style base and routing that decides per token
            (``num_chapters=1``, or ``routing_train=routing_inference="token"``).
        **adapter: :class:`rlmem.adapters.MemoryAdapterConfig` fields (``num_memory_tokens``, ``variant``,
            ``placement``, ``sharing``, ``num_chapters``, ``lora_rank``, ...).

    Trainable: ``W_in``, the padding embedding, the memory adapters and LoRA; the LM's weights are frozen, and
    the LM stays in eval mode whatever ``train()`` says (no dropout from its config: acting and the PPO
    replay compute the same features; :meth:`rlmem.adapters.MemoryAdaptedLM.train`).
    Cost of a step: one LM pass over ``window`` tokens per row (window mode), one token per row (streaming).
    """

    test_kwargs = {"hidden_size": 16, "n_layers": 2, "n_heads": 2, "window": 4, "num_memory_tokens": 4,
                   "num_heads": 2, "lora_rank": 2}

    def __init__(self, d_in: int, source: str = "tiny", window: int = 16, hidden_size: int = 64, n_layers: int = 2,
                 n_heads: int = 4, base_seed: int = 0, mode: str = "window", **adapter: Any):
        super().__init__()
        name = self.registry_name
        self.d_in = d_in
        self.window = check_int(f"{name}: window", window, low=2, why="the state holds window - 1 steps")
        try:
            cfg = MemoryAdapterConfig.from_dict(adapter)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (and the memory system's own: source, window, hidden_size, n_layers, "
                             "n_heads, base_seed, mode)") from None
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        if mode == "streaming" and cfg.memory and cfg.num_chapters > 1 and \
                (cfg.routing_train, cfg.routing_inference) != ("token", "token"):
            raise ValueError(f"{name}: mode=streaming computes each token once, so chapter routing must decide per "
                             "token: set routing_train=token and routing_inference=token (or num_chapters=1)")
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
        self._fast = fast.supported(self.lm) is not None
        if mode == "streaming" and not self._fast:
            raise ValueError(f"{name}: mode=streaming needs a LLaMA- or GPT-2-style base model, got "
                             f"{getattr(config, 'model_type', type(lm).__name__)!r}")
        self._n_layers = int(config.num_hidden_layers)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        hidden = int(config.hidden_size)
        self.d_out = self.hidden = hidden
        self.embed = nn.Linear(self.d_in, hidden)
        self.pad = nn.Parameter(torch.zeros(hidden))

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, window={self.window}, mode={self.mode}, "
                f"source={self.source!r} (frozen)")

    def initial_state(self, batch_size, device=None):
        dtype = self.embed.weight.dtype
        if self.mode == "streaming":
            shape = (batch_size, self._n_layers, self.window - 1, self._kv_heads, self._head_dim)
            return TensorDict({"k": torch.zeros(shape, device=device, dtype=dtype),
                               "v": torch.zeros(shape, device=device, dtype=dtype),
                               "valid": torch.zeros(batch_size, dtype=torch.long, device=device)},
                              batch_size=[batch_size])
        return TensorDict(
            {
                "window": torch.zeros(batch_size, self.window - 1, self.d_in, device=device, dtype=dtype),
                "valid": torch.zeros(batch_size, dtype=torch.long, device=device),
            },
            batch_size=[batch_size],
        )

    def _episode(self, is_init: torch.Tensor, valid: torch.Tensor):
        """``(start [B, T], live [B, T, W])``: the first step of each step's episode on a time axis where the
        state's slots are ``-(W-1) .. -1``, and which slots of each step's window belong to it."""
        T, W, dev = is_init.shape[1], self.window, is_init.device
        t = torch.arange(T, device=dev)
        last_reset = torch.where(is_init, t, -1).cummax(1).values  # [B, T]
        start = torch.where(last_reset >= 0, last_reset, -valid.unsqueeze(1))
        slot_time = t.unsqueeze(1) - (W - 1) + torch.arange(W, device=dev)  # [T, W]
        return start, slot_time.unsqueeze(0) >= start.unsqueeze(-1)

    def _keep(self, start: torch.Tensor, T: int):
        """The next state's ``valid: [B]`` and which of its ``W - 1`` slots belong to the running episode."""
        W = self.window
        valid = (T - start[:, -1]).clamp(max=W - 1)
        return valid, torch.arange(W - 1, device=start.device) >= (W - 1 - valid).unsqueeze(1)  # [B, W-1]

    def forward(self, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDict]:
        check_inputs(self, x, state, is_init)
        if self.mode == "streaming":
            return self._stream(x, state, is_init)
        if not self._fast:
            return reference.forward(self, x, state, is_init)
        B, T, _ = x.shape
        start, live = self._episode(is_init, state["valid"])
        full = torch.cat([state["window"], x], 1)  # [B, W - 1 + T, d_in]: time -(W-1) .. T-1
        y = fast.window_hidden(self.lm, self.embed(full), live, self.pad)
        valid, keep = self._keep(start, T)
        window = full[:, T:] * keep.unsqueeze(-1).to(full.dtype)
        return y, TensorDict({"window": window, "valid": valid}, batch_size=state.batch_size)

    def _stream(self, x, state, is_init):
        T, W = x.shape[1], self.window
        start, live = self._episode(is_init, state["valid"])
        pad_k, pad_v = self._pad_cache()
        y, k, v = fast.stream_hidden(self.lm, self.embed(x), live, state["k"], state["v"], pad_k, pad_v)
        valid, keep = self._keep(start, T)
        keep = keep.view(keep.shape[0], 1, W - 1, 1, 1).to(k.dtype)
        return y, TensorDict({"k": k[:, :, T:] * keep, "v": v[:, :, T:] * keep, "valid": valid},
                             batch_size=state.batch_size)

    def _pad_cache(self):
        """The padding's per-layer keys/values (:func:`rlmem.adapters.fast.pad_cache`). Without autograd
        (acting) they are reused while no parameter has changed (same storage, same in-place version)."""
        if torch.is_grad_enabled():
            self._pad_kv = None
            return fast.pad_cache(self.lm, self.pad, self.window)
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in (self.pad, *self.lm.parameters()))
        cached = getattr(self, "_pad_kv", None)
        if cached is None or cached[0] != key:
            cached = (key, fast.pad_cache(self.lm, self.pad, self.window))
            self._pad_kv = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_pad_kv", None)  # a cache, not part of the model (copies and pickles recompute it)
        return state

    def aux_loss(self) -> torch.Tensor | None:
        return self.lm.aux_loss()

    def diagnostics(self) -> dict[str, float]:
        if self.lm.adapter is None:
            return {}
        return {f"router/{k}": float(v.detach()) for k, v in self.lm.adapter.router_stats().items()}
