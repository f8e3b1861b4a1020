"""A fused forward of a frozen LLaMA-family decoder stack, for STM's generator read.

STM reads its generator once per step (acting) or once per ``B x T`` buffers (replay), always the same way:
input embeddings ``[N, S, hidden]`` with ``S = K + 2`` small, no cache, no padding, and only the last
position's last hidden state is used. ``transformers``' ``LlamaModel.forward`` spends most of such a call on
things this read does not need: building a causal mask, recomputing the rotary tables, three q/k/v and two
gate/up matmuls per layer, and the whole last layer (attention queries, MLP, final norm) at every position.

:func:`fused_last_hidden` computes the same numbers with: each position's rotary embedding folded into the
q and k weights (``R_p W``: rotating a projection's output is a fixed linear map per position), so one
batched matmul per layer projects every position to rotated queries, rotated keys and values (no
``rotate_half``, no elementwise rotary in forward or backward); one matmul for gate/up; SDPA with
``is_causal`` instead of a mask; and the last layer at the last position only (its keys and values at every
position). The derived weights (``S`` copies of the q/k weights; and the rotary ``cos``/``sin`` from the
model's own ``rotary_emb``) are
cached in a :class:`GeneratorCache` keyed on the length, dtype, device and every source tensor's storage and
version, so ``.to()``, ``load_state_dict`` and in-place edits invalidate them; nothing is added to
parameters, buffers or ``state_dict``. RMSNorm keeps HF's float32 computation (one fused ``rms_norm`` kernel
for float32 inputs). Gradients flow to the input embeddings as through the HF call. ``supports_fused(model)``
says whether a model qualifies (plain LLaMA: no sliding window, no cache, eval mode); anything else goes
through the HF call.
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
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:  # the same numbers in one fused kernel
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF's ``rotate_half`` applied to the outputs of a projection: ``w: [heads * head_dim, ...]`` (a weight or a
    bias), each head's half ``(x1, x2)`` of the output rows -> ``(-x2, x1)``."""
    shape = w.shape
    w = w.reshape(-1, head_dim, *shape[1:])
    half = head_dim // 2
    return torch.cat([-w[:, half:], w[:, :half]], 1).reshape(shape)


def _rotated(w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The projection ``w: [heads * head_dim, in]`` (or a bias ``[heads * head_dim, 1]``) followed by the rotary
    embedding of each position: ``cos, sin: [S, head_dim]`` -> ``[S, heads * head_dim, in]`` (``R_p w``)."""
    heads = w.shape[0] // head_dim
    cos, sin = cos.repeat(1, heads).unsqueeze(-1), sin.repeat(1, heads).unsqueeze(-1)  # [S, heads * hd, 1]
    return cos * w + sin * _rotate_rows(w, head_dim)


class GeneratorCache:
    """What the fused read derives from the frozen weights, recomputed only when they change.

    ``get``: ``(cos, sin)`` of positions ``0 .. S-1``, ``[1, 1, S, head_dim]``, from the model's own
    ``rotary_emb``; ``weights``: a layer's projections with each position's rotary folded in (see
    :func:`_layer_weights`). Keyed on the length, dtype, device and every source tensor's storage and version
    (``.to()``, ``load_state_dict`` and in-place edits all invalidate); weights that require a gradient are
    never cached. Not part of ``state_dict``, dropped by copies and pickling.
    """

    def __init__(self):
        self.key = None
        self.value = None
        self.layers: dict = {}

    def get(self, model: nn.Module, S: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = getattr(model.rotary_emb, "inv_freq", None)
        key = (S, like.dtype, like.device, None if inv is None else (inv.data_ptr(), inv._version, inv.dtype))
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad():  # usable by a later pass with autograd
                pos = torch.arange(S, device=like.device).unsqueeze(0)
                cos, sin = model.rotary_emb(like.detach()[:1, :S], position_ids=pos)
            self.key, self.value = key, (cos.unsqueeze(1), sin.unsqueeze(1))
        return self.value

    def weights(self, index: int, layer: nn.Module, last: bool, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        sources = [t for t in layer.parameters(recurse=True)] + [t for t in layer.buffers(recurse=True)]
        if any(t.requires_grad for t in sources):
            return _layer_weights(layer, last, cos, sin)
        key = (self.key, last, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
        hit = self.layers.get(index)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                hit = (key, _layer_weights(layer, last, cos, sin))
            self.layers[index] = hit
        return hit[1]

    def __deepcopy__(self, memo):
        return GeneratorCache()

    def __getstate__(self):
        return {"key": None, "value": None, "layers": {}}


def _cat_weights(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight for lin in linears], 0)
    biases = [lin.bias for lin in linears]
    bias = None if any(b is None for b in biases) else torch.cat(biases, 0)
    return weight, bias


def _layer_weights(layer: nn.Module, last: bool, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """A decoder layer's merged projections, ``cos, sin: [S, head_dim]``: ``(in_weight [S, hidden, out],
    in_bias [S, 1, out] or None, q_weight, q_bias, gate_up_weight, gate_up_bias)``; ``in_*`` are q/k/v (k/v for
    the last layer, whose query ``q_*`` is the last position's only) with each position's rotary folded into
    q and k."""
    attn, mlp = layer.self_attn, layer.mlp
    hd, S = attn.head_dim, cos.shape[0]
    rotated = [attn.k_proj] if last else [attn.q_proj, attn.k_proj]
    w, b = _cat_weights(rotated)
    weights = [_rotated(w, cos, sin, hd), attn.v_proj.weight.expand(S, -1, -1)]
    weight = torch.cat(weights, 1).transpose(1, 2)  # [S, hidden, out]
    bias = None
    if b is not None or attn.v_proj.bias is not None:  # (a missing bias is zero)
        b = torch.zeros_like(w[:, 0]) if b is None else b
        vb = torch.zeros_like(attn.v_proj.weight[:, 0]) if attn.v_proj.bias is None else attn.v_proj.bias
        bias = torch.cat([_rotated(b.unsqueeze(-1), cos, sin, hd).squeeze(-1), vb.expand(S, -1)], 1)
        bias = bias.unsqueeze(1)  # [S, 1, out]
    q_weight = q_bias = None
    if last:
        q_weight = _rotated(attn.q_proj.weight, cos[-1:], sin[-1:], hd)[0]
        if attn.q_proj.bias is not None:
            q_bias = _rotated(attn.q_proj.bias.unsqueeze(-1), cos[-1:], sin[-1:], hd)[0, :, 0]
    gate_up_weight, gate_up_bias = _cat_weights((mlp.gate_proj, mlp.up_proj))
    return weight, bias, q_weight, q_bias, gate_up_weight, gate_up_bias


def fused_last_hidden(model: nn.Module, embeds: torch.Tensor, cache: GeneratorCache) -> torch.Tensor:
    """``model(inputs_embeds=embeds).last_hidden_state[:, -1]`` of a LLaMA model (:func:`supports_fused`):
    ``embeds: [N, S, hidden]`` -> ``[N, hidden]``."""
    config = model.config
    layers = model.layers[: config.num_hidden_layers]
    N, S, _ = embeds.shape
    cos, sin = cache.get(model, S, embeds)
    cos, sin = cos[0, 0], sin[0, 0]  # [S, head_dim]
    h = embeds
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hd = attn.head_dim
        n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        x = _rms_norm(layer.input_layernorm, h)
        weight, bias, q_weight, q_bias, gate_up_weight, gate_up_bias = cache.weights(i, layer, i == last, cos, sin)
        # every position's projection in one batched matmul (position-major), rotary included
        proj = torch.bmm(x.transpose(0, 1), weight) if bias is None else torch.baddbmm(bias, x.transpose(0, 1), weight)
        if i < last:
            q, k, v = proj.view(S, N, n_q + 2 * n_kv, hd).permute(1, 2, 0, 3).split((n_q, n_kv, n_kv), 1)
        else:  # the last layer: keys and values everywhere, the query at the last position only
            k, v = proj.view(S, N, 2 * n_kv, hd).permute(1, 2, 0, 3).split((n_kv, n_kv), 1)
            q = F.linear(x[:, -1:], q_weight, q_bias).view(N, 1, n_q, hd).transpose(1, 2)
            h = h[:, -1:]
        if n_kv != n_q:
            k = k.repeat_interleave(n_q // n_kv, 1)
            v = v.repeat_interleave(n_q // n_kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=i < last and S > 1, scale=attn.scaling)
        h = h + attn.o_proj(a.transpose(1, 2).reshape(N, h.shape[1], n_q * hd))
        mlp = layer.mlp
        x = _rms_norm(layer.post_attention_layernorm, h)
        gate, up = F.linear(x, gate_up_weight, gate_up_bias).chunk(2, -1)
        h = h + mlp.down_proj(mlp.act_fn(gate) * up)
    return _rms_norm(model.norm, h[:, -1])
