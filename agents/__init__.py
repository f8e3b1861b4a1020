"""Agent recipes: observation encoder -> memory system -> policy and value heads.

An agent is described by a flat config (``scripts/conf/agent/<name>.yaml``)::

    memory: gru          # a registered memory system (rlmem.memory.available_memories())
    encoder_dim: 64      # observation -> encoder_dim features (per Dict key; see agents/encoders.py)
    hidden_size: 64      # every other key is a keyword argument of the memory system

so ``agent.hidden_size=128`` on the command line resizes the memory. The encoder is picked from the
observation space (:mod:`rlmem.agents.encoders`: flat Linear + Tanh, image CNN, Dict of those) and the
policy head from the action space (:mod:`rlmem.agents.actions`: categorical, independent categoricals,
tanh-squashed Gaussian).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.modules import ProbabilisticActor

from rlmem.agents.actions import action_head
from rlmem.agents.encoders import as_observation, build_encoder
from rlmem.memory import build_memory
from rlmem.torchrl_wrapper import MemoryModule

class Apply(TensorDictModuleBase):
    """``td[out_key] = module(td[in_key])`` (``out_key`` a tuple of keys: the module returns a tuple).

    Used instead of ``TensorDictModule`` on the acting path: tensordict 0.14's ``TensorDictModule`` passes
    every output through ``TensorDict.from_any``, which calls ``importlib.util.find_spec("pandas")``
    (~0.3 ms when pandas is absent) on each write, more than the rest of a policy step costs.
    """

    def __init__(self, module: nn.Module, in_key: str, out_key: str | tuple[str, ...]):
        super().__init__()
        self.module, self.in_keys = module, [in_key]
        self.out_keys = list(out_key) if isinstance(out_key, tuple) else [out_key]

    def forward(self, td):
        out = self.module(td.get(self.in_keys[0]))
        for key, value in zip(self.out_keys, out if isinstance(out, tuple) else (out,), strict=True):
            td.set(key, value)
        return td


class ActorCritic(nn.Module):
    """The TorchRL pieces of one agent, sharing one memory.

    - ``backbone``: ``observation -> embed -> features`` (encoder + :class:`MemoryModule`);
    - ``actor``: ``features -> distribution parameters -> action``, ``critic``: ``features -> state_value``;
    - ``policy``: backbone + actor + critic in one step-mode module for the collector (values are
      recorded while acting, as in CleanRL, so GAE needs no second pass).

    ``observation``: the env's Gymnasium observation space (an int ``d`` means a flat ``Box(d)``);
    ``action``: its action space (an int ``n`` means ``Discrete(n)``); ``action_spec``: the TorchRL action
    spec of the collector's env (the actor's ``spec``). Flat-Box / Discrete agents keep the parameter names
    of earlier rlmem versions, so their checkpoints still load.
    """

    def __init__(self, observation: gym.Space | int, action: gym.Space | int, action_spec, cfg: Mapping[str, Any]):
        super().__init__()
        cfg = dict(cfg)
        memory_name = cfg.pop("memory")
        encoder_dim = int(cfg.pop("encoder_dim", 64))
        self.encoder, embed_dim = build_encoder(observation, encoder_dim)
        self.action_head = head = action_head(action)
        memory = build_memory(memory_name, d_in=embed_dim, **cfg)
        self.backbone = TensorDictSequential(
            Apply(self.encoder, "observation", "embed"),
            MemoryModule(memory, in_key="embed", out_key="features"),
        )
        self.policy_head = policy_head = nn.Linear(memory.d_out, head.out_features)
        self.value_head = value_head = nn.Linear(memory.d_out, 1)
        # small policy init (as in CleanRL / "What matters in on-policy RL"): near-uniform first actions
        nn.init.orthogonal_(policy_head.weight, 0.01)
        nn.init.zeros_(policy_head.bias)
        nn.init.orthogonal_(value_head.weight, 1.0)
        nn.init.zeros_(value_head.bias)
        self.actor = ProbabilisticActor(
            Apply(head.params_module(policy_head), "features", head.param_keys),
            in_keys=list(head.param_keys),
            out_keys=["action"],
            distribution_class=head.distribution_class,
            distribution_kwargs=head.distribution_kwargs,
            spec=action_spec,
            return_log_prob=True,
        )
        self.critic = Apply(value_head, "features", "state_value")
        self.policy = TensorDictSequential(self.backbone, self.actor, self.critic)

    @property
    def policy_params(self) -> nn.Module:
        """``features -> distribution parameters`` (the policy head, plus the log-std of a Gaussian)."""
        return self.actor.module[0].module

    @torch.no_grad()
    def act_greedy(self, obs, state, is_init: torch.Tensor):
        """One greedy step outside TorchRL: ``obs: [N, *obs_shape]`` (tensor or array, a ``TensorDict`` or
        dict of arrays for a Dict space), ``is_init: [N]`` -> ``(action [N, *action_shape], state)``."""
        if not isinstance(obs, (torch.Tensor, TensorDictBase)):
            obs = as_observation(obs)
        y, state = self.memory(self.encoder(obs).unsqueeze(1), state, is_init.unsqueeze(1))
        return self.action_head.greedy(self.policy_params(y[:, 0])), state

    @property
    def memory_module(self) -> MemoryModule:
        return self.backbone[1]

    @property
    def memory(self):
        return self.memory_module.memory

    def aux_loss(self) -> torch.Tensor | None:
        return self.memory.aux_loss()

    def diagnostics(self) -> dict[str, float]:
        """The memory's diagnostics of its last forward call (:meth:`MemorySystem.diagnostics`)."""
        diagnostics = getattr(self.memory, "diagnostics", None)  # a user's memory need not subclass MemorySystem
        return {} if diagnostics is None else diagnostics()
