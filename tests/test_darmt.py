"""DARMT and the unified baseline (rlmem/memory/darmt.py): the fusion layer against a hand computation, the
coproc gate (exactly ARMT where it is off, no call where no row wants it), step == sequence with gates and
resets, gradients through a later segment's memory tokens, freeze_armt, the naive variant, knobs, and the
parameter match of armt_unified.

ARMT's ``W_v`` starts at zero (its memory is silent, and the memory tokens then change nothing), so tests
that need the tokens to matter give it random values first (:func:`darmt`).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlmem.memory import build_memory, check_memory
from rlmem.memory.armt import ARMT
from rlmem.memory.darmt import DARMT, MemoryFusionLayer
from rlmem.conf import CONF_DIR

D_IN = 5
SMALL = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_mem": 4, "segment_len": 3, "num_mem_tokens": 2}
CONF = CONF_DIR
ARMT_KNOBS = set(inspect.signature(ARMT.__init__).parameters) - {"self", "d_in"}


def darmt(dtype=torch.float64, live_memory=True, seed=0, name="darmt", **kwargs):
    """A small DARMT; ``live_memory``: random ``W_v`` (as after training) so that reads, and with them the
    memory tokens, matter."""
    torch.manual_seed(seed)
    memory = build_memory(name, d_in=D_IN, **{**SMALL, "num_latents": 3, "n_coproc_layers": 2, **kwargs}).to(dtype)
    if live_memory:
        with torch.no_grad():
            for m in memory.memories:
                m.w_v.weight.normal_(0.0, 0.5)
    return memory


def readout(y: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random linear readout of ``y: [..., d]`` (the gradient of ``y.sum()`` through the final
    LayerNorm is rounding noise)."""
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y * w).sum()


def run_steps(memory, x, state, is_init, coproc=None):
    ys = []
    for t in range(x.shape[1]):
        gate = None if coproc is None else coproc[:, t : t + 1]
        y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1], gate)
        ys.append(y)
    return torch.cat(ys, 1), state


def batch(B=4, T=40, seed=3):
    """``x: [B, T, D_IN]``, ``is_init`` with resets at different segment positions per row (two in a row in
    row 2; row 3 never resets and continues its state), and a random ``coproc`` mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:3, 0] = True
    is_init[0, 17] = True
    is_init[1, [5, 22]] = True
    is_init[2, [10, 11, 31]] = True
    coproc = torch.rand(B, T, generator=g) < 0.5
    return x, is_init, coproc


def used_state(memory, B, coproc=True):
    """A mid-segment state (7 steps in with segment_len 3: two segments written, one step cached) whose
    memory tokens are the coprocessor's."""
    x = torch.randn(B, 7, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    is_init = torch.zeros(B, 7, dtype=torch.bool)
    is_init[:, 0] = True
    with torch.no_grad():
        _, state = memory(x, memory.initial_state(B), is_init, torch.full((B, 7), coproc))
    assert state["pos"].tolist() == [1] * B
    return state


def closing_rows(memory, is_init, pos0):
    """``[B, T]`` bool, True where a step closes its segment, from the segment positions counted by hand."""
    B, T = is_init.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = int(pos0[b])
        for t in range(T):
            if is_init[b, t]:
                p = 0
            out[b, t] = p == memory.segment_len - 1
            p = (p + 1) % memory.segment_len
    return out


def count_calls(module, sizes: list):
    return module.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))


# -- MemoryFusionLayer --------------------------------------------------------------------------------------

def layer_norm(x, norm):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) \
        * norm.weight + norm.bias


def ffn(x, ff):
    return F.relu(x @ ff[0].weight.T + ff[0].bias) @ ff[2].weight.T + ff[2].bias


def test_fusion_shape_and_memory_size_fixed():
    torch.manual_seed(0)
    fusion = MemoryFusionLayer(16, 4).double()
    memory = torch.randn(3, 5, 16, dtype=torch.float64)
    for n in (1, 5, 9):
        assert fusion(memory, torch.randn(3, n, 16, dtype=torch.float64)).shape == (3, 5, 16)


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_fusion_with_the_gate_forced_shut_or_open_against_a_hand_computation(gate):
    """g = 0: ``LN(mem + FFN(mem))``, the latents play no part; g = 1: every token becomes the pooled latents,
    ``p = mean_N(latents + MHA(latents -> memory))``, then ``LN(p + FFN(p))``; the attention written out
    per head from the module's weights."""
    torch.manual_seed(0)
    d, H = 8, 2
    fusion = MemoryFusionLayer(d, H).double()
    with torch.no_grad():  # sigmoid(-inf) = 0, sigmoid(+inf) = 1: exactly
        fusion.gate.weight.zero_()
        fusion.gate.bias.fill_(float("inf") if gate else float("-inf"))
    memory = torch.randn(2, 3, d, dtype=torch.float64)
    latents = torch.randn(2, 4, d, dtype=torch.float64)
    out = fusion(memory, latents)
    if gate == 0.0:
        expected = layer_norm(memory + ffn(memory, fusion.ff), fusion.norm)
        torch.testing.assert_close(fusion(memory, 10 * latents), out, rtol=0, atol=0)
    else:
        w_q, w_k, w_v = fusion.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = fusion.attn.in_proj_bias.chunk(3)
        q = layer_norm(latents, fusion.norm_latents) @ w_q.T + b_q
        kv = layer_norm(memory, fusion.norm_memory)
        k, v = kv @ w_k.T + b_k, kv @ w_v.T + b_v
        heads = []
        for h in range(H):
            s = slice(h * d // H, (h + 1) * d // H)
            att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / (d // H) ** 0.5, -1)  # [B, N, M]
            heads.append(att @ v[..., s])
        a = latents + torch.cat(heads, -1) @ fusion.attn.out_proj.weight.T + fusion.attn.out_proj.bias
        p = a.mean(1, keepdim=True).expand_as(memory)
        expected = layer_norm(p + ffn(p, fusion.ff), fusion.norm)
        assert torch.allclose(out[:, 0], out[:, 1])  # every token the same: the pool replaced them
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_fusion_cross_attention_equals_torch_multihead_attention():
    """The written-out cross-attention computes what ``nn.MultiheadAttention`` computes on the same weights
    (random projections and biases), gradients included."""
    torch.manual_seed(1)
    fusion = MemoryFusionLayer(12, 3).double()
    with torch.no_grad():
        for p in fusion.attn.parameters():
            p.normal_()
    q = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    ours = fusion.cross_attention(q, kv)
    theirs = fusion.attn(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, kv, fusion.attn.in_proj_weight))
    g_theirs = torch.autograd.grad(theirs.square().sum(), (q, kv, fusion.attn.in_proj_weight))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fusion_gate_blends_per_token():
    """A trained-like gate between 0 and 1: the output lies between the two forced cases per token."""
    torch.manual_seed(1)
    fusion = MemoryFusionLayer(8, 2).double()
    memory, latents = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    out = fusion(memory, latents)
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.fill_(float("-inf"))
    shut = fusion(memory, latents)
    assert (out - shut).abs().max() > 1e-3  # the latents change the memory when the gate is open


# -- the coproc gate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [True, False])
def test_coproc_off_everywhere_is_exactly_armt_and_never_calls_the_coprocessor(fusion):
    """With coproc False at every step the memory tokens stay the learned ones: outputs and ARMT's state keys
    equal an ARMT with the same weights (its tokens: M, or M + num_latents in the naive variant), in step
    and in sequence mode, and the coprocessor is not called once."""
    memory = darmt(use_learned_fusion=fusion).eval()
    n_tokens = SMALL["num_mem_tokens"] + (0 if fusion else 3)
    torch.manual_seed(5)
    armt = build_memory("armt", d_in=D_IN, **{**SMALL, "num_mem_tokens": n_tokens}).double().eval()
    armt.load_state_dict({k: v for k, v in memory.state_dict().items() if k in armt.state_dict()})
    x, is_init, _ = batch()
    off = torch.zeros_like(is_init)
    sizes = []
    count_calls(memory.coprocessor, sizes)
    with torch.no_grad():
        y_seq, s_seq = memory(x, memory.initial_state(4), is_init, off)
        y_step, s_step = run_steps(memory, x, memory.initial_state(4), is_init, off)
        y_armt, s_armt = armt(x, armt.initial_state(4), is_init)
    assert sizes == []
    for y, s in ((y_seq, s_seq), (y_step, s_step)):
        torch.testing.assert_close(y, y_armt, rtol=1e-10, atol=1e-10)
        for key in ("A", "z", "cache", "pos"):
            torch.testing.assert_close(s[key], s_armt[key], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s["mem"], memory.mem_tokens.detach().expand(4, -1, -1), rtol=0, atol=0)
    # and the coprocessor does matter here when it runs
    with torch.no_grad():
        y_on, _ = memory(x, memory.initial_state(4), is_init)
    assert (y_on - y_armt).abs().max() > 1e-3


def test_coprocessor_runs_on_the_chosen_closing_rows_only():
    """Step mode: at each step the coprocessor gets exactly the rows whose segment closes and whose coproc is
    set (positions counted by hand), nothing when there are none; a row with coproc False keeps its tokens
    bit for bit, a row with coproc True gets new ones."""
    memory = darmt().eval()
    x, is_init, coproc = batch()
    state = used_state(memory, 4)
    closes = closing_rows(memory, is_init, state["pos"])
    sizes = []
    count_calls(memory.coprocessor, sizes)
    expected = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            before = state["mem"]
            _, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1], coproc[:, t : t + 1])
            chosen = closes[:, t] & coproc[:, t]
            if chosen.any():
                expected.append(int(chosen.sum()))
            kept = ~chosen & ~is_init[:, t]
            assert torch.equal(state["mem"][kept], before[kept]), t
            assert ((state["mem"][chosen] - before[chosen]).abs().amax((1, 2)) > 1e-6).all(), t
    assert sizes == expected and len(expected) > 5 and max(expected) > 1 and min(expected) < 4


def test_sequence_mode_calls_the_coprocessor_once_per_round():
    """Sequence mode stays round-parallel: 48 aligned steps with segment_len 3 are 16 rounds, one coprocessor
    call each on all rows; with coproc False in every row of some rounds, those rounds skip it."""
    memory = darmt().eval()
    sizes = []
    count_calls(memory.coprocessor, sizes)
    x = torch.randn(3, 48, D_IN, dtype=torch.float64)
    is_init = torch.zeros(3, 48, dtype=torch.bool)
    is_init[:, 0] = True
    with torch.no_grad():
        memory(x, memory.initial_state(3), is_init)
        assert sizes == [3] * 16
        sizes.clear()
        coproc = torch.zeros(3, 48, dtype=torch.bool)
        coproc[0, 2::6] = True  # row 0: every other segment; rows 1 and 2 never
        memory(x, memory.initial_state(3), is_init, coproc)
        assert sizes == [1] * 8


def test_sequence_mode_skips_the_coprocessor_where_no_later_segment_reads_its_tokens():
    """New tokens are read only by a later closing segment of the same chain or as the next state. Chains
    (segment_len 3, 12 steps): row 0 episodes [0, 6) and [6, 12) (two closing segments each), row 1 one
    episode (four), row 2 episodes [0, 3) (one) and [3, 12) (three). Round 0 skips row 2's first episode (no
    later segment, not the last episode), round 1 row 0's first: calls on 4, 3, 2, 1 chains instead of
    5, 4, 2, 1. Outputs and state still equal step mode's."""
    memory = darmt().eval()
    sizes = []
    count_calls(memory.coprocessor, sizes)
    x = torch.randn(3, 12, D_IN, dtype=torch.float64)
    is_init = torch.zeros(3, 12, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[0, 6] = is_init[2, 3] = True
    with torch.no_grad():
        y_seq, s_seq = memory(x, memory.initial_state(3), is_init)
        assert sizes == [4, 3, 2, 1]
        y_step, s_step = run_steps(memory, x, memory.initial_state(3), is_init)
    torch.testing.assert_close(y_step, y_seq, rtol=1e-10, atol=1e-10)
    for key in ("A", "z", "cache", "pos", "mem"):
        torch.testing.assert_close(s_step[key], s_seq[key], rtol=1e-10, atol=1e-10)


# -- step == sequence -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"use_learned_fusion": False}, {"segment_len": 1}, {"residual": "plain"},
                                    {"n_layers": 1, "n_coproc_layers": 3}])
def test_step_equals_sequence_with_a_coproc_mask_and_resets(kwargs):
    """40 steps from a mid-segment state, coproc varying per row and step, resets mid-segment: T=1 calls ==
    one call == three calls split at odd places, outputs and every state key (float64)."""
    memory = darmt(**kwargs).eval()
    x, is_init, coproc = batch()
    start = used_state(memory, 4) if memory.segment_len == 3 else memory.initial_state(4)
    with torch.no_grad():
        y_seq, s_seq = memory(x, start, is_init, coproc)
        y_step, s_step = run_steps(memory, x, start, is_init, coproc)
        parts, state = [], start
        for a, b in [(0, 13), (13, 14), (14, 40)]:
            y, state = memory(x[:, a:b], state, is_init[:, a:b], coproc[:, a:b])
            parts.append(y)
        y_all, _ = memory(x, start, is_init)  # the mask matters: always-on gives other outputs
    tight = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y_step, y_seq, **tight)
    torch.testing.assert_close(torch.cat(parts, 1), y_seq, **tight)
    for key in ("A", "z", "cache", "pos", "mem"):
        torch.testing.assert_close(s_step[key], s_seq[key], **tight)
        torch.testing.assert_close(state[key], s_seq[key], **tight)
    assert (y_all - y_seq).abs().max() > 1e-4


def test_reset_mid_segment_gives_the_learned_tokens_and_a_fresh_start():
    memory = darmt().eval()
    x, _, coproc = batch()
    start = used_state(memory, 4)
    assert (start["mem"] - memory.mem_tokens).abs().max() > 1e-3  # the coprocessor changed them
    is_init = torch.zeros(4, 40, dtype=torch.bool)
    is_init[:, 12] = True  # pos 1 + 12 = 13: the middle of a segment of 3
    with torch.no_grad():
        y, _ = memory(x, start, is_init, coproc)
        y_fresh, _ = memory(x[:, 12:], memory.initial_state(4), torch.zeros(4, 28, dtype=torch.bool), coproc[:, 12:])
        _, s_step = memory(x[:, 12:13], start, is_init[:, 12:13], coproc[:, 12:13])
    torch.testing.assert_close(y[:, 12:], y_fresh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_step["mem"], memory.mem_tokens.detach().expand(4, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"use_learned_fusion": False}, {"segment_len": 2},
                                    {"freeze_armt": True, "segment_len": 1}, {"rule": "delta", "segment_len": 2}])
def test_check_memory_with_a_live_memory(kwargs):
    """The checker's gradient check reads y[:, 2]: frozen, only the coprocessor can have gradients there, so
    the segments must close before step 2 (segment_len 1) for its tokens to be written and read by then."""
    check_memory(darmt(dtype=torch.float32, **kwargs))


# -- gradients ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [True, False])
def test_gradients_reach_the_coprocessor_through_a_later_segments_tokens(fusion):
    """segment_len 2: the coprocessor runs when segment 0 closes (step 1) and makes segment 1's tokens, which
    write the memory at step 3, which step 4 reads. A random readout of y[4] has gradients on every
    coprocessor (and fusion) parameter. The coprocessor run at step 3 only makes segment 2's tokens, which
    write after step 5: with coproc on at step 3 only, y[4] has no gradient on it at all."""
    memory = darmt(segment_len=2, use_learned_fusion=fusion)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    is_init = torch.zeros(2, 5, dtype=torch.bool)
    is_init[:, 0] = True
    parts = {"coprocessor": memory.coprocessor, **({"fusion": memory.fusion} if fusion else {})}
    params = {f"{part}.{n}": p for part, module in parts.items() for n, p in module.named_parameters()}
    y, _ = memory(x, memory.initial_state(2), is_init)
    grads = torch.autograd.grad(readout(y[:, 4]), list(params.values()), allow_unused=True)
    for name, g in zip(params, grads):
        if name.endswith("rel_bias"):  # a per-head bias per key slot: softmax ignores its mean over slots
            g = g - g.mean(-1, keepdim=True)
        assert g is not None and g.abs().max() > 1e-8, name
    late = torch.zeros(2, 5, dtype=torch.bool)
    late[:, 3] = True
    y, _ = memory(x, memory.initial_state(2), is_init, late)
    grads = torch.autograd.grad(readout(y[:, 4]), list(params.values()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_freeze_armt_freezes_exactly_armts_parameters():
    memory = darmt(freeze_armt=True, live_memory=False)
    armt_names = set(dict(build_memory("armt", d_in=D_IN, **SMALL).named_parameters()))
    frozen = {n for n, p in memory.named_parameters() if not p.requires_grad}
    assert frozen == armt_names
    assert {n.split(".")[0] for n, p in memory.named_parameters() if p.requires_grad} == {"coprocessor", "fusion"}
    # a training step: the frozen parameters get no gradient, the coprocessor and fusion do
    with torch.no_grad():
        for m in memory.memories:
            m.w_v.weight.normal_(0.0, 0.5)
    x, is_init, _ = batch()
    y, _ = memory(x, memory.initial_state(4), is_init)
    readout(y).backward()
    assert all(p.grad is None for n, p in memory.named_parameters() if n in armt_names)
    assert memory.coprocessor.latents.grad.abs().max() > 0 and memory.fusion.gate.weight.grad.abs().max() > 0


# -- the naive variant ----------------------------------------------------------------------------------------

def test_naive_variant_carries_the_latents_as_extra_memory_tokens():
    """use_learned_fusion=false: M + N tokens per segment (all written); after a coprocessor run the first M
    are the learned tokens and the last N the coprocessor's output; with coproc off they are kept."""
    M, N = SMALL["num_mem_tokens"], 3
    memory = darmt(use_learned_fusion=False).eval()
    assert memory.fusion is None and memory.num_mem_tokens == M + N and memory.mem_tokens.shape == (M + N, 16)
    state = memory.initial_state(2)
    assert state["mem"].shape == (2, M + N, 16)
    written = []  # write() is not a forward: record its calls by wrapping it
    write = memory.memories[0].write
    memory.memories[0].write = lambda m, A, z: (written.append(m.shape[1]), write(m, A, z))[1]
    latents = []
    memory.coprocessor.register_forward_hook(lambda mod, args, out: latents.append(out))
    x = torch.randn(2, 3, D_IN, dtype=torch.float64)
    is_init = torch.tensor([[True, False, False]] * 2)
    with torch.no_grad():
        _, state = memory(x, state, is_init)
        assert written == [M + N]
        torch.testing.assert_close(state["mem"][:, :M], memory.mem_tokens[:M].expand(2, -1, -1), rtol=0, atol=0)
        torch.testing.assert_close(state["mem"][:, M:], latents[0], rtol=0, atol=0)
        _, kept = memory(x, state, torch.zeros_like(is_init), torch.zeros_like(is_init))
    torch.testing.assert_close(kept["mem"], state["mem"], rtol=0, atol=0)


# -- knobs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("darmt", {"n_coproc_layers": 0}, "darmt: n_coproc_layers must be in [1, inf]"),
        ("darmt", {"num_latents": 0}, "darmt: num_latents must be in [1, inf]"),
        ("darmt", {"num_latents": 1.5}, "darmt: num_latents must be an integer in [1, inf]"),
        ("darmt", {"num_mem_tokens": 0}, "darmt: num_mem_tokens must be in [1, inf]"),
        ("darmt", {"use_learned_fusion": "yes"}, "darmt: use_learned_fusion must be true or false"),
        ("darmt", {"freeze_armt": 1}, "darmt: freeze_armt must be true or false"),
        ("darmt", {"segment_len": 0}, "darmt: segment_len must be in [1, inf]"),
        ("darmt", {"residual": "pre"}, "darmt: residual must be one of ['gated', 'plain']"),
        ("darmt", {"eps": 0.0}, "darmt: eps must be a finite number in [1e-10, 1.0]"),
        ("armt_unified", {"n_coproc_layers": 0}, "armt_unified: n_coproc_layers must be in [1, inf]"),
        ("armt_unified", {"d_mem": 0}, "armt_unified: d_mem must be in [1, inf]"),
        ("armt_unified", {"freeze_armt": True}, "armt_unified: freeze_armt must be false"),
    ],
)
def test_bad_knobs_raise_naming_the_valid_range(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_memory(name, d_in=D_IN, **{"d_model": 16, **kwargs})


def test_bad_coproc_input_raises():
    memory = darmt(live_memory=False)
    x, is_init, coproc = batch()
    with pytest.raises(ValueError, match=re.escape("darmt: trigger must be a bool tensor of shape [B, T]=[4, 40]")):
        memory(x, memory.initial_state(4), is_init, coproc[:, :5])
    with pytest.raises(ValueError, match="darmt: trigger must be a bool tensor"):
        memory(x, memory.initial_state(4), is_init, coproc.float())


# -- the unified baseline ---------------------------------------------------------------------------------------

def config(path: str) -> tuple[int, dict]:
    """A model or agent config as ``(d_in, memory kwargs)`` (LM: d_in = d_model; RL: encoder_dim)."""
    group, name = path.split("/")
    with initialize_config_dir(str(CONF), version_base="1.3"):  # the yaml includes its memory config
        cfg = OmegaConf.to_container(compose(f"{group}/{Path(name).stem}"))[group]
    cfg.pop("memory")
    return (cfg.pop("d_model") if path.startswith("model/") else cfg.pop("encoder_dim")), cfg


def n_params(memory) -> int:
    return sum(p.numel() for p in memory.parameters())


@pytest.mark.parametrize("case", ["defaults", "test_kwargs", "model/darmt.yaml", "agent/darmt.yaml", "naive",
                                  "wide", "deep_coproc"])
def test_unified_matches_darmts_parameter_count(case):
    d_in, kwargs = D_IN, {}
    if case == "test_kwargs":
        kwargs = DARMT.test_kwargs
    elif case.endswith(".yaml"):
        d_in, kwargs = config(case)
    elif case == "naive":
        kwargs = {**SMALL, "use_learned_fusion": False, "num_latents": 6}
    elif case == "wide":
        kwargs = {"d_model": 96, "n_heads": 4, "d_ff": 512, "num_latents": 16}
    elif case == "deep_coproc":
        kwargs = {**SMALL, "n_layers": 1, "n_coproc_layers": 4}
    dual = build_memory("darmt", d_in=d_in, **kwargs)
    unified = build_memory("armt_unified", d_in=d_in, **kwargs)
    base = build_memory("armt", d_in=d_in, **{k: v for k, v in kwargs.items() if k in ARMT_KNOBS})
    assert abs(n_params(unified) - n_params(dual)) < 0.05 * n_params(dual)
    assert unified.target_params == n_params(dual)
    assert n_params(base) < 0.95 * n_params(dual)  # the match is not trivial: ARMT alone is smaller
    assert unified.n_layers >= base.n_layers and unified.d_ff >= base.d_ff
    assert set(unified.initial_state(1).keys()) == {"A", "z", "cache", "pos"}  # no coprocessor, no token state
