"""A fused forward of a frozen LLaMA-family decoder stack, for STM's generator read.

STM reads its generator once per step (acting) or once per ``B x T`` buffers (replay), always the same way:
input embeddings ``[N, S, hidden]`` with ``S = K + 2`` small, no cache, no padding, and only the last
position's last hidden state is used. ``transformers``' ``LlamaModel.forward`` spends most of such a call on
things this read does not need: building a causal mask, recomputing the rotary tables, three q/k/v and two
gate/up matmuls per layer, and the whole last layer (attention queries, MLP, final norm) at every position.

:func:`fused_last_hidden` computes the same numbers with: one matmul for q/k/v and one for gate/up per layer
(the HF weights concatenated on the fly with ``torch.cat``: nothing is copied into new parameters or buffers,
so ``state_dict``, ``load_state_dict``, ``.to()`` and checkpoints are untouched); the rotary ``cos``/``sin``
from the model's own ``rotary_emb`` cached per (length, dtype, device, ``inv_freq`` version); SDPA with
``is_causal`` instead of a mask; and the last layer at the last position only (its keys and values at every
position). RMSNorm keeps HF's float32 computation. Gradients flow to the input embeddings as through the
HF call. ``supports_fused(model)`` says whether a model qualifies (plain LLaMA: no sliding window, no
cache, eval mode); anything else goes through the HF call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports_fused(model: nn.Module) -> bool:
    """True for a ``transformers`` ``LlamaModel`` whose layers are plain ``LlamaDecoderLayer``s."""
    try:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm
    except ImportError:  # pragma: no cover
        return False
    if type(model) is not LlamaModel:
        return False
    config = model.config
    if getattr(config, "pretraining_tp", 1) not in (None, 1) or getattr(config, "sliding_window", None):
        return False
    layers = model.layers[: config.num_hidden_layers]
    if not all(type(layer) is LlamaDecoderLayer for layer in layers):
        return False
    norms = [model.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return all(type(n) is LlamaRMSNorm for n in norms)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` exactly as transformers computes it (in float32, weight applied in the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class _RotaryCache:
    """``(cos, sin)`` of positions ``0 .. S-1``, ``[1, 1, S, head_dim]``, from the model's own ``rotary_emb``."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, model: nn.Module, S: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = getattr(model.rotary_emb, "inv_freq", None)
        key = (S, like.dtype, like.device, None if inv is None else (inv.data_ptr(), inv._version, inv.dtype))
        if key != self.key:
            with torch.no_grad():
                pos = torch.arange(S, device=like.device).unsqueeze(0)
                cos, sin = model.rotary_emb(like.detach()[:1, :S], position_ids=pos)
            self.key, self.value = key, (cos.unsqueeze(1), sin.unsqueeze(1))
        return self.value

    def __deepcopy__(self, memo):
        return _RotaryCache()

    def __getstate__(self):
        return {"key": None, "value": None}


def _cat_weights(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight for lin in linears], 0)
    biases = [lin.bias for lin in linears]
    bias = None if any(b is None for b in biases) else torch.cat(biases, 0)
    return weight, bias


def fused_last_hidden(model: nn.Module, embeds: torch.Tensor, rotary: _RotaryCache) -> torch.Tensor:
    """``model(inputs_embeds=embeds).last_hidden_state[:, -1]`` of a LLaMA model (:func:`supports_fused`):
    ``embeds: [N, S, hidden]`` -> ``[N, hidden]``."""
    config = model.config
    layers = model.layers[: config.num_hidden_layers]
    N, S, _ = embeds.shape
    cos, sin = rotary.get(model, S, embeds)
    h = embeds
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hd = attn.head_dim
        n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        x = _rms_norm(layer.input_layernorm, h)
        if i < last:
            w, b = _cat_weights((attn.q_proj, attn.k_proj, attn.v_proj))
            qkv = F.linear(x, w, b).view(N, S, n_q + 2 * n_kv, hd).transpose(1, 2)  # [N, heads, S, hd]
            qk, v = qkv.split((n_q + n_kv, n_kv), 1)
            qk = qk * cos + _rotate_half(qk) * sin  # queries and keys rotated together
            q, k = qk.split((n_q, n_kv), 1)
        else:  # the last layer: keys and values everywhere, the query at the last position only
            w, b = _cat_weights((attn.k_proj, attn.v_proj))
            kv = F.linear(x, w, b).view(N, S, 2 * n_kv, hd).transpose(1, 2)
            k, v = kv.split((n_kv, n_kv), 1)
            q = attn.q_proj(x[:, -1:]).view(N, 1, n_q, hd).transpose(1, 2)
            q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
            k = k * cos + _rotate_half(k) * sin
            h = h[:, -1:]
        if n_kv != n_q:
            k = k.repeat_interleave(n_q // n_kv, 1)
            v = v.repeat_interleave(n_q // n_kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=i < last and S > 1, scale=attn.scaling)
        h = h + attn.o_proj(a.transpose(1, 2).reshape(N, h.shape[1], n_q * hd))
        mlp = layer.mlp
        x = _rms_norm(layer.post_attention_layernorm, h)
        w, b = _cat_weights((mlp.gate_proj, mlp.up_proj))
        gate, up = F.linear(x, w, b).chunk(2, -1)
        h = h + mlp.down_proj(mlp.act_fn(gate) * up)
    return _rms_norm(model.norm, h[:, -1])
