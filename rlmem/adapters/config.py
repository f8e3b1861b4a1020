"""The knobs of a memory adapter, validated, and what they resolve to for a given model.

:class:`MemoryAdapterConfig` is a plain dataclass (JSON round trip: :meth:`~MemoryAdapterConfig.to_dict` /
:meth:`~MemoryAdapterConfig.from_dict`). Values that depend on the model (which layers get a memory read,
which bank each read uses) are resolved by :func:`placement_layers` and :func:`bank_assignment` once the
number of decoder layers is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rlmem.validate import check_float, check_int, check_keys

VARIANTS = ("A", "B")
PLACEMENTS = ("all", "first_k", "last_k", "every_n")
SHARING = ("shared", "per_layer", "every_k")
ROUTING = ("sequence", "rolling", "token")


@dataclasses.dataclass
class MemoryAdapterConfig:
    """A learnable memory bank read by cross-attention inside the blocks of a frozen causal LM, plus LoRA.

    Memory bank and read:
        memory: False for no memory at all (LoRA only).
        num_memory_tokens: ``N``, tokens in each bank.
        d_mem: width of a bank token (None: the model's hidden size).
        bank_rank: None for a full ``[N, d_mem]`` bank, or ``r``: the bank is ``U V`` with ``U: [N, r]``,
            ``V: [r, d_mem]`` (low-rank, factorized bank).
        attn_dim: inner width of the cross-attention (None: the hidden size); smaller is a reduced-dim read.
        num_heads: heads of the cross-attention (divide ``attn_dim``).
        variant: ``"A"``: SA -> Mem -> MLP (the read sits between the block's attention and its MLP);
            ``"B"``: SA -> MLP -> Mem -> MLP (the read follows the block, then a new MLP).
        extra_mlp_dim: hidden width of variant B's new MLP (None: 2 x hidden size).
        init_std: std of the bank's initial values.

    Where (``placement``) and how many banks (``sharing``):
        placement: ``"all"``, ``"first_k"``, ``"last_k"``, ``"every_n"`` (layers 0, n, 2n, ...), or a list
            of layer indices (negative ones count from the end).
        placement_k: ``k`` of first_k / last_k. placement_n: ``n`` of every_n.
        sharing: ``"shared"`` (one bank read by every memory layer), ``"per_layer"`` (one bank each) or
            ``"every_k"`` (consecutive groups of ``sharing_k`` memory layers share one). Each layer always
            has its own read projections.

    Chapters (routing over parts of the bank):
        num_chapters: ``C``; the bank is cut into ``C`` chapters of ``N / C`` tokens (1: no routing).
        top_k_chapters: chapters read per routing decision (a gate-weighted mix of per-chapter reads).
        routing_train / routing_inference: ``"sequence"`` (one decision per sequence from the mean of its
            hidden states: every position's read then depends on the whole input, later tokens included),
            ``"rolling"`` (per position, from the mean of the last ``routing_window`` positions) or
            ``"token"`` (per position, from its own hidden state). rolling and token are causal.
        load_balance_coef, z_loss_coef: weights of the router's load-balance and z losses in ``aux_loss()``.

    LoRA (via ``peft`` on the attention projections):
        lora_rank: 0 for none. lora_alpha, lora_dropout: peft's. lora_targets: module names (None: GPT-2's
            fused ``c_attn``, LLaMA-style ``q_proj`` and ``v_proj``).
    """

    memory: bool = True
    num_memory_tokens: int = 64
    d_mem: int | None = None
    bank_rank: int | None = None
    attn_dim: int | None = None
    num_heads: int = 4
    variant: str = "A"
    extra_mlp_dim: int | None = None
    init_std: float = 0.02
    placement: str | list[int] = "all"
    placement_k: int = 1
    placement_n: int = 2
    sharing: str = "shared"
    sharing_k: int = 2
    num_chapters: int = 1
    top_k_chapters: int = 1
    routing_train: str = "sequence"
    routing_inference: str = "sequence"
    routing_window: int = 16
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.memory, bool):
            raise ValueError(f"memory must be true or false, got {self.memory!r}")
        self.num_memory_tokens = check_int("num_memory_tokens", self.num_memory_tokens, low=1)
        for knob in ("d_mem", "bank_rank", "attn_dim", "extra_mlp_dim"):
            if getattr(self, knob) is not None:
                setattr(self, knob, check_int(knob, getattr(self, knob), low=1, why="or null"))
        self.num_heads = check_int("num_heads", self.num_heads, low=1)
        if self.attn_dim is not None and self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim ({self.attn_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        self.init_std = check_float("init_std", self.init_std, low=0.0)
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {list(PLACEMENTS)} or a list of layer indices, "
                                 f"got {self.placement!r}")
        elif isinstance(self.placement, Sequence) and len(self.placement) > 0:
            self.placement = [check_int("placement index", i) for i in self.placement]
        else:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)} or a non-empty list of layer indices, "
                             f"got {self.placement!r}")
        self.placement_k = check_int("placement_k", self.placement_k, low=1)
        self.placement_n = check_int("placement_n", self.placement_n, low=1)
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {list(SHARING)}, got {self.sharing!r}")
        self.sharing_k = check_int("sharing_k", self.sharing_k, low=1)
        self.num_chapters = check_int("num_chapters", self.num_chapters, low=1)
        if self.num_memory_tokens % self.num_chapters:
            raise ValueError(f"num_memory_tokens ({self.num_memory_tokens}) must be divisible by num_chapters "
                             f"({self.num_chapters}): every chapter holds num_memory_tokens / num_chapters tokens")
        self.top_k_chapters = check_int("top_k_chapters", self.top_k_chapters, low=1)
        if self.top_k_chapters > self.num_chapters:
            raise ValueError(f"top_k_chapters ({self.top_k_chapters}) must be <= num_chapters "
                             f"({self.num_chapters})")
        for knob in ("routing_train", "routing_inference"):
            if getattr(self, knob) not in ROUTING:
                raise ValueError(f"{knob} must be one of {list(ROUTING)}, got {getattr(self, knob)!r}")
        self.routing_window = check_int("routing_window", self.routing_window, low=1)
        self.load_balance_coef = check_float("load_balance_coef", self.load_balance_coef, low=0.0)
        self.z_loss_coef = check_float("z_loss_coef", self.z_loss_coef, low=0.0)
        self.lora_rank = check_int("lora_rank", self.lora_rank, low=0, why="0 for no LoRA")
        self.lora_alpha = check_float("lora_alpha", self.lora_alpha, low=0.0)
        self.lora_dropout = check_float("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str) or not all(isinstance(t, str) for t in self.lora_targets):
                raise ValueError(f"lora_targets must be a list of module names or null, got {self.lora_targets!r}")
            self.lora_targets = list(self.lora_targets)
        if not self.memory and self.lora_rank == 0:
            raise ValueError("memory=false needs lora_rank > 0: the adapter would have nothing to train")

    @property
    def chapter_size(self) -> int:
        return self.num_memory_tokens // self.num_chapters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MemoryAdapterConfig:
        """From a mapping; an unknown key raises naming the valid ones (and a close match)."""
        check_keys("", values, [f.name for f in dataclasses.fields(cls)], of="the memory adapter")
        return cls(**dict(values))


def placement_layers(cfg: MemoryAdapterConfig, n_layers: int) -> list[int]:
    """The sorted decoder-layer indices that get a memory read, for a model with ``n_layers`` layers."""
    if cfg.placement == "all":
        return list(range(n_layers))
    if cfg.placement in ("first_k", "last_k"):
        if cfg.placement_k > n_layers:
            raise ValueError(f"placement={cfg.placement} with placement_k={cfg.placement_k}: the model has only "
                             f"{n_layers} decoder layers")
        return list(range(cfg.placement_k)) if cfg.placement == "first_k" else \
            list(range(n_layers - cfg.placement_k, n_layers))
    if cfg.placement == "every_n":
        return list(range(0, n_layers, cfg.placement_n))
    outside = [i for i in cfg.placement if not -n_layers <= i < n_layers]
    if outside:
        raise ValueError(f"placement indices {outside} are outside the model: it has {n_layers} decoder layers "
                         f"(valid indices {-n_layers} .. {n_layers - 1})")
    layers = [i % n_layers for i in cfg.placement]
    if len(set(layers)) != len(layers):
        raise ValueError(f"placement {cfg.placement} names a layer twice (as resolved: {layers})")
    return sorted(layers)


def bank_assignment(cfg: MemoryAdapterConfig, n_sites: int) -> list[int]:
    """For each of the ``n_sites`` memory layers (in placement order), the index of the bank it reads."""
    if cfg.sharing == "shared":
        return [0] * n_sites
    if cfg.sharing == "per_layer":
        return list(range(n_sites))
    return [i // cfg.sharing_k for i in range(n_sites)]
