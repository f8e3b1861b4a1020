"""The fast STM (rlmem/memory/stm.py + rlmem/memory/stm_generator.py) against the readable reference it
replaced (rlmem/memory/reference/stm.py, ``STMReference``), on the same weights in float64.

Compared: outputs, next states and the denoising aux loss, in sequence mode and step by step, with episode
starts in the middle of the sequences, from a start state that is not the initial one, with the refinement
trigger on random patterns (and all / none); and the gradients of one loss (outputs, next state, aux loss)
with respect to every trainable parameter, the start state and the inputs. Generators: the default tiny
LLaMA (fused read), a one-layer LLaMA (the first layer is the last), a LLaMA with grouped-query attention
and biases saved with ``save_pretrained`` (fused), and a tiny GPT-2 (the transformers forward, no fused
path). Tolerance: ``rtol = atol = 1e-9`` (the fast write folds ``W_q`` into the key and sums in another
order; observed differences ~1e-15); for gradients the absolute tolerance is 1e-9 times the largest gradient
(at least 1e-9). The write loop's hand-written backward (``WriteRecurrence``) is also checked on its own
against finite differences (``gradcheck``, with resets), and the fused read's cached generator weights after
in-place edits and after a pass under ``inference_mode``.
"""

from __future__ import annotations

import pytest
import torch

from rlmem.memory import check_memory
from rlmem.memory.reference.stm import STMReference
from rlmem.memory.stm import STM

D_IN = 5
SMALL = {"d_model": 8, "n_slots": 3, "n_refine": 2, "n_heads": 2, "generator_hidden": 16, "generator_layers": 2,
         "generator_heads": 2, "aux_coef": 0.1, "gate_bias": -1.0}
TOL = {"rtol": 1e-9, "atol": 1e-9}

CONFIGS = {
    "default": {},
    "one_layer": {"generator_layers": 1},
    # the Diffuser applied n_refine x T times in a row: smaller weight perturbations keep gradients finite-sized
    "persist": {"persist_refinement": True, "scale": 0.05},
    "no_diffuser": {"n_refine": 0, "aux_coef": 0.0},
    "same_width_gpt2": {"generator": "tiny-gpt2", "d_model": 16, "n_heads": 4},
    "more_slots": {"n_slots": 6, "n_refine": 3, "generator_heads": 4},
}


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> str:
    """A LLaMA with grouped-query attention, attention and MLP biases, 3 layers, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         max_position_embeddings=32, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gqa_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def pair(seed=0, **kwargs) -> tuple[STM, STMReference]:
    """Fast and reference modules in float64 with the same (perturbed, so everything matters) weights."""
    kwargs = {**SMALL, **kwargs}
    scale = kwargs.pop("scale", 0.3)
    torch.manual_seed(seed)
    fast = STM(D_IN, **kwargs).double().train()
    ref = STMReference(D_IN, **kwargs).double().train()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # random Diffuser output weights (zero at init), and every other weight moved a bit
        for p in fast.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def data(memory: STM, B=4, T=13, seed=1, p_reset=0.2, p_refine=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    is_init = torch.rand(B, T, generator=g) < p_reset
    is_init[0, 0] = True
    is_init[1, 0] = False  # continues the episode of the start state
    is_init[2, T // 2] = True  # an episode start mid-sequence
    refine = torch.rand(B, T, generator=g) < p_refine
    state = memory.initial_state(B).detach().clone()
    state["buffer"] = state["buffer"] + 0.7 * torch.randn(state["buffer"].shape, generator=g, dtype=torch.float64)
    return x, is_init, refine, state


def run_sequence(memory, x, is_init, refine, state, aux_seed=5):
    torch.manual_seed(aux_seed)  # the denoising loss draws levels and noise
    y, nxt = memory(x, state, is_init, trigger=refine)
    return y, nxt["buffer"], memory.aux_loss()


def run_steps(memory, x, is_init, refine, state):
    ys, aux = [], []
    for t in range(x.shape[1]):
        torch.manual_seed(10 + t)
        y, state = memory(x[:, t:t + 1], state, is_init[:, t:t + 1],
                          trigger=None if refine is None else refine[:, t:t + 1])
        ys.append(y)
        aux.append(memory.aux_loss())
    return torch.cat(ys, 1), state["buffer"], aux


def loss_of(y, buf, aux) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(y.shape, generator=g, dtype=y.dtype)
    total = (w * y).sum() + buf.pow(2).sum()
    for a in aux if isinstance(aux, list) else [aux]:
        if a is not None:
            total = total + a
    return total


def grads(memory, loss, extra):
    names, tensors = zip(*[(n, p) for n, p in memory.named_parameters()])
    return dict(zip(list(names) + ["<start state>", "<x>"],
                    torch.autograd.grad(loss, list(tensors) + extra, allow_unused=True)))


def assert_grads_equal(fast, ref, loss_f, loss_r, inputs_f, inputs_r):
    gf, gr = grads(fast, loss_f, inputs_f), grads(ref, loss_r, inputs_r)
    assert gf.keys() == gr.keys()
    # absolute tolerance relative to the largest gradient: some gradients are zero in exact arithmetic (the
    # query bias shifts every address logit equally) and both sides return rounding noise of that scale
    scale = max(1.0, max(g.abs().max().item() for g in gr.values() if g is not None))
    tol = {"rtol": TOL["rtol"], "atol": TOL["atol"] * scale}
    for name in gf:
        if gr[name] is None:
            assert gf[name] is None or not gf[name].any(), name
            continue
        torch.testing.assert_close(gf[name], gr[name], **tol, msg=lambda m, n=name: f"gradient of {n}: {m}")


def assert_sequences_equal(fast, ref, x, is_init, refine, state):
    """Sequence mode of ``fast`` and ``ref`` from the same inputs: equal outputs and gradients (input included)."""
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f = run_sequence(fast, xf, is_init, refine, state)
    out_r = run_sequence(ref, xr, is_init, refine, state)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, **TOL)
    assert_grads_equal(fast, ref, loss_of(*out_f), loss_of(*out_r), [xf], [xr])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("refine_kind", ["random", "all", "none", "absent"])
def test_sequence_mode_matches_the_reference(config, refine_kind):
    fast, ref = pair(**CONFIGS[config])
    assert fast._fused_read == (CONFIGS[config].get("generator", "tiny") == "tiny")
    x, is_init, refine, state = data(fast)
    refine = {"random": refine, "all": torch.ones_like(refine), "none": torch.zeros_like(refine),
              "absent": None}[refine_kind]
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    sf, sr = state.clone(), state.clone()
    sf["buffer"] = sf["buffer"].requires_grad_()
    sr["buffer"] = sr["buffer"].requires_grad_()
    out_f = run_sequence(fast, xf, is_init, refine, sf)
    out_r = run_sequence(ref, xr, is_init, refine, sr)
    for a, b in zip(out_f, out_r):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **TOL)
    assert_grads_equal(fast, ref, loss_of(*out_f), loss_of(*out_r), [sf["buffer"], xf], [sr["buffer"], xr])


@pytest.mark.parametrize("config", ["default", "persist", "same_width_gpt2"])
def test_step_mode_matches_the_reference(config):
    fast, ref = pair(seed=2, **CONFIGS[config])
    x, is_init, refine, state = data(fast, T=9, seed=4)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    sf, sr = state.clone(), state.clone()
    sf["buffer"] = sf["buffer"].requires_grad_()
    sr["buffer"] = sr["buffer"].requires_grad_()
    yf, bf, af = run_steps(fast, xf, is_init, refine, sf)
    yr, br, ar = run_steps(ref, xr, is_init, refine, sr)
    torch.testing.assert_close(yf, yr, **TOL)
    torch.testing.assert_close(bf, br, **TOL)
    for a, b in zip(af, ar):
        torch.testing.assert_close(a, b, **TOL)
    assert_grads_equal(fast, ref, loss_of(yf, bf, af), loss_of(yr, br, ar), [sf["buffer"], xf], [sr["buffer"], xr])


def test_eval_mode_and_no_grad_match_the_reference():
    fast, ref = pair(seed=3)
    fast.eval(), ref.eval()
    x, is_init, refine, state = data(fast, B=6, T=7, seed=6)
    with torch.no_grad():
        out_f = run_sequence(fast, x, is_init, refine, state)
        out_r = run_sequence(ref, x, is_init, refine, state)
    assert out_f[2] is None and out_r[2] is None
    torch.testing.assert_close(out_f[0], out_r[0], **TOL)
    torch.testing.assert_close(out_f[1], out_r[1], **TOL)


def test_fused_llama_with_grouped_query_attention_and_biases(gqa_llama):
    fast, ref = pair(seed=4, generator=gqa_llama, d_model=16, n_heads=4)
    assert fast._fused_read
    x, is_init, refine, state = data(fast, seed=8)
    assert_sequences_equal(fast, ref, x, is_init, refine, state)


def test_same_parameters_state_and_checkpoint_keys():
    fast, ref = pair()
    assert list(fast.state_dict()) == list(ref.state_dict())
    params = {n for n, _ in fast.named_parameters()}
    extra = [k for k in fast.state_dict() if k not in params and not k.startswith("generator.") and k != "input_scale"]
    assert extra == [], f"the fast paths must not add state_dict entries: {extra}"
    assert fast.initial_state(3).keys() == ref.initial_state(3).keys()
    assert fast.trigger_affects_output is True


def test_cached_rotary_tables_follow_dtype_and_loaded_weights():
    """The rotary cache is keyed on length, dtype, device and the inv_freq tensor: converting the module or
    loading another generator's weights never reuses stale tables or fused weights."""
    torch.manual_seed(0)
    fast = STM(D_IN, **SMALL)
    x = torch.randn(2, 4, D_IN)
    is_init = torch.zeros(2, 4, dtype=torch.bool)
    is_init[:, 0] = True
    fast(x, fast.initial_state(2), is_init)  # fills the caches in float32
    fast.double()
    ref = STMReference(D_IN, **SMALL).double()
    other = STM(D_IN, **{**SMALL, "generator_seed": 7}).double()  # another generator's weights
    fast.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    xd = x.double()
    for T in (4, 1, 4):  # lengths change the cached tables
        a = fast(xd[:, :T], fast.initial_state(2), is_init[:, :T])[0]
        b = ref(xd[:, :T], ref.initial_state(2), is_init[:, :T])[0]
        torch.testing.assert_close(a, b, **TOL)


def test_check_memory_passes():
    torch.manual_seed(0)
    check_memory(STM(D_IN, **STM.test_kwargs), verbose=False)
    check_memory(STM(D_IN, **{**STM.test_kwargs, "persist_refinement": True}), verbose=False)


def test_cached_generator_weights_follow_in_place_edits_and_inference_mode():
    """The fused read caches the generator's merged projections (rotary folded in): an in-place edit of a
    frozen weight invalidates them, and weights cached under inference_mode still serve a pass with autograd."""
    fast, ref = pair(seed=5)
    x, is_init, refine, state = data(fast, seed=11)
    with torch.inference_mode():  # fills the caches
        fast(x, state, is_init, trigger=refine)
    for module in (fast, ref):
        with torch.no_grad():
            module.generator.layers[0].self_attn.q_proj.weight.mul_(1.5)
            module.generator.layers[-1].self_attn.k_proj.weight.add_(0.1)
            module.generator.layers[-1].mlp.up_proj.weight.mul_(-1.0)
    assert_sequences_equal(fast, ref, x, is_init, refine, state)


@pytest.mark.parametrize("reset_steps", [[], [0], [1, 3], [0, 2, 3]])
def test_write_recurrence_backward_passes_gradcheck(reset_steps):
    """The write loop's hand-written backward (WriteRecurrence) against finite differences, with resets of
    some rows before some steps (the gradient then goes to the initial slots, not further back)."""
    from rlmem.memory.stm import WriteRecurrence

    g = torch.Generator().manual_seed(7)
    B, T, K, d = 3, 4, 3, 5

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    slots, M, Z, v = rand(B, K, d), rand(T, B, d, 2), rand(T, B, K, 2), rand(T, B, 1, d)
    weight, bias, init = rand(d, scale=0.5), rand(d, scale=0.5), rand(K, d)
    rows = torch.tensor([True, False, True]).view(B, 1, 1)
    masks = [rows if t in reset_steps else None for t in range(T)]
    inputs = (slots, M, Z, v, weight, bias, init if reset_steps else None, masks, 1e-5)
    assert torch.autograd.gradcheck(WriteRecurrence.apply, inputs, eps=1e-6, atol=1e-7)
