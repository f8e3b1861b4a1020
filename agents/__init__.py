"""Agent recipes: observation encoder -> memory system -> policy and value heads.

An agent is described by a flat config (``rlmem/conf/agent/<name>.yaml``)::

    memory: gru          # a registered memory system (rlmem.memory.available_memories())
    encoder_dim: 64      # observation -> encoder_dim features (per Dict key; see agents/encoders.py)
    hidden_size: 64      # every other key is a keyword argument of the memory system

so ``agent.hidden_size=128`` on the command line resizes the memory. The encoder is picked from the
observation space (:mod:`rlmem.agents.encoders`: flat Linear + Tanh, image CNN, Dict of those) and the
policy head from the action space (:mod:`rlmem.agents.actions`: categorical, independent categoricals,
tanh-squashed Gaussian). A second flat config, the trigger (``rlmem/conf/trigger/<name>.yaml``), decides
when a memory with a gated path runs it (:mod:`rlmem.agents.triggers`).

The trainer (:class:`rlmem.ppo.RecurrentPPO`) takes the agent object :func:`build_agent` returns: an
:class:`ActorCritic`, which implements :class:`rlmem.agent_protocol.TrainableAgent` (what a trainer may use
of an agent, checked when the trainer is built).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.modules import ProbabilisticActor

from rlmem.agents.actions import action_head
from rlmem.agents.encoders import as_observation, build_encoder
from rlmem.agents.triggers import (
    TriggeredMemory,
    TriggeredMemoryModule,
    WithTrigger,
    build_trigger_policy,
    trigger_cost_settings,
)
from rlmem.compute import PathCost, measure_path_flops
from rlmem.env_factory import env_spaces
from rlmem.evaluate import read_checkpoint, resolve_checkpoint
from rlmem.memory import build_memory
from rlmem.torchrl_wrapper import MemoryModule
from rlmem.validate import check_int

#: the trigger of an agent built without one: the gated path (if any) on every step, as without triggers
DEFAULT_TRIGGER = {"policy": "always"}


def check_agent_spaces(observation: gym.Space, action: gym.Space) -> None:
    """Raise a ValueError naming the supported spaces unless an agent can observe and act in them."""
    action_head(action)
    build_encoder(observation, 1)



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

    def __init__(self, observation: gym.Space | int, action: gym.Space | int, action_spec, cfg: Mapping[str, Any],
                 trigger: Mapping[str, Any] | None = None, compile: bool = False):
        super().__init__()
        self.agent_cfg = dict(cfg)
        self.trigger_cfg = dict(DEFAULT_TRIGGER if trigger is None else trigger)
        cfg = dict(cfg)
        memory_name = cfg.pop("memory")
        encoder_dim = int(cfg.pop("encoder_dim", 64))
        self.encoder, embed_dim = build_encoder(observation, encoder_dim)
        self.action_head = head = action_head(action)
        memory = build_memory(memory_name, d_in=embed_dim, **cfg)
        self.cost_coef, configured_cost, self.cost_warmup = trigger_cost_settings(self.trigger_cfg)
        policy = build_trigger_policy(self.trigger_cfg, embed_dim + memory.d_out)  # checks the knobs
        #: FLOPs per acting step of a row without / with the gated path (None: the memory has no such path)
        self.path_cost: PathCost | None = None
        if getattr(memory, "trigger_path", None) is not None:
            measured = measure_path_flops(memory)
            self.path_cost = measured if configured_cost is None else PathCost(measured.base, configured_cost * 1e6)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        if compile:  # torch.compile of the memory's forward (acting steps and the PPO replay), in place
            memory.compile()
        self.triggered = policy.name != "always"  # "always" is the memory as it is: no decision, nothing to wrap
        #: the critic reads the trigger's decision context [x_t ; y_{t-1}], not the features: the memory's gated
        #: path changes the output of the step it runs on, and the value must not depend on that step's
        #: trigger (a part of the action). Memories whose path only changes later steps keep the features.
        self.value_from_context = self.triggered and bool(getattr(memory, "trigger_affects_output", False))
        if self.triggered:
            if policy.uses_probe and policy.probe != "hidden_var" and not head.discrete:
                head.uncertainty(None, policy.probe)  # raises, naming the valid probe
            memory = TriggeredMemory(memory, policy, probe=self._uncertainty, record_context=self.value_from_context)
            memory_module = TriggeredMemoryModule(memory, in_key="embed", out_key="features")
        else:
            memory_module = MemoryModule(memory, in_key="embed", out_key="features")
        self.backbone = TensorDictSequential(Apply(self.encoder, "observation", "embed"), memory_module)
        self.policy_head = policy_head = nn.Linear(memory.d_out, head.out_features)
        # small policy init (as in CleanRL / "What matters in on-policy RL"): near-uniform first actions
        nn.init.orthogonal_(policy_head.weight, 0.01)
        nn.init.zeros_(policy_head.bias)
        if self.value_from_context:  # [x_t ; y_{t-1}]: a hidden layer mixes the step's input with the memory's
            context_dim = memory.d_in + memory.d_out
            self.value_head = value_head = nn.Sequential(nn.Linear(context_dim, memory.d_out), nn.Tanh(),
                                                         nn.Linear(memory.d_out, 1))
            nn.init.orthogonal_(value_head[0].weight, math.sqrt(2))
            nn.init.zeros_(value_head[0].bias)
            last = value_head[2]
        else:
            self.value_head = value_head = last = nn.Linear(memory.d_out, 1)
        nn.init.orthogonal_(last.weight, 1.0)
        nn.init.zeros_(last.bias)
        in_keys, dist_class, dist_kwargs = list(head.param_keys), head.distribution_class, head.distribution_kwargs
        if self.triggered and policy.learned:  # the action is (env action, trigger): one joint log-prob
            in_keys += ["trigger_logits", "trigger"]
            dist_class, dist_kwargs = WithTrigger, {"base_class": head.distribution_class, "base_kwargs": dist_kwargs}
        self.actor = ProbabilisticActor(
            Apply(head.params_module(policy_head), "features", head.param_keys),
            in_keys=in_keys,
            out_keys=["action"],
            distribution_class=dist_class,
            distribution_kwargs=dist_kwargs,
            spec=action_spec,
            return_log_prob=True,
        )
        self.critic = Apply(value_head, "trigger_context" if self.value_from_context else "features", "state_value")
        self.policy = TensorDictSequential(self.backbone, self.actor, self.critic)

    @property
    def policy_params(self) -> nn.Module:
        """``features -> distribution parameters`` (the policy head, plus the log-std of a Gaussian)."""
        return self.actor.module[0].module

    def after_rollout(self, data) -> None:
        """Called by the trainer with each collected rollout ``[N, T]``: a MeCo trigger calibrates its
        thresholds on the rollout's probe scores (held out from the decisions they will make)."""
        if isinstance(self.memory, TriggeredMemory) and "trigger_score" in data.keys():
            calibrate = getattr(self.memory.policy, "calibrate", None)
            if calibrate is not None:
                is_init = data.get("is_init", None)
                calibrate(data["trigger_score"], None if is_init is None else is_init.reshape(data.batch_size))

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds this agent (with the env's spaces): ``{"agent": ..., "trigger": ...}``."""
        return {"agent": self.agent_cfg, "trigger": self.trigger_cfg}

    def _uncertainty(self, y: torch.Tensor, kind: str) -> torch.Tensor:
        """The policy's uncertainty at outputs ``y: [..., d]`` -> ``[...]`` (the trigger probes)."""
        return self.action_head.uncertainty(self.policy_params(y), kind)

    @torch.no_grad()
    def act_greedy(self, obs, state, is_init: torch.Tensor):
        """One greedy step outside TorchRL: ``obs: [N, *obs_shape]`` (tensor or array, a ``TensorDict`` or
        dict of arrays for a Dict space), ``is_init: [N]`` -> ``(action [N, *action_shape], state, trigger)``;
        ``trigger: [N]`` bool is whether the memory's gated path ran (None: the memory has no gated path)."""
        if not isinstance(obs, (torch.Tensor, TensorDictBase)):
            obs = as_observation(obs)
        x = self.encoder(obs).unsqueeze(1)
        if self.triggered:
            y, state, record = self.memory.run(x, state, is_init.unsqueeze(1))
            trigger = record["trigger"][:, 0]
        else:
            y, state = self.memory(x, state, is_init.unsqueeze(1))
            trigger = None if self.path_cost is None else torch.ones(x.shape[0], dtype=torch.bool)
        return self.action_head.greedy(self.policy_params(y[:, 0])), state, trigger

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


def build_agent(agent_cfg: Mapping[str, Any], env_cfg: Mapping[str, Any],
                trigger: Mapping[str, Any] | None = None, compile: bool = False,
                seed: int | None = None) -> ActorCritic:
    """The agent ``agent_cfg`` (and ``trigger``) describe, sized for the env ``env_cfg`` builds;
    ``compile``: ``torch.compile`` its memory (``nn.Module.compile``: the first calls of each shape compile);
    ``seed``: seeds torch first, so the initial weights follow it (a fresh process starts torch's RNG from a
    random seed; None leaves the RNG as it is)."""
    spaces = env_spaces(env_cfg, check_agent_spaces)  # bad env names/values/spaces fail here, before any seeding
    if seed is not None:
        torch.manual_seed(check_int("seed", seed, low=0))
    return ActorCritic(*spaces, agent_cfg, trigger, compile)


def load_trained_agent(path: str | Path):
    """The agent of a train_rl checkpoint (a run dir or a ``.pt`` file), rebuilt from the configs it was
    trained with.

    Returns ``(agent in eval mode, checkpoint dict)``; raises naming what is wrong with the file.
    """
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)  # weights-only; a ValueError names what is wrong with the file
    # the agent's sizes come from the env it was trained on, as in RecurrentPPO
    agent = build_agent(ckpt["agent_cfg"], ckpt["env_cfg"], ckpt.get("trigger_cfg"))
    try:
        agent.load_state_dict(ckpt["agent"])
    except RuntimeError as err:  # the code building this memory changed since the run
        raise ValueError(f"checkpoint={path}: its weights do not fit the agent its agent_cfg "
                         f"{ckpt['agent_cfg']} builds now: {err}") from None
    agent.eval()
    return agent, ckpt
