"""Small causal LMs from ``transformers``: built from a config, loaded from a local directory, frozen, and
pretrained on this project's LM tasks.

Systems that read a pretrained transformer (the STM generator, the memory adapters) get their base model
here, so every one of them accepts the same sources:

- ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-gpt2"``: a small randomly initialized model built from a config
  (tests, and a base for :func:`pretrain_causal_lm`);
- a local directory written by ``save_pretrained`` (``scripts/pretrain_lm.py`` writes one). Nothing is
  ever downloaded.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rlmem.lm_tasks.tasks import IGNORE_INDEX, LMBatch, LMTask

#: architectures :func:`tiny_causal_lm` builds
ARCHITECTURES = ("llama", "gpt2")
#: sources :func:`load_causal_lm` builds from a config (anything else is a local directory)
TINY_SOURCES = {"tiny": "llama", "tiny-llama": "llama", "tiny-gpt2": "gpt2"}


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 128, hidden_size: int = 64, n_layers: int = 2,
                   n_heads: int = 4, max_positions: int = 1024, seed: int | None = None) -> nn.Module:
    """A small randomly initialized causal LM (``LlamaForCausalLM`` or ``GPT2LMHeadModel``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown causal LM architecture {arch!r}; valid choices: {', '.join(ARCHITECTURES)}")
    if hidden_size % n_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")
    if seed is not None:
        torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=n_layers, n_head=n_heads,
                            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside a small vocabulary
        model = GPT2LMHeadModel(config)
    return model.eval()


def load_causal_lm(source: str | Path, **tiny_kwargs: Any) -> nn.Module:
    """The causal LM named by ``source``: a tiny config-built model or a local ``save_pretrained`` directory.

    ``tiny_kwargs`` (``vocab_size``, ``hidden_size``, ...) go to :func:`tiny_causal_lm` and are ignored for
    a directory. Raises ``FileNotFoundError`` for a missing directory and ``ValueError`` for a directory that
    does not hold a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if str(source) in TINY_SOURCES:
        return tiny_causal_lm(TINY_SOURCES[str(source)], **tiny_kwargs)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"causal LM {str(source)!r}: no such directory; valid choices: {', '.join(TINY_SOURCES)} or a local "
            "directory written by save_pretrained (models are never downloaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} does not hold a transformers model config ({e})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{path} does not hold a causal LM: transformers has no causal LM for its model type "
                         f"{config.model_type!r} (e.g. llama, gpt2, mistral, qwen2 are causal LMs)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise ValueError(f"{path} holds a {config.model_type!r} config but no loadable weights: {e}") from None
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter (they are excluded from optimizers built on trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` for LLaMA, ``model.transformer.h`` for GPT-2, ...)."""
    n = model.config.num_hidden_layers
    for module in model.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def lm_labels(batch: LMBatch) -> torch.Tensor:
    """Next-token labels of a task batch: ``labels[:, t]`` is ``inputs[:, t + 1]``, or the task's answer at
    answer positions (so the model learns the task's language and its answers). ``[B, T]`` int64."""
    labels = torch.full_like(batch.inputs, IGNORE_INDEX)
    labels[:, :-1] = batch.inputs[:, 1:]
    return torch.where(batch.mask, batch.targets, labels)


def lm_loss(model: nn.Module, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(next-token cross-entropy, answer accuracy)`` of ``model`` on a task batch."""
    logits = model(input_ids=batch.inputs).logits  # [B, T, V]
    labels = lm_labels(batch)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    accuracy = (logits.argmax(-1) == batch.targets)[batch.mask].float().mean()
    return loss, accuracy


def pretrain_causal_lm(model: nn.Module, task: LMTask, steps: int, batch_size: int = 32, lr: float = 3e-3,
                       warmup_steps: int = 50, seed: int = 0, eval_seed: int = 1000, eval_batches: int = 4,
                       progress: bool = False) -> dict[str, float]:
    """Next-token pretraining of ``model`` on ``task`` samples (AdamW, warm-up + cosine, grad clip 1).

    Returns held-out ``eval_loss`` and ``eval_answer_accuracy`` (before and after training), ``wall_seconds``
    and ``tokens_per_s``.
    """
    if model.config.vocab_size < task.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the task's "
                         f"({task.vocab_size})")
    rng, eval_rng = np.random.default_rng(seed), np.random.default_rng(eval_seed)
    held_out = [task.batch(batch_size, eval_rng) for _ in range(eval_batches)]

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            results = [lm_loss(model, b) for b in held_out]
        return (float(np.mean([r[0].item() for r in results])), float(np.mean([r[1].item() for r in results])))

    loss_before, acc_before = evaluate()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps))
                                                 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    model.train()
    start = time.perf_counter()
    for _ in tqdm(range(steps), disable=not progress, desc="pretrain", dynamic_ncols=True):
        loss, _ = lm_loss(model, task.batch(batch_size, rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    wall = time.perf_counter() - start
    loss_after, acc_after = evaluate()
    return {"eval_loss_before": loss_before, "eval_answer_accuracy_before": acc_before, "eval_loss": loss_after,
            "eval_answer_accuracy": acc_after, "chance_accuracy": task.chance_accuracy(), "steps": steps,
            "wall_seconds": wall, "tokens_per_s": steps * batch_size * task.seq_len / max(wall, 1e-9)}
