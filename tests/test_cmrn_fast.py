"""The vectorized CMRN (rlmem/memory/cmrn.py) against the per-step reference it replaced
(rlmem/memory/reference/cmrn.py, ``CMRNReference``), on the same weights in float64.

Compared: outputs, every next-state tensor (the integer usage stamps and step counts exactly), the aux
losses and diagnostics, and the gradients of one loss (outputs, next state and aux loss together) with
respect to every parameter and to the start state, in sequence mode and in step mode, with episode starts
in the middle of the sequences, from a start state reached by earlier steps (and one whose slots tie), with
random triggers and per-row ``top_k``. Tolerance: ``rtol = atol = 1e-10`` (the two sum in different orders;
observed differences are ~1e-15).
"""

from __future__ import annotations

import pytest
import torch

from rlmem.memory import available_memories, build_memory, check_memory, memory_class
from rlmem.memory.cmrn import CMRN
from rlmem.memory.reference.cmrn import CMRNReference

D_IN = 5
SMALL = {"d_model": 16, "n_timescales": 3, "n_experts": 3, "top_k": 2, "mem_slots": 3, "d_key": 8,
         "n_predicates": 6, "n_clauses": 4, "n_prototypes": 4, "router_noise": 0.0}
TOL = {"rtol": 1e-10, "atol": 1e-10}

CONFIGS = {
    "small": {},
    "dense": {"dispatch": "dense"},
    "one_of_each": {"n_timescales": 1, "n_experts": 1, "top_k": 1, "mem_slots": 1},
    "deep_clock_few_slots": {"n_timescales": 4, "n_experts": 4, "top_k": 3, "mem_slots": 2},
    "many_slots": {"expert_types": "symbolic", "mem_slots": 9},
}


def pair(seed=0, **kwargs) -> tuple[CMRN, CMRNReference]:
    torch.manual_seed(seed)
    fast = CMRN(D_IN, **{**SMALL, **kwargs}).double().train()  # train mode (no noise: SMALL) as in PPO
    ref = CMRNReference(D_IN, **{**SMALL, **kwargs}).double().train()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def data(B=5, T=23, seed=1, p_reset=0.15):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    is_init = torch.rand(B, T, generator=g) < p_reset
    is_init[:, 0] = True
    is_init[1, 0] = is_init[2, 0] = False  # these rows continue the episode of the start state
    is_init[3, 1] = True  # a reset right after the start
    trigger = torch.rand(B, T, generator=g) < 0.5
    return x, is_init, trigger


def start_state(ref: CMRNReference, B: int, kind: str):
    """``fresh``: zeros; ``used``: after 11 steps of the reference (slots written, clocks at odd phases);
    ``tied``: equal keys in every slot and tied usage stamps (the LRU's tie-breaks decide)."""
    state = ref.initial_state(B)
    if kind == "fresh":
        return state
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        is_init = torch.zeros(B, 11, dtype=torch.bool)
        is_init[:, 0] = True
        is_init[0, 4] = True
        _, state = ref(torch.randn(B, 11, D_IN, generator=g, dtype=torch.float64), state, is_init)
    if kind == "tied":
        state["mem_k"] = torch.ones_like(state["mem_k"])
        state["mem_used"] = torch.where(state["mem_used"] > 0, 3, 0)
    return state


def loss_of(memory, y, state):
    """A loss touching the outputs, the next state and the aux loss."""
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + state["h"].pow(2).sum() + state["mem_k"].sum() + 0.5 * state["mem_v"].pow(2).sum()
    aux = memory.aux_loss()
    return loss if aux is None else loss + aux


def run(memory, x, state, is_init, step_mode=False, **route):
    state = state.clone().apply(lambda s: s.requires_grad_() if s.is_floating_point() else s)
    leaves = [state[k] for k in ("h", "mem_k", "mem_v")]
    if step_mode:
        ys, s = [], state
        for t in range(x.shape[1]):
            y, s = memory(x[:, t : t + 1], s, is_init[:, t : t + 1], **{k: v[:, t : t + 1] for k, v in route.items()})
            ys.append(y)
        y, next_state = torch.cat(ys, 1), s
    else:
        y, next_state = memory(x, state, is_init, **route)
    diag = memory.diagnostics()  # of the last call (in step mode: the last step)
    aux = memory.aux_loss()
    loss = loss_of(memory, y, next_state)
    params = list(memory.parameters())
    grads = torch.autograd.grad(loss, params + leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params + leaves, grads)]
    return y, next_state, aux, diag, grads


def assert_same(fast_out, ref_out):
    (y_f, s_f, a_f, d_f, g_f), (y_r, s_r, a_r, d_r, g_r) = fast_out, ref_out
    torch.testing.assert_close(y_f, y_r, **TOL)
    assert set(s_f.keys()) == set(s_r.keys())
    for key in s_r.keys():
        if s_r[key].is_floating_point():
            torch.testing.assert_close(s_f[key], s_r[key], **TOL)
        else:
            assert s_f[key].dtype == s_r[key].dtype and torch.equal(s_f[key], s_r[key]), key
    if a_r is None:
        assert a_f is None
    else:
        torch.testing.assert_close(a_f, a_r, **TOL)
    assert d_f.keys() == d_r.keys()
    for key in d_r:
        assert d_f[key] == pytest.approx(d_r[key], rel=1e-10, abs=1e-10), key
    assert len(g_f) == len(g_r)
    for gf, gr in zip(g_f, g_r):
        torch.testing.assert_close(gf, gr, **TOL)


@pytest.mark.parametrize("start", ["fresh", "used", "tied"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_sequence_mode_equals_the_reference(config, start):
    fast, ref = pair(**CONFIGS[config])
    x, is_init, _ = data()
    state = start_state(ref, 5, start)
    assert_same(run(fast, x, state, is_init), run(ref, x, state, is_init))


@pytest.mark.parametrize("config", ["small", "deep_clock_few_slots"])
def test_step_mode_equals_the_reference(config):
    fast, ref = pair(**CONFIGS[config])
    x, is_init, _ = data(T=13)
    state = start_state(ref, 5, "used")
    assert_same(run(fast, x, state, is_init, step_mode=True), run(ref, x, state, is_init, step_mode=True))
    # and the fast step mode equals the fast sequence mode (outputs and states)
    y_seq, s_seq = fast(x, state, is_init)
    y_step, s_step = run(fast, x, state, is_init, step_mode=True)[:2]
    torch.testing.assert_close(y_step, y_seq, **TOL)
    for key in s_seq.keys():
        torch.testing.assert_close(s_step[key], s_seq[key], **TOL)


@pytest.mark.parametrize("step_mode", [False, True])
@pytest.mark.parametrize("config", ["small", "dense", "deep_clock_few_slots"])
def test_triggers_equal_the_reference(config, step_mode):
    """The gated path (experts 2..top_k where the trigger fires) on a random pattern."""
    fast, ref = pair(**CONFIGS[config])
    x, is_init, trigger = data(T=17)
    state = start_state(ref, 5, "used")
    assert_same(run(fast, x, state, is_init, step_mode, trigger=trigger),
                run(ref, x, state, is_init, step_mode, trigger=trigger))


def test_per_row_top_k_equals_the_reference():
    fast, ref = pair(**CONFIGS["deep_clock_few_slots"])
    x, is_init, _ = data(T=17)
    top_k = torch.randint(1, 5, (5, 17), generator=torch.Generator().manual_seed(4))
    state = start_state(ref, 5, "used")
    assert_same(run(fast, x, state, is_init, top_k=top_k), run(ref, x, state, is_init, top_k=top_k))
    assert_same(run(fast, x, state, is_init, True, top_k=top_k), run(ref, x, state, is_init, True, top_k=top_k))


def test_eval_mode_and_a_long_slice_with_few_episode_starts():
    """PPO's slice length (64), episodes cut at random places, eval mode (router noise on but greedy)."""
    fast, ref = pair(router_noise=1.0, n_timescales=4)
    fast.eval()
    ref.eval()
    x, is_init, _ = data(B=4, T=64, p_reset=0.05)
    with torch.no_grad():
        y_f, s_f = fast(x, start_state(ref, 4, "used"), is_init)
        y_r, s_r = ref(x, start_state(ref, 4, "used"), is_init)
    torch.testing.assert_close(y_f, y_r, **TOL)
    for key in s_r.keys():
        torch.testing.assert_close(s_f[key], s_r[key], **TOL)


def test_same_parameters_and_state_as_the_reference_and_a_checkpoint_loads_into_either():
    fast, ref = pair()
    assert list(fast.state_dict()) == list(ref.state_dict())
    s_f, s_r = fast.initial_state(3), ref.initial_state(3)
    assert {k: (v.shape, v.dtype) for k, v in s_f.items()} == {k: (v.shape, v.dtype) for k, v in s_r.items()}
    other = CMRN(D_IN, **SMALL).double()
    other.load_state_dict(ref.state_dict())  # strict


def test_the_reference_is_not_registered_and_the_fast_one_passes_the_contract():
    assert memory_class("cmrn") is CMRN
    assert all(memory_class(name) is not CMRNReference for name in available_memories())
    torch.manual_seed(0)
    check_memory(build_memory("cmrn", d_in=D_IN, **SMALL).double().eval())


def test_the_trigger_affects_the_output():
    """CMRN's trigger at step t decides how many experts compute y_t: the critic must not see it."""
    assert CMRN.trigger_affects_output is True
    fast, _ = pair(n_experts=3, top_k=3)
    x, is_init, _ = data(T=4)
    on = torch.ones(5, 4, dtype=torch.bool)
    off = on.clone()
    off[:, 2] = False
    y_on, _ = fast(x, fast.initial_state(5), is_init, trigger=on)
    y_off, _ = fast(x, fast.initial_state(5), is_init, trigger=off)
    torch.testing.assert_close(y_on[:, :2], y_off[:, :2], **TOL)  # (gathers of other sizes: not bitwise)
    assert not torch.allclose(y_on[:, 2], y_off[:, 2])
