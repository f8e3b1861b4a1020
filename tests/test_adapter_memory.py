"""The ``adapter`` memory system (rlmem/memory/adapter.py): a frozen LM with memory adapters reading a window of
recent inputs kept in the state. The shared contract is in test_memory_contract.py; this file checks what the
window means, the sources, the knobs reaching the adapter, and the configs."""

from __future__ import annotations

import pytest
import torch

from rlmem.causal_lm import tiny_causal_lm
from rlmem.memory import build_memory

SMALL = {"hidden_size": 16, "n_layers": 2, "n_heads": 2, "num_memory_tokens": 4, "num_heads": 2}


def make(**kwargs):
    torch.manual_seed(0)
    return build_memory("adapter", d_in=3, **{**SMALL, **kwargs}).eval()


def run(memory, x, is_init=None):
    if is_init is None:
        is_init = torch.zeros(x.shape[:2], dtype=torch.bool)
        is_init[:, 0] = True
    with torch.no_grad():
        return memory(x, memory.initial_state(x.shape[0]), is_init)


def test_output_depends_on_exactly_the_last_window_steps():
    memory = make(window=4)
    x = torch.randn(1, 10, 3)
    y, _ = run(memory, x)
    for changed, reaches in ((5, True), (6, True), (2, False)):  # y[:, 8] reads steps 5..8
        x2 = x.clone()
        x2[:, changed] += 1.0
        y2, _ = run(memory, x2)
        assert (not torch.allclose(y2[:, 8], y[:, 8])) == reaches, changed
        assert torch.equal(y2[:, :changed], y[:, :changed])  # nothing reads the future


def test_state_holds_the_last_inputs_and_how_many_belong_to_the_episode():
    memory = make(window=5)
    x = torch.randn(2, 6, 3)
    is_init = torch.zeros(2, 6, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[1, 4] = True  # row 1 restarts two steps before the end
    with torch.no_grad():
        _, state = memory(x[:, :2], memory.initial_state(2), is_init[:, :2])
        assert state["valid"].tolist() == [2, 2]
        torch.testing.assert_close(state["window"][:, 2:], x[:, :2])
        assert torch.equal(state["window"][:, :2], torch.zeros(2, 2, 3))
        _, state = memory(x[:, 2:], state, is_init[:, 2:])
    assert state["valid"].tolist() == [4, 2]
    torch.testing.assert_close(state["window"][0], x[0, 2:])
    torch.testing.assert_close(state["window"][1, 2:], x[1, 4:])
    assert torch.equal(state["window"][1, :2], torch.zeros(2, 3))  # steps of the previous episode are gone


def test_adapter_knobs_reach_the_injected_model():
    memory = make(window=3, variant="B", placement=[1], num_chapters=2, top_k_chapters=1, lora_rank=2)
    adapter = memory.lm.adapter
    assert adapter.cfg.variant == "B" and adapter.layer_indices == [1] and adapter.mlps is not None
    assert memory.lm.lora_targets == ["q_proj", "v_proj"]
    memory.train()
    y, _ = memory(torch.randn(2, 4, 3), memory.initial_state(2), torch.ones(2, 4, dtype=torch.bool))
    aux = memory.aux_loss()
    assert aux is not None and aux.item() > 0
    assert set(memory.diagnostics()) == {"router/load_balance", "router/z_loss"}


def test_base_lm_is_frozen_and_only_adapter_parts_train():
    memory = make(window=3, lora_rank=2)
    trainable = {n for n, p in memory.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("embed.", "pad", "lm.adapter.")) or "lora_" in n for n in trainable)
    assert any(n.startswith("lm.model.") and not p.requires_grad for n, p in memory.named_parameters())


def test_gpt2_source_and_a_saved_directory(tmp_path):
    gpt2 = make(window=3, source="tiny-gpt2")
    assert type(gpt2.lm.model).__name__ == "GPT2LMHeadModel"
    tiny_causal_lm("llama", vocab_size=20, hidden_size=24, n_layers=1, n_heads=2).save_pretrained(tmp_path / "lm")
    saved = build_memory("adapter", d_in=3, source=str(tmp_path / "lm"), window=3, num_heads=2, num_memory_tokens=4)
    assert saved.d_out == 24
    y, _ = run(saved, torch.randn(2, 5, 3))
    assert y.shape == (2, 5, 24)


def test_clear_errors():
    with pytest.raises(ValueError, match="window"):
        make(window=1)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        make(source="/no/such/model")
    with pytest.raises(ValueError, match=r"no_such_knob is not an option of the memory adapter; valid: .*source, window"):
        make(no_such_knob=3)
    with pytest.raises(ValueError, match="divisible by num_chapters"):
        make(num_memory_tokens=5, num_chapters=2)


def test_the_tiny_base_lm_is_fixed_by_base_seed_not_by_the_global_seed():
    def base_weight(global_seed, base_seed):
        torch.manual_seed(global_seed)
        memory = build_memory("adapter", d_in=3, base_seed=base_seed, **SMALL)
        return memory.lm.model.model.layers[0].mlp.up_proj.weight

    assert torch.equal(base_weight(1, 0), base_weight(2, 0))
    assert not torch.equal(base_weight(1, 0), base_weight(1, 1))
