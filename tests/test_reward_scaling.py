"""ReturnScaler: rewards divided by the running std of per-env discounted returns (reset at episode ends)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlmem.reward_scaling import ReturnScaler


def hand_returns(rewards, dones, gamma, start):
    """Per-env discounted returns, written out step by step."""
    out, g = [], list(start)
    for i, (rs, ds) in enumerate(zip(rewards, dones)):
        row = []
        for r, d in zip(rs, ds):
            g[i] = gamma * g[i] + r
            row.append(g[i])
            if d:
                g[i] = 0.0
        out.append(row)
    return out, g


def test_scaling_uses_the_std_of_the_discounted_returns_over_all_batches():
    gamma = 0.5
    scaler = ReturnScaler(num_envs=2, gamma=gamma, clip=100.0, eps=0.0, min_std=0.0)
    r1, d1 = [[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]], [[False, True, False], [False, False, False]]
    r2, d2 = [[1.0, 4.0], [3.0, 0.0]], [[False, False], [True, False]]
    g1, carry = hand_returns(r1, d1, gamma, [0.0, 0.0])
    assert g1 == [[1.0, 1.5, 1.0], [0.0, 2.0, 1.0]]
    out1 = scaler(torch.tensor(r1), torch.tensor(d1))
    torch.testing.assert_close(out1, torch.tensor(r1) / float(np.std(g1)))
    g2, _ = hand_returns(r2, d2, gamma, carry)  # returns continue across batches: env 0 was not done
    assert g2[0][0] == 1.5
    out2 = scaler(torch.tensor(r2), torch.tensor(d2))
    every = np.concatenate([np.ravel(g1), np.ravel(g2)])
    torch.testing.assert_close(out2, torch.tensor(r2) / float(np.std(every)))


def test_small_returns_are_never_scaled_up():
    scaler = ReturnScaler(num_envs=4, gamma=0.99)
    reward = (torch.rand(4, 30) < 0.05).float()  # sparse rewards of 1: the return std is below 1
    torch.testing.assert_close(scaler(reward, torch.rand(4, 30) < 0.1), reward)
    assert scaler.std == 1.0 and scaler.var < 1.0


def test_large_rewards_are_clipped_and_state_round_trips():
    scaler = ReturnScaler(num_envs=1, gamma=0.9, clip=2.0)
    scaler(torch.ones(1, 50), torch.zeros(1, 50, dtype=torch.bool))
    out = scaler(torch.tensor([[1.0, 1e6]]), torch.zeros(1, 2, dtype=torch.bool))
    assert out[0, 1] == 2.0
    twin = ReturnScaler(num_envs=1, gamma=0.9, clip=2.0)
    twin.load_state_dict(scaler.state_dict())
    r, d = torch.rand(1, 7), torch.zeros(1, 7, dtype=torch.bool)
    torch.testing.assert_close(twin(r, d), scaler(r, d))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="num_envs=3"):
        ReturnScaler(3, 0.99)(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))


def test_a_loaded_state_keeps_the_statistics_and_restarts_the_running_returns():
    """A resumed run's envs start fresh episodes: the aborted episodes' partial returns must not carry over."""
    scaler = ReturnScaler(2, gamma=0.9)
    scaler.update(torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.all(scaler.returns > 0)
    resumed = ReturnScaler(2, gamma=0.9)
    resumed.load_state_dict(scaler.state_dict())
    assert torch.count_nonzero(resumed.returns) == 0
    assert (resumed.count, resumed.mean, resumed.var) == (scaler.count, scaler.mean, scaler.var)
    undo = ReturnScaler(2, gamma=0.9)  # the trainer's in-process undo of a discarded update keeps everything
    undo.load_full_state_dict(scaler.full_state_dict())
    torch.testing.assert_close(undo.returns, scaler.returns)
