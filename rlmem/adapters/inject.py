"""Injecting memory reads (and LoRA) into a frozen ``transformers`` causal LM, and saving what was learned.

:func:`inject_memory` freezes the model, optionally adds LoRA to its attention projections (``peft``), and
hooks a :class:`MemoryAdapter` into its decoder blocks. The model's own forward is unchanged; the hooks
place each read:

- **variant A** (SA -> Mem -> MLP): a forward pre-hook on the block records its input ``x``, a forward hook
  on the block's attention module sees the attention output ``a`` and returns ``a + read(x + a)``. The
  block then adds its residual as usual, so both its residual stream and its MLP see ``x + a + read``:
  the read sits exactly between the attention and the MLP. This holds for blocks of the form
  ``h = x + SA(norm(x)); h = h + MLP(norm(h))`` (LLaMA, GPT-2, Mistral, Qwen, ...), not for blocks with a
  parallel residual (GPT-NeoX ``use_parallel_residual``, Falcon ``parallel_attn``), which are refused.
- **variant B** (SA -> MLP -> Mem -> MLP): a forward hook on the block turns its output ``h`` into
  ``h' = h + read(h)`` followed by a new MLP, ``h' + MLP_new(LN(h'))``.

In transformers 5 decoder layers return a bare tensor (attention modules a tuple); the hooks accept both
a tensor and a tuple whose first element is the hidden states, and return the same kind. Hooks are
``functools.partial`` of the adapter's own methods, so ``copy.deepcopy`` and pickling of the adapted
model carry them over to the copy's adapter.

Nothing of the base model is trained: its parameters have ``requires_grad=False``; the trainable ones are
the adapter's (banks, read projections, routers, variant B's MLPs) and LoRA's. :meth:`MemoryAdaptedLM.
save_adapter` writes only those (plus the config) and :func:`load_adapter` puts them back on a base model.
The base model also never runs with dropout: :meth:`MemoryAdaptedLM.train` keeps every module of it
(its dropouts and the attention modules that apply dropout themselves; LoRA's own modules aside) in eval
mode, so a base whose
config has dropout (GPT-2's 0.1) gives the same features on every call, as a frozen model should (in RL,
acting and the PPO replay of the same steps must agree).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlmem.adapters.bank import Int8Bank, MemoryBank, bank_nbytes
from rlmem.adapters.config import MemoryAdapterConfig, bank_assignment, placement_layers
from rlmem.adapters.read import ExtraMLP, MemoryRead, router_losses
from rlmem.causal_lm import decoder_layers, freeze, load_causal_lm

#: names of a decoder block's attention submodule across transformers architectures
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
#: files :meth:`MemoryAdaptedLM.save_adapter` writes
CONFIG_FILE, MEMORY_FILE, LORA_FILE = "memory_adapter.json", "memory_adapter.safetensors", "lora.safetensors"


class _Transient:
    """What one forward passes between hooks (padding mask, block inputs, routing decisions). A copy or a
    pickle of the model has run no forward, so it starts empty (non-leaf tensors cannot be deep-copied)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.block_input: dict[int, torch.Tensor] = {}
        self.routing: list[dict[str, torch.Tensor]] = []

    def __deepcopy__(self, memo):
        return _Transient()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced: a bare tensor (transformers 5 blocks) or a tuple."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def attention_module(block: nn.Module) -> nn.Module:
    """The self-attention submodule of a decoder block (``self_attn`` in LLaMA, ``attn`` in GPT-2, ...)."""
    for name in ATTENTION_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the attention submodule of {type(block).__name__} (looked for "
                     f"{', '.join(ATTENTION_NAMES)}); variant A needs it, variant B only hooks the block")


class MemoryAdapter(nn.Module):
    """Banks, per-layer reads (and variant B's MLPs) for a model with ``n_layers`` decoder layers of width
    ``hidden``. Hooked into the model by :meth:`attach`; every memory layer ("site") ``s`` reads bank
    ``bank_index[s]`` at decoder layer ``layer_indices[s]``."""

    def __init__(self, cfg: MemoryAdapterConfig, hidden: int, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.layer_indices = placement_layers(cfg, n_layers)
        self.bank_index = bank_assignment(cfg, len(self.layer_indices))
        d_mem = cfg.d_mem or hidden
        self.banks = nn.ModuleList(MemoryBank(cfg.num_memory_tokens, d_mem, cfg.bank_rank, cfg.init_std)
                                   for _ in range(max(self.bank_index) + 1))
        self.reads = nn.ModuleList(MemoryRead(hidden, d_mem, cfg) for _ in self.layer_indices)
        self.mlps = nn.ModuleList(ExtraMLP(hidden, cfg.extra_mlp_dim or 2 * hidden) for _ in self.layer_indices) \
            if cfg.variant == "B" else None
        self._now = _Transient()

    def extra_repr(self) -> str:
        return f"variant={self.cfg.variant}, layers={self.layer_indices}, bank_index={self.bank_index}"

    # -- hooks -------------------------------------------------------------------------------------------

    def attach(self, layers: nn.ModuleList) -> None:
        """Register the hooks on the decoder blocks ``layers``."""
        for site, i in enumerate(self.layer_indices):
            block = layers[i]
            if self.cfg.variant == "A":
                block.register_forward_pre_hook(functools.partial(self._remember_input, site), with_kwargs=True)
                attention_module(block).register_forward_hook(functools.partial(self._after_attention, site))
            else:
                block.register_forward_hook(functools.partial(self._after_block, site))

    def _remember_input(self, site: int, block: nn.Module, args: tuple, kwargs: dict) -> None:
        self._now.block_input[site] = args[0] if args else kwargs["hidden_states"]

    def _after_attention(self, site: int, attn: nn.Module, args: tuple, output: Any) -> Any:
        a = _hidden(output)
        x = self._now.block_input.pop(site)
        return _replace_hidden(output, a + self.read(site, x + a))

    def _after_block(self, site: int, block: nn.Module, args: tuple, output: Any) -> Any:
        h = _hidden(output)
        h = h + self.read(site, h)
        return _replace_hidden(output, self.mlps[site](h))

    # -- reading -----------------------------------------------------------------------------------------

    def begin(self, mask: torch.Tensor | None) -> None:
        """Start a forward: ``mask: [B, T]`` (True at real tokens, or None) for the routers."""
        self._now = _Transient()
        self._now.mask = None if mask is None else mask.bool()

    def read(self, site: int, h: torch.Tensor) -> torch.Tensor:
        """Site ``site``'s read of its bank for hidden states ``h: [B, T, hidden]`` -> ``[B, T, hidden]``."""
        routing = self.cfg.routing_train if self.training else self.cfg.routing_inference
        mask = self._now.mask
        if mask is not None:  # with a KV cache the hidden states cover the last positions of the mask only
            mask = mask[:, -h.shape[1]:] if mask.shape[0] == h.shape[0] and mask.shape[1] >= h.shape[1] else None
        bank = self.banks[self.bank_index[site]].tokens().to(h.dtype)
        out, info = self.reads[site](h, bank, routing, mask)
        if info is not None:
            self._now.routing.append(info)
        return out

    def router_stats(self) -> dict[str, torch.Tensor]:
        """Mean load-balance and z loss over the reads of the last forward (empty without chapters)."""
        if not self._now.routing:
            return {}
        losses = [router_losses(info, self.cfg.num_chapters, self.cfg.top_k_chapters) for info in self._now.routing]
        return {"load_balance": torch.stack([lb for lb, _ in losses]).mean(),
                "z_loss": torch.stack([z for _, z in losses]).mean()}

    def aux_loss(self) -> torch.Tensor | None:
        """``load_balance_coef * load_balance + z_loss_coef * z_loss`` of the last forward (None without
        chapters)."""
        stats = self.router_stats()
        if not stats:
            return None
        return self.cfg.load_balance_coef * stats["load_balance"] + self.cfg.z_loss_coef * stats["z_loss"]


class MemoryAdaptedLM(nn.Module):
    """A frozen causal LM with memory reads and/or LoRA. Called like the model it wraps (``model(input_ids=...)
    .logits``); ``use_cache`` defaults to False. Call it (or :meth:`hidden_states`) rather than ``self.model``:
    each call starts a fresh record of routing decisions for :meth:`aux_loss` and hands the padding mask to
    the routers."""

    def __init__(self, model: nn.Module, adapter: MemoryAdapter | None, cfg: MemoryAdapterConfig,
                 lora_targets: list[str] | None):
        super().__init__()
        self.model, self.adapter, self.cfg, self.lora_targets = model, adapter, cfg, lora_targets
        self.quantized = False
        self.train(self.training)

    def train(self, mode: bool = True):
        """Set the mode of the trainable parts (adapter, LoRA); the frozen base model stays in eval mode."""
        super().train(mode)
        for module in frozen_modules(self.model):
            module.training = False
        return self

    @property
    def config(self):
        """The base model's ``transformers`` config."""
        return self.model.config

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        self._begin(input_ids, attention_mask, kwargs)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._end()

    def hidden_states(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      **kwargs: Any) -> torch.Tensor:
        """The last layer's hidden states (after the final norm), ``[B, T, hidden]``: the decoder stack
        without the LM head."""
        self._begin(input_ids, attention_mask, kwargs)
        try:
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         **kwargs).last_hidden_state
        finally:
            self._end()

    def _begin(self, input_ids, attention_mask, kwargs) -> None:
        kwargs.setdefault("use_cache", False)
        if self.adapter is not None:
            self.adapter.begin(attention_mask)

    def _end(self) -> None:
        if self.adapter is not None:  # a later direct call of self.model must not route with this call's mask
            self.adapter._now.mask = None
            self.adapter._now.block_input.clear()

    def aux_loss(self) -> torch.Tensor | None:
        """The routers' auxiliary loss of the last forward (None without chapters or memory)."""
        return None if self.adapter is None else self.adapter.aux_loss()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model) if self.lora_targets else {}

    def save_adapter(self, path: str | Path) -> Path:
        """Write the config, the adapter's weights and LoRA's weights (not the base model) into ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.cfg.to_dict(), "quantized": self.quantized, "lora_targets": self.lora_targets,
                "base_model_type": getattr(self.model.config, "model_type", None),
                "base_hidden_size": int(self.model.config.hidden_size),
                "base_layers": len(decoder_layers(self.model))}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if self.adapter is not None:
            save_file({k: v.contiguous() for k, v in self.adapter.state_dict().items()}, str(path / MEMORY_FILE))
        if self.lora_targets:
            save_file({k: v.contiguous() for k, v in self.lora_state_dict().items()}, str(path / LORA_FILE))
        return path


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the frozen base ``model``: all but LoRA's own (``lora_`` in their name). Blocks that hold
    LoRA layers are among them: their own code applies dropout when they train (GPT-2's attention passes
    ``attn_dropout.p if self.training`` to its attention kernel)."""
    return [module for name, module in model.named_modules() if "lora_" not in name]


def _lora_targets(model: nn.Module, cfg: MemoryAdapterConfig) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if cfg.lora_targets is not None:
        missing = [t for t in cfg.lora_targets if t not in names]
        if missing:
            raise ValueError(f"lora_targets {missing} name no module of {type(model).__name__}")
        return cfg.lora_targets
    if "c_attn" in names:  # GPT-2 fuses q, k, v into one Conv1D
        return ["c_attn"]
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    raise ValueError(f"no default LoRA targets for {type(model).__name__}: set lora_targets to the names of its "
                     "attention projections")


def _add_lora(model: nn.Module, cfg: MemoryAdapterConfig) -> list[str]:
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    targets = _lora_targets(model, cfg)
    # GPT-2's Conv1D stores its weight as [in, out]: peft must be told (it would warn and guess)
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    inject_adapter_in_model(lora, model)  # in place; lora_B starts at zero, so LoRA starts as a no-op
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return targets


def _check_causal_lm(model: nn.Module) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    if not hasattr(model, "config") or not any(c.__name__ in classes for c in type(model).__mro__):
        raise ValueError(f"inject_memory needs a transformers causal LM (e.g. LlamaForCausalLM, GPT2LMHeadModel), "
                         f"got {type(model).__name__}")


def inject_memory(model: nn.Module | str | Path, cfg: MemoryAdapterConfig | dict | None = None,
                  **overrides: Any) -> MemoryAdaptedLM:
    """Freeze ``model`` and add memory reads (and LoRA) as ``cfg`` says.

    Args:
        model: a ``transformers`` causal LM, or a source for :func:`rlmem.causal_lm.load_causal_lm`
            (``"tiny"``, ``"tiny-llama"``, ``"tiny-gpt2"`` or a local ``save_pretrained`` directory).
        cfg: a :class:`MemoryAdapterConfig`, a dict of its fields, or None (defaults); ``overrides`` are
            applied on top (``inject_memory(model, variant="B")``).

    The model is modified in place (frozen, hooks, LoRA layers) and wrapped; a model can be injected once.
    """
    if isinstance(model, (str, Path)):
        model = load_causal_lm(model)
    base = cfg.to_dict() if isinstance(cfg, MemoryAdapterConfig) else dict(cfg or {})
    cfg = MemoryAdapterConfig.from_dict({**base, **overrides})
    _check_causal_lm(model)
    if getattr(model, "_rlmem_memory_injected", False):
        raise ValueError("this model already has memory adapters injected; inject into a fresh copy")
    config = model.config
    if cfg.memory and cfg.variant == "A" and (getattr(config, "use_parallel_residual", False)
                                              or getattr(config, "parallel_attn", False)):
        raise ValueError(f"variant A puts the read between attention and MLP, but {type(model).__name__} runs them "
                         "in parallel (parallel residual); use variant B")
    layers = decoder_layers(model)
    hidden = int(config.hidden_size)
    adapter = MemoryAdapter(cfg, hidden, len(layers)) if cfg.memory else None  # placement errors before changes
    freeze(model)
    lora_targets = _add_lora(model, cfg) if cfg.lora_rank else None
    if adapter is not None:
        first = next(model.parameters())
        adapter.to(device=first.device, dtype=first.dtype)
        adapter.attach(layers)
    model._rlmem_memory_injected = True
    return MemoryAdaptedLM(model, adapter, cfg, lora_targets)


def quantize_memory(model: MemoryAdaptedLM) -> dict[str, int]:
    """Replace every bank by its int8 form (:class:`~rlmem.adapters.bank.Int8Bank`) for inference.

    Returns ``{"bytes_before": ..., "bytes_after": ...}`` over all banks. The banks no longer train.
    """
    if model.adapter is None:
        raise ValueError("the model has no memory bank to quantize (memory=false)")
    banks = model.adapter.banks
    before = sum(bank_nbytes(b) for b in banks)
    for i, bank in enumerate(banks):
        if isinstance(bank, MemoryBank):
            banks[i] = Int8Bank(bank)
    model.quantized = True
    return {"bytes_before": before, "bytes_after": sum(bank_nbytes(b) for b in banks)}


def load_adapter(model: nn.Module | str | Path, path: str | Path) -> MemoryAdaptedLM:
    """Inject the adapter saved in ``path`` (by :meth:`MemoryAdaptedLM.save_adapter`) into the base ``model``
    (a causal LM or a source for ``load_causal_lm``) and load its weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no saved memory adapter ({CONFIG_FILE} missing)")
    meta = json.loads((path / CONFIG_FILE).read_text())
    adapted = inject_memory(model, MemoryAdapterConfig.from_dict(meta["config"]))
    layers, hidden = len(decoder_layers(adapted.model)), int(adapted.model.config.hidden_size)
    if (layers, hidden) != (meta["base_layers"], meta["base_hidden_size"]):
        raise ValueError(f"the adapter in {path} was trained on a model with {meta['base_layers']} layers of width "
                         f"{meta['base_hidden_size']}; this one has {layers} of width {hidden}")
    if meta["quantized"]:
        quantize_memory(adapted)
    if adapted.adapter is not None:
        adapted.adapter.load_state_dict(load_file(str(path / MEMORY_FILE)))
    if adapted.lora_targets:
        result = set_peft_model_state_dict(adapted.model, load_file(str(path / LORA_FILE)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA weights in {path} do not fit the model: {result.unexpected_keys[:4]} ...")
    return adapted
