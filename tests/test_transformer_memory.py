"""Sliding-window Transformer memory: what it sees is bounded by its window and by episode starts."""

from __future__ import annotations

import pytest
import torch

from rlmem.memory import build_memory

D_IN, W = 5, 6


def transformer(n_layers=1):
    torch.manual_seed(0)
    return build_memory("transformer", d_in=D_IN, d_model=16, n_heads=2, window=W, n_layers=n_layers)


def readout(y: torch.Tensor) -> torch.Tensor:
    """A fixed random linear readout of ``y: [..., d_model]``. Not ``y.sum()``: the output is a LayerNorm's,
    whose sum is constant, so the gradient of a sum is rounding noise (~1e-9 here) and says nothing."""
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(2))
    return (y * w).sum()


def influence(grad: torch.Tensor) -> torch.Tensor:
    """``grad: [1, T, D_IN] -> [T]``: how much each input step moves the readout, relative to the largest."""
    per_step = grad[0].abs().sum(-1)
    return per_step / per_step.max()


def test_one_layer_sees_exactly_the_last_window_steps():
    memory = transformer()
    x = torch.randn(1, 20, D_IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = memory(x, memory.initial_state(1), torch.zeros(1, 20, dtype=torch.bool))
    t = 15
    (grad,) = torch.autograd.grad(readout(y[0, t]), x)
    seen = influence(grad)
    window = torch.zeros(20, dtype=torch.bool)
    window[t - W : t + 1] = True
    assert (seen[~window] == 0).all()  # no path at all from outside the window (or from the future)
    assert (seen[window] > 1e-4).all(), seen  # every step inside it really moves the output (noise: ~1e-9)


def test_nothing_before_an_episode_start_is_attended():
    memory = transformer(n_layers=2)
    x = torch.randn(1, 20, D_IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    is_init = torch.zeros(1, 20, dtype=torch.bool)
    is_init[0, 10] = True
    y, _ = memory(x, memory.initial_state(1), is_init)
    (grad,) = torch.autograd.grad(readout(y[0, 10:]), x, retain_graph=True)
    assert grad[0, :10].abs().sum() == 0
    # while the steps of the new episode are attended: y at 13 depends on the inputs at 10, 11 and 12
    (grad,) = torch.autograd.grad(readout(y[0, 13]), x)
    seen = influence(grad)
    assert (seen[:10] == 0).all() and (seen[10:14] > 1e-4).all() and (seen[14:] == 0).all(), seen


def test_state_is_bounded_by_the_window_and_tracks_filled_slots():
    memory = transformer(n_layers=2)
    state = memory.initial_state(2)
    assert state["valid"].sum() == 0  # nothing cached yet: nothing to attend
    x = torch.randn(2, 40, D_IN)
    is_init = torch.zeros(2, 40, dtype=torch.bool)
    with torch.no_grad():
        _, s3 = memory(x[:, :3], state, is_init[:, :3])
        _, s40 = memory(x, state, is_init)
        is_init[1, 37] = True
        _, s_reset = memory(x, state, is_init)
    assert s3["valid"].tolist() == [[0.0] * (W - 3) + [1.0] * 3] * 2
    assert s40["mem"].shape == (2, 2, W, 16) and s40["valid"].sum() == 2 * W
    assert s_reset["valid"][1].tolist() == [0.0] * (W - 3) + [1.0] * 3  # only the 3 steps since the start


def test_plain_residual_layers_pass_the_contract_and_bad_names_fail():
    import rlmem

    torch.manual_seed(0)
    plain = build_memory("transformer", d_in=5, d_model=16, n_layers=2, n_heads=2, window=4, residual="plain")
    rlmem.check_memory(plain)
    assert not any("gate" in name for name, _ in plain.named_parameters())
    with pytest.raises(ValueError, match=r"residual must be one of \('gated', 'plain'\), got 'gtrxl'"):
        build_memory("transformer", d_in=5, residual="gtrxl")
