"""Agent recipes: observation encoder -> memory system -> policy and value heads.

An agent is described by a flat config (``scripts/conf/agent/<name>.yaml``)::

    memory: gru          # a registered memory system (rlmem.memory.available_memories())
    encoder_dim: 64      # observation -> encoder_dim features (Linear + Tanh)
    hidden_size: 64      # every other key is a keyword argument of the memory system

so ``agent.hidden_size=128`` on the command line resizes the memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.modules import ProbabilisticActor

from rlmem.memory import build_memory
from rlmem.torchrl_wrapper import MemoryModule

class Apply(TensorDictModuleBase):
    """``td[out_key] = module(td[in_key])``.

    Used instead of ``TensorDictModule`` on the acting path: tensordict 0.14's ``TensorDictModule`` passes
    every output through ``TensorDict.from_any``, which calls ``importlib.util.find_spec("pandas")``
    (~0.3 ms when pandas is absent) on each write, more than the rest of a policy step costs.
    """

    def __init__(self, module: nn.Module, in_key: str, out_key: str):
        super().__init__()
        self.module, self.in_keys, self.out_keys = module, [in_key], [out_key]

    def forward(self, td):
        td.set(self.out_keys[0], self.module(td.get(self.in_keys[0])))
        return td


class ActorCritic(nn.Module):
    """The TorchRL pieces of one agent, sharing one memory.

    - ``backbone``: ``observation -> embed -> features`` (encoder + :class:`MemoryModule`);
    - ``actor``: ``features -> logits -> action`` (categorical), ``critic``: ``features -> state_value``;
    - ``policy``: backbone + actor + critic in one step-mode module for the collector (values are
      recorded while acting, as in CleanRL, so GAE needs no second pass).
    """

    def __init__(self, obs_dim: int, n_actions: int, action_spec, cfg: Mapping[str, Any]):
        super().__init__()
        cfg = dict(cfg)
        memory_name = cfg.pop("memory")
        encoder_dim = int(cfg.pop("encoder_dim", 64))
        memory = build_memory(memory_name, d_in=encoder_dim, **cfg)
        self.encoder = nn.Sequential(nn.Linear(obs_dim, encoder_dim), nn.Tanh())
        self.backbone = TensorDictSequential(
            Apply(self.encoder, "observation", "embed"),
            MemoryModule(memory, in_key="embed", out_key="features"),
        )
        self.policy_head = policy_head = nn.Linear(memory.d_out, n_actions)
        self.value_head = value_head = nn.Linear(memory.d_out, 1)
        # small policy init (as in CleanRL / "What matters in on-policy RL"): near-uniform first actions
        nn.init.orthogonal_(policy_head.weight, 0.01)
        nn.init.zeros_(policy_head.bias)
        nn.init.orthogonal_(value_head.weight, 1.0)
        nn.init.zeros_(value_head.bias)
        self.actor = ProbabilisticActor(
            Apply(policy_head, "features", "logits"),
            in_keys=["logits"],
            out_keys=["action"],
            distribution_class=torch.distributions.Categorical,
            spec=action_spec,
            return_log_prob=True,
        )
        self.critic = Apply(value_head, "features", "state_value")
        self.policy = TensorDictSequential(self.backbone, self.actor, self.critic)

    @property
    def memory_module(self) -> MemoryModule:
        return self.backbone[1]

    @property
    def memory(self):
        return self.memory_module.memory

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, state, is_init: torch.Tensor):
        """One greedy step outside TorchRL: ``obs: [N, obs_dim]``, ``is_init: [N]`` -> ``(action [N], state)``."""
        y, state = self.memory(self.encoder(obs).unsqueeze(1), state, is_init.unsqueeze(1))
        return self.policy_head(y[:, 0]).argmax(-1), state

    def aux_loss(self) -> torch.Tensor | None:
        return self.memory.aux_loss()

    def diagnostics(self) -> dict[str, float]:
        """The memory's diagnostics of its last forward call (:meth:`MemorySystem.diagnostics`)."""
        diagnostics = getattr(self.memory, "diagnostics", None)  # a user's memory need not subclass MemorySystem
        return {} if diagnostics is None else diagnostics()
