"""The typed interface :class:`rlmem.ppo.RecurrentPPO` trains: what an agent object must provide.

:func:`rlmem.agents.build_agent` returns one (``ActorCritic``); an agent of your own passes if it has the
same attributes and methods (``isinstance(agent, TrainableAgent)`` checks their presence, a type checker
their types).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from rlmem.compute import PathCost


@runtime_checkable
class TrainableAgent(Protocol):
    """Encoder -> memory -> heads, as TorchRL modules over one TensorDict (see ``rlmem.agents``)."""

    #: the collector's policy: observation (+ stored memory state) -> action, log-prob, value
    policy: TensorDictModuleBase
    #: ``ClipPPOLoss``'s actor and critic (reading ``"features"``)
    actor: TensorDictModuleBase
    critic: TensorDictModuleBase
    #: encoder + memory: observation and state -> ``"features"`` (step mode, or sequence mode under
    #: ``torchrl.modules.set_recurrent_mode(True)``)
    backbone: TensorDictModuleBase
    #: the TorchRL wrapper of the memory (``make_tensordict_primer()`` for the envs)
    memory_module: Any
    #: ``{"agent": {...}, "trigger": {...}}``: the configs it was built from (checkpoint identity)
    config: Mapping[str, Mapping[str, Any]]
    #: whether the gated path's trigger is an action (a learned trigger)
    triggered: bool
    #: the compute cost charged to the reward per triggered step, and the frames it warms up over
    cost_coef: float
    cost_warmup: int
    #: FLOPs of the memory's gated path (None for a memory without one)
    path_cost: PathCost | None

    def act_greedy(self, observation: Any, state: TensorDictBase,
                   is_init: torch.Tensor) -> tuple[torch.Tensor, TensorDictBase, torch.Tensor | None]: ...

    def aux_loss(self) -> torch.Tensor | None: ...

    def diagnostics(self) -> dict[str, float]: ...

    def after_rollout(self, data: TensorDictBase) -> None: ...

    # nn.Module's
    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


#: the attributes :func:`check_agent` looks for (the Protocol's members)
AGENT_MEMBERS = ("policy", "actor", "critic", "backbone", "memory_module", "config", "triggered", "cost_coef",
                 "cost_warmup", "path_cost", "act_greedy", "aux_loss", "diagnostics", "after_rollout",
                 "parameters", "state_dict", "load_state_dict")


def check_agent(agent: Any) -> TrainableAgent:
    """``agent`` if it provides every member of :class:`TrainableAgent`, else a TypeError naming the missing."""
    missing = [name for name in AGENT_MEMBERS if not hasattr(agent, name)]
    if missing:
        raise TypeError(f"the agent ({type(agent).__name__}) lacks {missing} of rlmem.agent_protocol.TrainableAgent; "
                        "build it with rlmem.agents.build_agent or provide them")
    return agent
