"""Memory adapters for a frozen pretrained causal LM: a learnable memory bank read by cross-attention
inside its decoder blocks (variant A: SA -> Mem -> MLP, variant B: SA -> MLP -> Mem -> MLP), with
placement, sharing, low-rank banks and reads, chapter routing, int8 banks for inference, and LoRA.

    >>> from rlmem.adapters import inject_memory
    >>> model = inject_memory("tiny-gpt2", num_memory_tokens=32, variant="B", lora_rank=4)
    >>> logits = model(input_ids=ids).logits          # equal to the base model's at initialization
    >>> model.save_adapter("out/adapter")             # the adapter and LoRA weights only
"""

from rlmem.adapters.bank import Int8Bank, MemoryBank, quantize_rows
from rlmem.adapters.config import MemoryAdapterConfig, bank_assignment, placement_layers
from rlmem.adapters.inject import (MemoryAdaptedLM, MemoryAdapter, attention_module, inject_memory, load_adapter,
                                   quantize_memory)
from rlmem.adapters.read import ExtraMLP, MemoryRead, router_losses

__all__ = [
    "ExtraMLP",
    "Int8Bank",
    "MemoryAdaptedLM",
    "MemoryAdapter",
    "MemoryAdapterConfig",
    "MemoryBank",
    "MemoryRead",
    "attention_module",
    "bank_assignment",
    "inject_memory",
    "load_adapter",
    "placement_layers",
    "quantize_memory",
    "quantize_rows",
    "router_losses",
]
