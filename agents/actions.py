"""Policy heads, picked from the env's Gymnasium action space.

A head maps features ``[*batch, d]`` to the parameters of a TorchRL/torch distribution over one action:

- ``Discrete(n)``: logits ``[*batch, n]``, ``torch.distributions.Categorical``; action ``[*batch]``;
- ``MultiDiscrete(nvec)``: logits ``[*batch, sum(nvec)]``, :class:`MultiCategorical` (independent
  categoricals, log-probs and entropies summed over dims); action ``[*batch, len(nvec)]``;
- ``Box(low, high, (k,))``: ``loc [*batch, k]`` from the features and a state-independent ``scale [k]``
  (a learned log-std, as in CleanRL's continuous PPO and TorchRL's MuJoCo PPO example), TorchRL's
  ``TanhNormal`` squashed into ``[low, high]``; action ``[*batch, k]``.

Greedy actions are the distribution's deterministic action: argmax (per dim) for the categoricals,
``TanhNormal.deterministic_sample`` (the squashed ``loc``) for boxes.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical
from torchrl.modules import TanhNormal

#: what :func:`ActionHead.for_space` accepts (the error for anything else names these)
SUPPORTED_ACTIONS = ("Discrete (from 0)", "MultiDiscrete (1-d nvec, from 0)", "float Box (1 dim, finite bounds)")


class MultiCategorical(torch.distributions.Distribution):
    """Independent categoricals over ``len(nvec)`` dims from concatenated ``logits [*batch, sum(nvec)]``.

    ``log_prob(action [*batch, D]) -> [*batch]`` and ``entropy() -> [*batch]`` are sums over dims.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, logits: torch.Tensor, nvec: tuple[int, ...]):
        self.nvec = tuple(int(n) for n in nvec)
        self.dists = [Categorical(logits=part) for part in logits.split(self.nvec, -1)]
        super().__init__(batch_shape=logits.shape[:-1], event_shape=(len(self.nvec),), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        return torch.stack([d.sample(sample_shape) for d in self.dists], -1)

    def log_prob(self, value):
        return sum(d.log_prob(value[..., i]) for i, d in enumerate(self.dists))

    def entropy(self):
        return sum(d.entropy() for d in self.dists)

    @property
    def mode(self):
        return torch.stack([d.logits.argmax(-1) for d in self.dists], -1)

    @property
    def deterministic_sample(self):
        return self.mode


class ActionHead:
    """How the agent acts in one action space (plain object: its parameters live in the agent's modules).

    ``out_features``: the size of the agent's ``policy_head`` (Linear features -> logits or loc);
    ``params_module(policy_head)``: ``features [*batch, d]`` -> the distribution's parameters (a tensor, or a
    tuple in ``param_keys`` order); ``distribution_class`` / ``distribution_kwargs``: what TorchRL's
    ``ProbabilisticActor`` builds from them; ``greedy(params)``: the deterministic action.
    """

    param_keys: tuple[str, ...] = ("logits",)
    distribution_class: type = Categorical

    def __init__(self, out_features: int):
        self.out_features = out_features
        self.distribution_kwargs: dict = {}

    def params_module(self, policy_head: nn.Linear) -> nn.Module:
        return policy_head  # the logits are the head's output

    #: whether :meth:`uncertainty` is defined (discrete heads)
    discrete = False

    def uncertainty(self, params, kind: str) -> torch.Tensor:
        """How unsure the policy is, in [0, 1] per row: ``kind`` ``entropy`` (entropy / its maximum) or
        ``max_prob`` (``(1 - max prob) / (1 - 1/n)``); discrete heads only (the probes of the trigger policies)."""
        raise ValueError(f"{type(self).__name__}: the trigger probes 'entropy' / 'max_prob' need a discrete action "
                         "space; use trigger.probe=hidden_var")

    def greedy(self, params):
        """The deterministic action ``[*batch, *action_shape]`` from ``params_module``'s output."""
        params = params if isinstance(params, tuple) else (params,)
        dist = self.distribution_class(**dict(zip(self.param_keys, params)), **self.distribution_kwargs)
        return dist.deterministic_sample


def _uncertainty(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """``logits: [..., n]`` -> ``[...]`` in [0, 1] (see :meth:`ActionHead.uncertainty`)."""
    n = logits.shape[-1]
    if n < 2:
        return torch.zeros(logits.shape[:-1], device=logits.device, dtype=logits.dtype)
    logp = logits.log_softmax(-1)
    if kind == "entropy":
        return -(logp.exp() * logp).sum(-1) / math.log(n)
    return (1 - logp.exp().amax(-1)) / (1 - 1 / n)


class CategoricalHead(ActionHead):
    discrete = True

    def greedy(self, logits):
        return logits.argmax(-1)

    def uncertainty(self, logits, kind):
        return _uncertainty(logits, kind)


class MultiCategoricalHead(ActionHead):
    distribution_class = MultiCategorical

    discrete = True

    def __init__(self, nvec: tuple[int, ...]):
        super().__init__(sum(nvec))
        self.distribution_kwargs = {"nvec": nvec}

    def uncertainty(self, logits, kind):  # the mean over the action's dims
        parts = logits.split(list(self.distribution_kwargs["nvec"]), -1)
        return torch.stack([_uncertainty(part, kind) for part in parts], -1).mean(-1)


class NormalParams(nn.Module):
    """``features -> (loc, scale)``: ``loc`` from the policy head, ``scale = exp(log_std)`` shared by all
    states (a learned log-std initialised to 0, as in CleanRL's continuous PPO)."""

    def __init__(self, policy_head: nn.Linear):
        super().__init__()
        self.policy_head = policy_head
        self.log_std = nn.Parameter(torch.zeros(policy_head.out_features))

    def forward(self, features):
        loc = self.policy_head(features)
        return loc, self.log_std.exp().expand_as(loc)


class TanhNormalHead(ActionHead):
    param_keys = ("loc", "scale")
    distribution_class = TanhNormal

    def __init__(self, low: np.ndarray, high: np.ndarray):
        super().__init__(len(low))
        # tanh_loc=False: loc is used as is (TorchRL's PPO examples); the bounds are constants, not parameters
        self.distribution_kwargs = {"low": torch.as_tensor(low, dtype=torch.float32),
                                    "high": torch.as_tensor(high, dtype=torch.float32), "tanh_loc": False}

    def params_module(self, policy_head: nn.Linear) -> nn.Module:
        return NormalParams(policy_head)


def action_head(space: gym.Space | int) -> ActionHead:
    """The head for ``space`` (an int ``n`` means ``Discrete(n)``); ValueError naming the supported spaces."""
    if isinstance(space, int):
        return CategoricalHead(space)
    if isinstance(space, gym.spaces.Discrete) and space.start == 0:
        return CategoricalHead(int(space.n))
    if isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim == 1 and not np.any(space.start):
        return MultiCategoricalHead(tuple(int(n) for n in space.nvec))
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.issubdtype(space.dtype, np.floating):
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(f"Box actions need finite low and high (the Gaussian head is squashed into them "
                             f"with a tanh), got {space}")
        return TanhNormalHead(space.low, space.high)
    raise ValueError(f"unsupported action space {space}; supported: " + ", ".join(SUPPORTED_ACTIONS))
