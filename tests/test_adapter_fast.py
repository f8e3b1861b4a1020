"""The ``adapter`` memory system's fast paths (rlmem/adapters/fast.py) against the reference
(rlmem/memory/reference/adapter.py: the window mode through ``transformers``' own forward, hooks and peft):
float64, same weights, step and sequence mode, resets mid-sequence, next states and gradients; and the
``streaming`` mode: the memory contract, and where it must equal window mode."""

from __future__ import annotations

import itertools

import pytest
import torch

import rlmem
from rlmem.adapters import fast
from rlmem.memory import build_memory
from rlmem.memory.reference import adapter as reference

ATOL = 1e-9
SMALL = {"hidden_size": 16, "n_layers": 2, "n_heads": 2, "num_memory_tokens": 4, "num_heads": 2, "window": 4,
         "lora_rank": 2}
CONFIGS = {
    "A": {},
    "B": {"variant": "B"},
    "chapters": {"num_chapters": 2, "top_k_chapters": 1},
    "one_layer": {"n_layers": 1},
    "three_layers_middle_read": {"n_layers": 3, "placement": [1], "bank_rank": 2},
}


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """transformers' LlamaRMSNorm computes in float32 whatever its input's dtype, so in float64 its backward
    rounds gradients to float32 (relative 1e-7), differently for per-token and per-slot batches. Both paths
    call the same module: here it computes in its input's dtype, so the comparison is float64 throughout."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def make(source="tiny", seed=0, **kwargs):
    """A float64 adapter memory whose trainable weights are all non-zero (reads and LoRA switched on)."""
    torch.manual_seed(seed)
    memory = build_memory("adapter", d_in=3, source=source, **{**SMALL, **kwargs}).double()
    with torch.no_grad():
        for p in memory.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return memory.train()


def inputs(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, dtype=torch.float64, generator=g)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    if T > 7:
        is_init[1, 4] = True
        is_init[2, 7] = True
    return x, is_init


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def stepwise(fn, memory, x, state, is_init):
    ys = []
    for t in range(x.shape[1]):
        y, state = fn(memory, x[:, t:t + 1], state, is_init[:, t:t + 1])
        ys.append(y)
    return torch.cat(ys, 1), state


def fast_forward(memory, x, state, is_init):
    return memory(x, state, is_init)


#: configs whose window mode runs the per-position work on the live slots only (fast._compact_hidden):
#: two or more layers and no chapter router
COMPACT = {"A", "B", "three_layers_middle_read", "lora_on_k"}


# LoRA on all of LLaMA's q/k/v projections: LLaMA only (GPT-2 fuses q/k/v into one c_attn)
@pytest.mark.parametrize("source, config", [*itertools.product(["tiny", "tiny-gpt2"], CONFIGS), ("tiny", "lora_on_k")])
def test_window_mode_equals_the_reference_outputs_states_and_gradients(source, config, monkeypatch):
    if config == "lora_on_k":
        kwargs = {"lora_targets": ["q_proj", "k_proj", "v_proj"]}
    else:
        kwargs = CONFIGS[config]
    compact_calls = []
    real_compact = fast._compact_hidden
    monkeypatch.setattr(fast, "_compact_hidden", lambda *a: compact_calls.append(1) or real_compact(*a))
    memory = make(source, **kwargs)
    x, is_init = inputs()
    is_init[0, 0] = False  # row 0 continues the episode of the state carried in from an earlier call
    warm, _ = inputs(T=2, seed=2)
    with torch.no_grad():
        _, state = reference.forward(memory, warm, memory.initial_state(3), torch.ones(3, 2, dtype=torch.bool))
    params = [p for p in memory.parameters() if p.requires_grad]
    readout = torch.randn(memory.d_out, dtype=torch.float64)
    results = {}
    for name, fn in (("fast", fast_forward), ("reference", reference.forward)):
        for mode in ("sequence", "step"):
            y, nxt = fn(memory, x, state, is_init) if mode == "sequence" else stepwise(fn, memory, x, state, is_init)
            aux = memory.aux_loss() if mode == "sequence" else None
            loss = (y @ readout).square().sum() + (0 if aux is None else aux)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results[name, mode] = (y, nxt, aux, grads)
    y, nxt, aux, grads = results["reference", "sequence"]
    for key, (y2, nxt2, aux2, grads2) in results.items():
        close(y2, y)
        assert nxt2.keys() == nxt.keys()
        close(nxt2["window"], nxt["window"])
        assert torch.equal(nxt2["valid"], nxt["valid"])
        if key[1] == "sequence":
            if aux is None:
                assert aux2 is None
            else:
                close(aux2, aux)
            names = [n for n, p in memory.named_parameters() if p.requires_grad]
            for n, g, g2 in zip(names, grads, grads2):
                assert (g is None) == (g2 is None), n
                if g is not None:
                    close(g2, g)
    assert any(g is not None and g.abs().sum() > 0 for g in results["fast", "sequence"][3])
    assert bool(compact_calls) == (config in COMPACT)


def test_window_mode_keeps_parameters_and_state():
    memory = make()
    assert memory.mode == "window"
    assert set(memory.initial_state(2).keys()) == {"window", "valid"}
    names = set(memory.state_dict())
    assert {"pad", "embed.weight", "lm.adapter.banks.0.weight"} <= names
    assert any("lora_A" in n for n in names)


@pytest.mark.parametrize("mode", ["window", "streaming"])
@pytest.mark.parametrize("source", ["tiny", "tiny-gpt2"])
def test_memory_contract(mode, source):
    torch.manual_seed(0)
    memory = build_memory("adapter", d_in=4, source=source, mode=mode, **SMALL)
    rlmem.check_memory(memory, verbose=False)


@pytest.mark.parametrize("mode", ["window", "streaming"])
def test_frozen_lm_stays_frozen_and_in_eval_mode(mode):
    memory = make(mode=mode).train()
    assert not any(m.training for n, m in memory.lm.model.named_modules() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in memory.lm.model.named_parameters() if "lora_" not in n)
    x, is_init = inputs()
    y, _ = memory(x, memory.initial_state(3), is_init)
    y.sum().backward()
    assert all(p.grad is None for n, p in memory.lm.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("source", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("config", ["A", "B"])
def test_streaming_equals_window_mode_at_the_first_step_of_each_episode(source, config):
    window, streaming = make(source, **CONFIGS[config]), make(source, mode="streaming", **CONFIGS[config])
    streaming.load_state_dict(window.state_dict())
    x, is_init = inputs(T=10)
    yw, _ = window(x, window.initial_state(3), is_init)
    ys, _ = streaming(x, streaming.initial_state(3), is_init)
    close(ys[is_init], yw[is_init])
    assert not torch.allclose(ys[~is_init], yw[~is_init])  # elsewhere a different model (docs/adapters.md)


@pytest.mark.parametrize("config", ["A", "B"])
def test_streaming_equals_window_mode_everywhere_for_one_rotary_layer(config):
    kwargs = {**CONFIGS[config], "n_layers": 1}
    window, streaming = make(**kwargs), make(mode="streaming", **kwargs)
    streaming.load_state_dict(window.state_dict())
    x, is_init = inputs(T=10)
    yw, _ = window(x, window.initial_state(3), is_init)
    ys, _ = stepwise(fast_forward, streaming, x, streaming.initial_state(3), is_init)
    close(ys, yw)


def test_streaming_state_and_errors():
    memory = make(mode="streaming")
    state = memory.initial_state(2)
    assert state["k"].shape == (2, 2, 3, 2, 8) and state["v"].shape == (2, 2, 3, 2, 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="recurrent")
    with pytest.raises(ValueError, match="routing_train=token"):
        make(mode="streaming", num_chapters=2)
    make(mode="streaming", num_chapters=2, routing_train="token", routing_inference="token")


@pytest.mark.parametrize("source", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("config", ["A", "B"])
def test_streaming_step_mode_equals_sequence_mode_in_float64(source, config):
    memory = make(source, mode="streaming", **CONFIGS[config])
    x, is_init = inputs()
    is_init[0, 0] = False  # row 0 continues an episode from the state carried in
    state = memory.initial_state(3)
    state["valid"][0] = 2
    state["k"][0, :, 1:] = torch.randn_like(state["k"][0, :, 1:])
    state["v"][0, :, 1:] = torch.randn_like(state["v"][0, :, 1:])
    y, nxt = memory(x, state, is_init)
    y2, nxt2 = stepwise(fast_forward, memory, x, state, is_init)
    close(y2, y)
    for key in ("k", "v"):
        close(nxt2[key], nxt[key])
    assert torch.equal(nxt2["valid"], nxt["valid"])


def test_streaming_acting_reuses_the_padding_cache_only_while_the_weights_are_unchanged():
    memory = make(mode="streaming")
    x, is_init = inputs()
    state = memory.initial_state(3)
    for change in (None, "pad", "lora", "load"):
        if change == "pad":
            with torch.no_grad():
                memory.pad.add_(0.5)
        elif change == "lora":
            with torch.no_grad():
                next(p for n, p in memory.named_parameters() if "lora_B" in n).add_(0.5)
        elif change == "load":
            other = make(mode="streaming", seed=3)
            memory.load_state_dict(other.state_dict())
        with torch.no_grad():
            y_cached, _ = memory(x, state, is_init)  # the second call of a round reads the cache
            y_cached, _ = memory(x, state, is_init)
        y_fresh, _ = memory(x, state, is_init)  # with autograd: always recomputed
        close(y_cached, y_fresh.detach())
