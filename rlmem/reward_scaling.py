"""Reward scaling by the running standard deviation of the discounted return.

The scheme of SB3's ``VecNormalize(norm_reward=True)`` and Gymnasium's ``NormalizeReward``: every env keeps
its discounted return ``G <- gamma * G + r`` (zeroed at episode ends); rewards are divided by the running
standard deviation of ``G`` (not centered: shifting rewards would change what an episode's length is worth)
and clipped. The value function then sees targets of order 1 whether an env pays 1 per episode or 500, so
the value loss cannot drown the policy gradient in the memory that actor and critic share.

Unlike SB3, rewards are only ever scaled down (the divisor is at least ``min_std``, 1 by default): scaling up
the small returns of sparse tasks has the same defect in reverse. Measured with ``agent=gru`` on DelayedCue
(delay 4, 80k frames), where the return std is about 0.4: eval success 0.44 when scaled up to unit std,
>= 0.9 unscaled. CartPole-v1 (return std in the tens) reaches eval return 500 either way.
"""

from __future__ import annotations

import torch


class ReturnScaler:
    """``scale(reward, done) -> reward / max(sqrt(var(G) + eps), min_std)``, clipped to ``[-clip, clip]``.

    ``reward, done: [N, T]`` (N envs, T consecutive steps). Statistics are updated with the batch's returns
    before it is scaled; ``state_dict`` / ``load_state_dict`` carry them through checkpoints. A loaded state
    keeps the running statistics but restarts the per-env discounted returns at 0: a resumed run's envs
    start fresh episodes, which must not inherit the aborted episodes' partial returns.
    """

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8, min_std: float = 1.0):
        self.gamma, self.clip, self.eps, self.min_std = gamma, clip, eps, min_std
        self.returns = torch.zeros(num_envs, dtype=torch.float64)
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    @property
    def std(self) -> float:
        """The divisor: the running std of the discounted return, at least ``min_std``."""
        return max((self.var + self.eps) ** 0.5, self.min_std)

    def update(self, reward: torch.Tensor, done: torch.Tensor) -> None:
        """Advance the per-env returns over ``[N, T]`` steps and merge them into the running statistics."""
        if reward.shape != done.shape or reward.shape[0] != self.returns.shape[0]:
            raise ValueError(f"reward and done must be [num_envs={self.returns.shape[0]}, T], got "
                             f"{tuple(reward.shape)} and {tuple(done.shape)}")
        returns = torch.empty(reward.shape, dtype=torch.float64)
        g = self.returns
        for t in range(reward.shape[1]):
            g = self.gamma * g + reward[:, t].double()
            returns[:, t] = g
            g = torch.where(done[:, t], torch.zeros_like(g), g)
        self.returns = g
        # parallel (Chan et al.) merge of the batch's mean and variance into the running ones
        n, mean, var = returns.numel(), returns.mean().item(), returns.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.update(reward, done)
        return (reward / self.std).clamp(-self.clip, self.clip).to(reward.dtype)

    def state_dict(self) -> dict:
        return {"returns": self.returns.clone(), "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        """The running statistics of ``state``; the per-env returns restart (a resumed run's fresh episodes)."""
        self.returns = torch.zeros_like(self.returns)
        self.count, self.mean, self.var = float(state["count"]), float(state["mean"]), float(state["var"])

    def full_state_dict(self) -> dict:
        """Everything, the per-env returns of the running episodes included (to undo a batch in-process)."""
        return self.state_dict()

    def load_full_state_dict(self, state: dict) -> None:
        self.returns = state["returns"].clone()
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
