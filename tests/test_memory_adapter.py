"""Memory adapters injected into frozen transformers causal LMs (rlmem/adapters): zero-init equality, where the
reads sit (variant A/B), placement, sharing, chapters, int8 banks, LoRA, saving and loading, clear errors."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rlmem.adapters import (Int8Bank, MemoryAdapterConfig, MemoryBank, MemoryRead, inject_memory, load_adapter,
                            placement_layers, quantize_memory, quantize_rows)
from rlmem.adapters.inject import LORA_FILE, MEMORY_FILE
from rlmem.causal_lm import decoder_layers, tiny_causal_lm

ARCHS = ["llama", "gpt2"]
#: the block's MLP and its attention, by architecture
MLP, ATTN = {"llama": "mlp", "gpt2": "mlp"}, {"llama": "self_attn", "gpt2": "attn"}


def base(arch: str, n_layers: int = 2, hidden: int = 32, seed: int = 0):
    return tiny_causal_lm(arch, vocab_size=50, hidden_size=hidden, n_layers=n_layers, n_heads=4, seed=seed)


def ids(seed: int = 0, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# -- zero initialization --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kwargs", [{}, {"variant": "B"}, {"lora_rank": 4}, {"variant": "B", "lora_rank": 4},
                                    {"num_chapters": 4, "top_k_chapters": 2, "bank_rank": 4, "attn_dim": 16},
                                    {"memory": False, "lora_rank": 4}])
def test_adapted_logits_equal_base_logits_at_init(arch, kwargs):
    model = base(arch)
    reference = copy.deepcopy(model)
    adapted = inject_memory(model, **kwargs)
    x = ids()
    torch.testing.assert_close(logits(adapted, x), logits(reference, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_nonzero_output_projection_changes_the_logits(arch):
    """The equality above is the zero W_o's doing, not a read that never runs."""
    reference = base(arch)
    adapted = inject_memory(copy.deepcopy(reference))
    with torch.no_grad():
        adapted.adapter.reads[0].w_o.weight.normal_()
    assert (logits(adapted, ids()) - logits(reference, ids())).abs().max() > 1e-3


# -- where the reads sit --------------------------------------------------------------------------------

def _record_order(adapted, arch):
    """Names of the modules of layer 0 in the order their forwards start (the read runs inside the hook that
    ends the attention's call, so finishing order would put it first)."""
    order = []
    layer = decoder_layers(adapted.model)[0]
    named = {"attn": getattr(layer, ATTN[arch]), "mlp": getattr(layer, MLP[arch]), "read": adapted.adapter.reads[0]}
    if adapted.adapter.mlps is not None:
        named["extra_mlp"] = adapted.adapter.mlps[0]
    for name, module in named.items():
        module.register_forward_pre_hook(lambda *_, name=name: order.append(name))
    logits(adapted, ids())
    return order


@pytest.mark.parametrize("arch", ARCHS)
def test_variant_a_reads_between_attention_and_mlp(arch):
    adapted = inject_memory(base(arch), variant="A", placement=[0])
    assert _record_order(adapted, arch) == ["attn", "read", "mlp"]


@pytest.mark.parametrize("arch", ARCHS)
def test_variant_b_reads_after_the_mlp_then_runs_a_new_mlp(arch):
    adapted = inject_memory(base(arch), variant="B", placement=[0])
    assert _record_order(adapted, arch) == ["attn", "mlp", "read", "extra_mlp"]


@pytest.mark.parametrize("arch", ARCHS)
def test_variant_a_mlp_sees_input_plus_attention_plus_read(arch):
    """The block's second norm (the MLP's input) gets ``x + SA + read`` and the block adds the MLP to it."""
    adapted = inject_memory(base(arch), variant="A", placement=[0])
    with torch.no_grad():
        adapted.adapter.reads[0].w_o.weight.normal_()  # a read that is not zero
    layer = decoder_layers(adapted.model)[0]
    seen = {}
    layer.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("x", (args or (kw["hidden_states"],))[0]),
                                    with_kwargs=True)
    attn = getattr(layer, ATTN[arch])
    attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn_plus_read", out[0]))
    adapted.adapter.reads[0].register_forward_hook(lambda m, a, out: seen.__setitem__("read", out[0]))
    norm2 = layer.post_attention_layernorm if arch == "llama" else layer.ln_2
    norm2.register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp_in", args[0]))
    mlp = getattr(layer, MLP[arch])
    mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp_out", out))
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    logits(adapted, ids())
    assert isinstance(seen["out"], torch.Tensor)  # transformers 5: a decoder layer returns a bare tensor
    # the attention hook returned attn + read; what reaches the second norm is x + that
    torch.testing.assert_close(seen["mlp_in"], seen["x"] + seen["attn_plus_read"])
    assert seen["read"].abs().max() > 1e-3
    torch.testing.assert_close(seen["out"], seen["mlp_in"] + seen["mlp_out"])


def test_hooks_accept_tuple_and_bare_tensor_outputs():
    adapted = inject_memory(base("llama"), variant="B", placement=[0])
    ad = adapted.adapter
    with torch.no_grad():
        ad.reads[0].w_o.weight.normal_()
        ad.mlps[0].fc2.weight.normal_()
        h = torch.randn(2, 5, 32)
        bare = ad._after_block(0, None, (), h)
        tup = ad._after_block(0, None, (), (h, "extra"))
    assert isinstance(bare, torch.Tensor) and isinstance(tup, tuple) and tup[1] == "extra"
    torch.testing.assert_close(tup[0], bare)
    assert not torch.allclose(bare, h)


# -- placement and sharing -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("placement", "extra", "expected"),
    [
        ("all", {}, [0, 1, 2, 3, 4, 5]),
        ("first_k", {"placement_k": 2}, [0, 1]),
        ("last_k", {"placement_k": 2}, [4, 5]),
        ("every_n", {"placement_n": 2}, [0, 2, 4]),
        ("every_n", {"placement_n": 4}, [0, 4]),
        ([0, -1], {}, [0, 5]),
        ([3], {}, [3]),
    ],
)
def test_placement_puts_reads_on_exactly_those_layers(placement, extra, expected):
    model = base("llama", n_layers=6, hidden=16)
    adapted = inject_memory(model, placement=placement, num_heads=2, **extra)
    assert adapted.adapter.layer_indices == expected
    hit = []  # which decoder layers actually ran a read, found by running the model
    for i, layer in enumerate(decoder_layers(adapted.model)):
        layer.register_forward_pre_hook(lambda *_, i=i: hit.append(("layer", i)))
    for site, read in enumerate(adapted.adapter.reads):
        read.register_forward_hook(lambda *_, s=site: hit.append(("read", s)))
    logits(adapted, ids())
    layers_with_reads = [hit[j - 1][1] for j, (kind, _) in enumerate(hit) if kind == "read"]
    assert layers_with_reads == expected


@pytest.mark.parametrize(
    ("sharing", "extra", "n_banks"),
    [("shared", {}, 1), ("per_layer", {}, 6), ("every_k", {"sharing_k": 2}, 3), ("every_k", {"sharing_k": 4}, 2)],
)
def test_sharing_sets_the_number_of_distinct_banks(sharing, extra, n_banks):
    adapted = inject_memory(base("gpt2", n_layers=6, hidden=16), sharing=sharing, num_memory_tokens=8, num_heads=2,
                            **extra)
    assert len(adapted.adapter.banks) == n_banks
    bank_params = {id(p) for b in adapted.adapter.banks for p in b.parameters()}
    assert len(bank_params) == n_banks
    # every bank is read by some layer, so each one gets a gradient (a bank left out of the reads would not)
    with torch.no_grad():
        for read in adapted.adapter.reads:
            read.w_o.weight.normal_()
    adapted.train()
    adapted(input_ids=ids()).logits.sum().backward()
    with_grad = sum(b.weight.grad is not None and b.weight.grad.abs().max() > 0 for b in adapted.adapter.banks)
    assert with_grad == n_banks


def test_low_rank_bank_and_reduced_read_have_fewer_parameters():
    full = inject_memory(base("llama"), num_memory_tokens=64)
    low = inject_memory(base("llama"), num_memory_tokens=64, bank_rank=4, attn_dim=8)
    assert low.adapter.banks[0].tokens().shape == (64, 32)
    assert low.adapter.reads[0].w_q.weight.shape == (8, 32)
    n = lambda m: sum(p.numel() for p in m.trainable_parameters())  # noqa: E731
    assert n(low) < n(full) / 3


# -- chapters ---------------------------------------------------------------------------------------------

def _read_one_chapter_set(cfg, hidden, d_mem):
    torch.manual_seed(0)
    read = MemoryRead(hidden, d_mem, cfg)
    with torch.no_grad():
        read.w_o.weight.normal_()
    return read


def test_sequence_routing_reads_the_top_k_chapters_mixed_by_their_gates():
    cfg = MemoryAdapterConfig(num_memory_tokens=12, num_chapters=4, top_k_chapters=2, num_heads=2)
    read = _read_one_chapter_set(cfg, 8, 8)
    with torch.no_grad():
        read.router.bias.copy_(torch.tensor([0.0, 5.0, -5.0, 4.0]))  # chapters 1 and 3 win for any input
    bank, h = torch.randn(12, 8), torch.randn(2, 5, 8)
    out, info = read(h, bank, "sequence")
    assert info["idx"].shape == (2, 1, 2)
    assert {tuple(sorted(r)) for r in info["idx"][:, 0].tolist()} == {(1, 3)}
    # expected, built by hand: softmax attention inside each picked chapter, mixed by renormalized probs
    x = read.norm(h)
    probs = read.router(x.mean(1)).softmax(-1)  # [B, C]
    expected = torch.zeros_like(h)
    gate_sum = probs[:, 1] + probs[:, 3]
    for c in (1, 3):
        chapter = bank[3 * c: 3 * c + 3]
        q = read.w_q(x).view(2, 5, 2, 4)
        k, v = read.w_k(chapter).view(3, 2, 4), read.w_v(chapter).view(3, 2, 4)
        attn = (torch.einsum("bthd,nhd->bthn", q, k) / 2.0).softmax(-1)
        o = torch.einsum("bthn,nhd->bthd", attn, v).reshape(2, 5, 8)
        expected = expected + (probs[:, c] / gate_sum).view(2, 1, 1) * read.w_o(o)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mode", ["token", "rolling"])
def test_per_position_routing_decides_at_every_position(mode):
    cfg = MemoryAdapterConfig(num_memory_tokens=8, num_chapters=4, top_k_chapters=1, num_heads=2, routing_window=3)
    read = _read_one_chapter_set(cfg, 8, 8)
    h = torch.randn(2, 6, 8)
    _, info = read(h, torch.randn(8, 8), mode)
    x = read.norm(h)
    if mode == "token":
        pooled = x
    else:  # mean of the last 3 positions, by a loop
        pooled = torch.stack([x[:, max(0, t - 2): t + 1].mean(1) for t in range(6)], 1)
    assert info["idx"].shape == (2, 6, 1)
    assert torch.equal(info["idx"][..., 0], read.router(pooled).argmax(-1))


def test_rolling_and_token_routing_are_causal():
    cfg = MemoryAdapterConfig(num_memory_tokens=8, num_chapters=4, top_k_chapters=2, num_heads=2, routing_window=3)
    read = _read_one_chapter_set(cfg, 8, 8)
    bank, h = torch.randn(8, 8), torch.randn(1, 6, 8)
    h2 = h.clone()
    h2[:, 4:] += 3.0 * torch.randn(1, 2, 8)  # change the future of position 3
    for mode in ("rolling", "token"):
        torch.testing.assert_close(read(h, bank, mode)[0][:, :4], read(h2, bank, mode)[0][:, :4])
    assert not torch.allclose(read(h, bank, "sequence")[0][:, :4], read(h2, bank, "sequence")[0][:, :4])


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_router_losses_are_nonzero_and_reach_the_router(mode):
    adapted = inject_memory(base("llama"), num_memory_tokens=16, num_chapters=4, top_k_chapters=2,
                            routing_train=mode)
    adapted.train()
    adapted(input_ids=ids())
    stats = adapted.adapter.router_stats()
    # with a near-uniform router at init, load balance is close to 1 and the z loss to log(4)^2
    assert 0.5 < stats["load_balance"].item() < 2.0
    assert stats["z_loss"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=0.05)
    aux = adapted.aux_loss()
    torch.testing.assert_close(aux, 0.01 * stats["load_balance"] + 0.001 * stats["z_loss"])
    aux.backward()
    for read in adapted.adapter.reads:
        assert read.router.weight.grad.abs().max() > 0


def test_load_balance_loss_is_larger_for_a_collapsed_router():
    cfg = MemoryAdapterConfig(num_memory_tokens=8, num_chapters=4, top_k_chapters=1, num_heads=2)
    read = _read_one_chapter_set(cfg, 8, 8)
    from rlmem.adapters import router_losses

    _, info = read(torch.randn(16, 3, 8), torch.randn(8, 8), "sequence")
    balanced, _ = router_losses(info, 4, 1)
    with torch.no_grad():
        read.router.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    _, info = read(torch.randn(16, 3, 8), torch.randn(8, 8), "sequence")
    collapsed, _ = router_losses(info, 4, 1)
    assert collapsed.item() > 3.5 > 1.5 > balanced.item()  # all picks and ~all probability on one chapter: ~4


def test_inference_routing_mode_follows_eval():
    adapted = inject_memory(base("llama"), num_memory_tokens=16, num_chapters=4, top_k_chapters=1,
                            routing_train="sequence", routing_inference="token")
    adapted.train()
    adapted(input_ids=ids())
    assert adapted.adapter._now.routing[0]["idx"].shape[1] == 1
    adapted.eval()
    adapted(input_ids=ids())
    assert adapted.adapter._now.routing[0]["idx"].shape[1] == 12


# -- int8 banks -------------------------------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(40, 24) * torch.logspace(-3, 2, 40).unsqueeze(1)
    x[3] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8
    err = (q.float() * scale - x).abs()
    assert bool((err <= scale / 2 + 1e-7 * x.abs()).all())
    assert torch.equal(q[3], torch.zeros_like(q[3]))
    nonzero = torch.arange(40) != 3
    assert torch.allclose(x.abs().amax(1)[nonzero], 127 * scale.squeeze(1)[nonzero])


@pytest.mark.parametrize("rank", [None, 4])
def test_int8_bank_matches_the_float_bank_closely(rank):
    bank = MemoryBank(32, 16, rank, init_std=0.5)
    small = Int8Bank(bank)
    full, deq = bank.tokens().detach(), small.tokens()
    # int8 plus one float scale per row: under a third of float32 for the full bank, under half for the factors
    assert small.nbytes() < sum(p.numel() * 4 for p in bank.parameters()) / (3 if rank is None else 2)
    assert (deq - full).abs().max() < 0.02 * full.abs().max()


def test_quantized_model_runs_and_saves(tmp_path):
    adapted = inject_memory(base("gpt2"), num_memory_tokens=32)
    with torch.no_grad():
        adapted.adapter.reads[0].w_o.weight.normal_()
        adapted.adapter.reads[1].w_o.weight.normal_()
    before = logits(adapted, ids())
    sizes = quantize_memory(adapted)
    assert sizes["bytes_after"] < sizes["bytes_before"] / 3
    after = logits(adapted, ids())
    assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()
    adapted.save_adapter(tmp_path)
    loaded = load_adapter(base("gpt2"), tmp_path)
    assert isinstance(loaded.adapter.banks[0], Int8Bank)
    torch.testing.assert_close(logits(loaded, ids()), after)


# -- LoRA + memory train together; saving and loading ------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lora_and_memory_train_together_and_the_base_stays_frozen(arch):
    adapted = inject_memory(base(arch), lora_rank=4, num_memory_tokens=8)
    base_before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if "lora_" not in n}
    names = {"w_o": "adapter.reads.0.w_o.weight", "bank": "adapter.banks.0.weight", "w_q": "adapter.reads.0.w_q.weight"}
    lora = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    names.update(lora_A=next(n for n in lora if "lora_A" in n), lora_B=next(n for n in lora if "lora_B" in n))
    params = dict(adapted.named_parameters())
    start = {k: params[n].detach().clone() for k, n in names.items()}
    trainable = adapted.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for n, p in adapted.named_parameters()
                                          if n.startswith("adapter.") or "lora_" in n}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    changed = []
    adapted.train()
    for _ in range(2):
        loss = F.cross_entropy(adapted(input_ids=ids()).logits.flatten(0, 1), ids(1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        changed.append({k for k, n in names.items() if not torch.equal(params[n], start[k])})
    # zero-initialized W_o and lora_B: only they get a gradient at the first step, everything after
    assert changed[0] == {"w_o", "lora_B"}
    assert changed[1] == set(names)
    for n, p in adapted.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_adapter_and_lora(arch, tmp_path):
    adapted = inject_memory(base(arch, seed=3), lora_rank=4, num_memory_tokens=8, variant="B")
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = logits(adapted, ids())
    adapted.save_adapter(tmp_path)
    memory, lora = load_file(str(tmp_path / MEMORY_FILE)), load_file(str(tmp_path / LORA_FILE))
    assert memory and all(k.startswith(("banks.", "reads.", "mlps.")) for k in memory)
    assert lora and all("lora_" in k for k in lora)  # the base model's weights are not saved
    loaded = load_adapter(base(arch, seed=3), tmp_path)
    torch.testing.assert_close(logits(loaded, ids()), expected)
    other_base = load_adapter(base(arch, seed=4), tmp_path)  # same adapter on another base: other numbers
    assert not torch.allclose(logits(other_base, ids()), expected)


def test_inject_from_a_local_save_pretrained_directory(tmp_path):
    model = base("llama")
    model.save_pretrained(tmp_path / "lm")
    adapted = inject_memory(str(tmp_path / "lm"), lora_rank=2)
    torch.testing.assert_close(logits(adapted, ids()), logits(model, ids()))
    assert not any(p.requires_grad for n, p in adapted.model.named_parameters() if "lora_" not in n)


def test_deepcopy_moves_the_hooks_to_the_copy():
    adapted = inject_memory(base("gpt2"))
    before = logits(adapted, ids())
    twin = copy.deepcopy(adapted)
    with torch.no_grad():
        twin.adapter.reads[1].w_o.weight.normal_()
    torch.testing.assert_close(logits(adapted, ids()), before)  # the original's hooks read its own adapter
    assert not torch.allclose(logits(twin, ids()), before)


# -- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"placement": [0, 2]}, r"placement indices \[2\] are outside the model"),
        ({"placement": [-3]}, "outside the model"),
        ({"placement": "first_k", "placement_k": 3}, "only 2 decoder layers"),
        ({"placement": [1, -1]}, "names a layer twice"),
        ({"placement": "middle"}, "placement must be one of"),
        ({"num_memory_tokens": 10, "num_chapters": 4}, "divisible by num_chapters"),
        ({"num_memory_tokens": 8, "num_chapters": 4, "top_k_chapters": 5}, r"top_k_chapters \(5\) must be <= num_ch"),
        ({"variant": "C"}, r"variant must be one of \['A', 'B'\]"),
        ({"sharing": "some"}, "sharing must be one of"),
        ({"routing_inference": "hybrid"}, "routing_inference must be one of"),
        ({"memory": False}, "needs lora_rank > 0"),
        ({"lora_rank": 2, "lora_targets": ["k_proj_x"]}, "name no module"),
        ({"no_such_knob": 1}, "no_such_knob is not an option of the memory adapter; valid: "),
    ],
)
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inject_memory(base("llama"), **kwargs)


def test_errors_for_base_models_that_are_not_causal_lms(tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig

    with pytest.raises(FileNotFoundError, match="no such directory"):
        inject_memory(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not hold a transformers model config"):
        inject_memory(str(tmp_path / "empty"))
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match="does not hold a causal LM"):
        inject_memory(str(tmp_path / "vit"))
    encoder = BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16))
    with pytest.raises(ValueError, match="needs a transformers causal LM"):
        inject_memory(encoder)


def test_parallel_residual_models_refuse_variant_a():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, use_parallel_residual=True))
    with pytest.raises(ValueError, match="parallel"):
        inject_memory(model, variant="A")
    adapted = inject_memory(model, variant="B", num_heads=2)
    assert adapted.adapter.layer_indices == [0]


def test_a_model_is_injected_once():
    model = base("llama")
    inject_memory(model)
    with pytest.raises(ValueError, match="already"):
        inject_memory(model)


def test_placement_layers_without_a_model():
    cfg = MemoryAdapterConfig(placement="every_n", placement_n=3)
    assert placement_layers(cfg, 7) == [0, 3, 6]


# -- scripts/adapter_compare.py ------------------------------------------------------------------------------

def test_adapter_compare_smoke_writes_results(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "adapter_compare.py"), "smoke=true",
                          f"hydra.run.dir={tmp_path}"], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    for method in ("vanilla", "memory", "lora", "memory_lora", "pretrained base, not fine-tuned"):
        assert f"| {method} |" in md
    assert "int8 bank" in md
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == ["vanilla", "memory", "lora", "memory_lora"]
    params = {r["method"]: int(r["trainable_params"]) for r in rows}
    # LoRA-only trains the fewest weights, full fine-tuning the most; memory + LoRA = memory + LoRA
    assert params["lora"] < params["memory"] < params["vanilla"]
    assert params["memory_lora"] == params["memory"] + params["lora"]
    assert (tmp_path / "base_model" / "config.json").is_file()
    assert rows[0]["int8_accuracy"] == "" and rows[1]["int8_accuracy"] != ""
