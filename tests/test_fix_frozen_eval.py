"""Frozen base LMs never run with dropout: ``agent.train()`` (the trainer calls it after every evaluation)
leaves every frozen module of the adapter and STM memories in eval mode, so acting and the PPO replay
compute the same features even when the base model's config has dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlmem.agents import build_agent

ENV = {"id": "rlmem/DelayedCue-v0", "delay": 3}


@pytest.fixture(scope="module")
def dropout_gpt2(tmp_path_factory):
    """A small GPT-2 saved with ``save_pretrained`` whose config has GPT-2's dropout of 0.1 everywhere."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=None, eos_token_id=None)
    path = tmp_path_factory.mktemp("gpt2_dropout")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def _agent(name, source):
    if name == "adapter":
        cfg = {"memory": "adapter", "encoder_dim": 8, "source": source, "window": 4, "num_memory_tokens": 4,
               "num_heads": 2, "lora_rank": 2}
    else:
        cfg = {"memory": "stm", "encoder_dim": 8, "d_model": 16, "n_slots": 3, "n_refine": 1, "n_heads": 2,
               "generator": source}
    return build_agent(cfg, ENV, seed=0)


def _frozen_modules(memory) -> dict[str, nn.Module]:
    """Modules of the base LM: the adapter's wrapped model (LoRA's own modules aside; blocks holding LoRA
    layers included, their own code applies dropout), STM's generator."""
    if hasattr(memory, "generator"):
        return dict(memory.generator.named_modules())
    return {n: m for n, m in memory.lm.model.named_modules() if "lora_" not in n}


@pytest.mark.parametrize("name", ["adapter", "stm"])
def test_train_mode_leaves_the_frozen_base_model_in_eval_mode(name, dropout_gpt2):
    agent = _agent(name, dropout_gpt2)
    memory = agent.memory
    dropouts = [n for n, m in _frozen_modules(memory).items() if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropouts, "the base config has dropout: the test must see it"
    for _ in range(2):  # as the trainer: eval for an evaluation, train after it
        agent.eval()
        agent.train()
        assert agent.training and memory.training
        training = [n for n, m in _frozen_modules(memory).items() if m.training]
        assert training == [], f"frozen modules in train mode after agent.train(): {training[:5]}"
    # the same inputs twice in train mode: no dropout mask, the same features (acting == replay)
    torch.manual_seed(1)
    x = torch.randn(3, 5, memory.d_in)
    is_init = torch.zeros(3, 5, dtype=torch.bool)
    is_init[:, 0] = True
    y1, _ = memory(x, memory.initial_state(3), is_init)
    y2, _ = memory(x, memory.initial_state(3), is_init)
    assert torch.equal(y1, y2), f"max abs difference {float((y1 - y2).abs().max()):.3g}"
    # the trainable parts still train
    assert any(p.requires_grad for p in memory.parameters())
