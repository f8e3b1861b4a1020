"""MeCo's realized firing rate matches ``target_rate`` (the hysteresis band used to pull it toward 0.5:
target 0.05 -> 0.009, 0.9 -> 1.000), on i.i.d. scores and on autocorrelated ones."""

from __future__ import annotations

import pytest
import torch

from rlmem.agents.triggers import MeCo

N, T = 64, 256


def iid(seed: int) -> torch.Tensor:
    return torch.rand(N, T, generator=torch.Generator().manual_seed(seed))


def autocorrelated(seed: int, phi: float = 0.9) -> torch.Tensor:
    """AR(1) scores squashed to (0, 1), stationary from t=0."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, T, generator=g)
    z = torch.empty(N, T)
    z[:, 0] = noise[:, 0]
    for t in range(1, T):
        z[:, t] = phi * z[:, t - 1] + (1 - phi**2) ** 0.5 * noise[:, t]
    return torch.sigmoid(z)


def realized_rate(meco: MeCo, scores: torch.Tensor) -> float:
    state = meco.initial_state(scores.shape[0], "cpu")
    fired = []
    for t in range(scores.shape[1]):
        fire, state = meco.decide(None, scores[:, t], state)
        fired.append(fire)
    return float(torch.stack(fired, 1).float().mean())


@pytest.mark.parametrize("kind", [iid, autocorrelated])
@pytest.mark.parametrize("target", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_meco_fires_at_its_target_rate(kind, target):
    meco = MeCo(probe="hidden_var", target_rate=target, margin=0.2)
    meco.calibrate(kind(0))  # the previous rollout's scores (held out) ...
    rate = realized_rate(meco, kind(1))  # ... and the rollout the thresholds then decide
    assert abs(rate - target) <= 0.03, f"target {target}: realized {rate:.3f}"
    assert meco.lo <= meco.hi


def test_meco_extreme_targets_never_and_always():
    for target, expected in ((0.0, 0.0), (1.0, 1.0)):
        meco = MeCo(probe="hidden_var", target_rate=target)
        meco.calibrate(iid(0))
        assert realized_rate(meco, iid(1)) == expected
