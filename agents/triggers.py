"""Adaptive compute triggers: when a memory runs its expensive path, decided per env row and step.

A memory system with a gated path (``memory.trigger_path``: DualTierMiras' deep-tier write, DARMT's
coprocessor, STM's Diffuser refinement, CMRN's extra experts) takes ``trigger: [B, T]`` in ``forward``.
:class:`TriggeredMemory` wraps such a memory with a :class:`TriggerPolicy` that makes the decision for step
t *before* the path runs, from the cheap context of that step::

    context_t = [x_t ; y_{t-1}]   (the step's input and the memory's previous output, 0 at an episode start)

so the path runs only where chosen. The policies (``trigger=<name>``):

- ``learned``: a Bernoulli head on the context, trained by PPO: the agent's action is (env action,
  trigger) with joint log-prob ``log p(trigger | context) + log p(action | features after the path)``;
- ``meco`` (after MeCo, training-free): a probe score of the previous output (the policy's normalized
  entropy, ``1 - max prob``, or the hidden-state variance), fire above a high threshold, not below a low
  one, in between keep the previous decision; the thresholds are quantiles of the scores of the previous
  rollout (a held-out batch of states), ``margin`` of them in the band, placed by running the rule over that
  rollout so that ``target_rate`` of its steps fire;
- ``ars`` (after Adaptive Reasoning Suppression): certainty ``1 - normalized entropy`` is checked every
  ``checkpoint_every`` steps of an episode; while it stays at or above the threshold the path is
  suppressed and the threshold tightens (drops by ``tighten`` per checkpoint, down to ``floor``), so
  suppression grows stronger the longer the agent stays certain; a checkpoint below it fires again and
  resets the threshold;
- ``always`` / ``never``: the path on every step / on none.

The value never depends on the step's own trigger (a part of the action): for a memory whose gated path
changes the output of the very step it runs on (``memory.trigger_affects_output``: STM's refinement, CMRN's
extra experts), the features after the path do, so the agent's critic reads the decision context
``[x_t ; y_{t-1}]`` instead (recorded as ``trigger_context`` with ``record_context=True``: exact, and free, as
it is built for the decision anyway). For the others (DualTierMiras' deep write, DARMT's coprocessor: the
path only changes later steps) the critic reads the features as usual.

The state (the inner memory's, ``trigger_prev_y`` and the policy's own) is one flat TensorDict, so the
PPO replay starts each slice from the stored decision context. Given stored triggers the replay runs the
inner memory in sequence mode and recomputes the learned head's logits from the replayed outputs: the
same numbers as acting.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules.distributions.utils import has_analytic_entropy

from rlmem.memory.base import MemorySystem, check_inputs, check_trigger
from rlmem.registry import Registry
from rlmem.torchrl_wrapper import STATE_KEY, MemoryModule
from rlmem.validate import check_float, check_int, check_keys

#: every trigger policy by name (``trigger=<name>``)
TRIGGER_POLICIES: Registry[type[TriggerPolicy]] = Registry("trigger policy", "trigger.policy")
PROBES = ("entropy", "max_prob", "hidden_var")
COST_KEYS = ("cost_coef", "cost", "cost_warmup")
_PREV = "trigger_prev_y"


class TriggerPolicy(nn.Module):
    """Decides ``fire: [B]`` for one step. Subclasses set ``name`` and override :meth:`decide`; ``state``
    holds their per-row state (``{name: [B, ...]}``, reset at episode starts)."""

    name = ""
    learned = False
    uses_probe = False

    def initial_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {}

    def decide(self, context: torch.Tensor, score: torch.Tensor | None, state: dict[str, torch.Tensor],
               forced: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``context: [B, d]``, ``score: [B]`` (the probe of the previous output, for policies that use one)
        -> ``(fire [B] bool, next state)``; ``forced``: the decision already taken (replay), whose state
        update is wanted."""
        raise NotImplementedError


@TRIGGER_POLICIES.register("always")
class Always(TriggerPolicy):
    name = "always"

    def decide(self, context, score, state, forced=None):
        return torch.ones(context.shape[0], dtype=torch.bool, device=context.device), state


@TRIGGER_POLICIES.register("never")
class Never(TriggerPolicy):
    name = "never"

    def decide(self, context, score, state, forced=None):
        return torch.zeros(context.shape[0], dtype=torch.bool, device=context.device), state


@TRIGGER_POLICIES.register("learned")
class Learned(TriggerPolicy):
    """A Bernoulli head ``logit = w . context + b``; samples while exploring (the collector's
    ``ExplorationType.RANDOM``), fires where ``logit > 0`` otherwise (greedy evaluation). ``init_bias`` 3
    starts it near ``always`` (p = 0.95): the agent first learns what the path is for, the cost then
    teaches it where to skip."""

    name = "learned"
    learned = True

    def __init__(self, d_context: int, init_bias: float = 3.0):
        super().__init__()
        self.head = nn.Linear(d_context, 1)
        nn.init.orthogonal_(self.head.weight, 0.01)  # near-constant first decisions, as the policy head
        nn.init.constant_(self.head.bias, check_float("trigger.init_bias", init_bias))

    def logits(self, context: torch.Tensor) -> torch.Tensor:
        """``context: [..., d] -> [...]``."""
        return self.head(context).squeeze(-1)

    @staticmethod
    def choose(logits: torch.Tensor) -> torch.Tensor:
        """Sample while exploring, else greedy: ``logits: [B] -> fire [B]``."""
        if exploration_type() == ExplorationType.RANDOM:
            return torch.bernoulli(torch.sigmoid(logits)).bool()
        return logits > 0

    def decide(self, context, score, state, forced=None):
        return (self.choose(self.logits(context)) if forced is None else forced), state


@TRIGGER_POLICIES.register("meco")
class MeCo(TriggerPolicy):
    """Dual threshold on a probe score: fire above ``hi``, not below ``lo``, else as at the previous step.
    ``lo``/``hi`` are buffers set by :meth:`calibrate`; until then every step fires."""

    name = "meco"
    uses_probe = True

    def __init__(self, probe: str = "entropy", target_rate: float = 0.5, margin: float = 0.2):
        super().__init__()
        self.probe = _check_probe(probe)
        self.target_rate = check_float("trigger.target_rate", target_rate, low=0.0, high=1.0)
        self.margin = check_float("trigger.margin", margin, low=0.0, high=1.0)
        self.register_buffer("lo", torch.tensor(-math.inf))
        self.register_buffer("hi", torch.tensor(-math.inf))

    def initial_state(self, batch_size, device):
        return {"trigger_last": torch.ones(batch_size, dtype=torch.bool, device=device)}

    def decide(self, context, score, state, forced=None):
        fire = (score > self.hi) | ((score >= self.lo) & state["trigger_last"]) if forced is None else forced
        return fire, {"trigger_last": fire}

    #: candidate threshold placements per search round (:meth:`calibrate`), and rounds
    _GRID, _ROUNDS = 33, 3

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor, is_init: torch.Tensor | None = None) -> None:
        """Place ``lo <= hi`` so that the hysteresis fires on ``target_rate`` of the steps of ``scores``.

        ``scores: [N, T]`` (rows of consecutive steps, as a rollout; a 1-d tensor is one sequence),
        ``is_init: [N, T]``: where episodes start (the decision state resets to "fired"; without it only
        t=0). The band between ``lo`` and ``hi`` holds ``margin`` of the scores (``lo = quantile(a)``,
        ``hi = quantile(a + margin)``); ``a`` is found by running the dual-threshold rule over the held-out
        sequences (vectorized over candidate placements) and taking the placement whose firing rate is
        ``target_rate``. Quantiles alone (``1 - target_rate -+ margin / 2``) miss it: steps in the band keep
        the previous decision, which pulls the rate toward the band's side of 0.5 (target 0.05 fired on
        0.9% of the steps, 0.9 on 100%). Autocorrelated scores are handled, as the simulation follows them.
        """
        seq = scores.detach().float()
        seq = seq.reshape(1, -1) if seq.dim() < 2 else seq.reshape(-1, seq.shape[-1])
        finite = seq[torch.isfinite(seq)]
        if finite.numel() == 0:
            return
        if self.target_rate <= 0.0 or self.target_rate >= 1.0:  # never / always, whatever the scores
            value = math.inf if self.target_rate <= 0.0 else -math.inf
            self.lo.fill_(value)
            self.hi.fill_(value)
            return
        starts = torch.zeros(seq.shape, dtype=torch.bool)
        if is_init is not None and is_init.numel() == seq.numel():
            starts = is_init.detach().reshape(seq.shape).bool().cpu()
        seq = seq.cpu()
        margin = min(self.margin, 1.0)
        left, right = 0.0, 1.0 - margin  # a = 0: the most firing, 1 - margin: the least
        best = (left, math.inf)
        for _ in range(self._ROUNDS):
            a = torch.linspace(left, right, self._GRID, dtype=torch.float64)
            rates = self._simulate(seq, starts, finite, a, margin)  # [K], non-increasing in a
            error = (rates - self.target_rate).abs()
            k = int(error.argmin())
            if float(error[k]) < best[1]:
                best = (float(a[k]), float(error[k]))
            above = (rates >= self.target_rate).nonzero()
            i = int(above[-1]) if above.numel() else 0  # the last placement still firing at least the target
            left, right = float(a[i]), float(a[min(i + 1, self._GRID - 1)])
            if right <= left:
                break
        lo, hi = self._thresholds(finite, torch.tensor([best[0]], dtype=torch.float64), margin)
        self.lo.fill_(float(lo[0]))
        self.hi.fill_(float(hi[0]))

    @staticmethod
    def _thresholds(finite: torch.Tensor, a: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.cat([a, (a + margin).clamp(max=1.0)]).to(torch.float64)
        values = torch.quantile(finite.cpu().double(), q)
        return values[: a.numel()], values[a.numel():]

    def _simulate(self, seq: torch.Tensor, starts: torch.Tensor, finite: torch.Tensor, a: torch.Tensor,
                  margin: float) -> torch.Tensor:
        """Firing rate of the dual-threshold rule over ``seq: [N, T]`` for each placement ``a: [K]``."""
        lo, hi = self._thresholds(finite, a, margin)
        lo, hi = lo.float().unsqueeze(1), hi.float().unsqueeze(1)  # [K, 1]
        last = torch.ones(a.numel(), seq.shape[0], dtype=torch.bool)
        fired = torch.zeros(a.numel(), seq.shape[0])
        for t in range(seq.shape[1]):
            last = last | starts[:, t]
            s = seq[:, t]
            last = (s > hi) | ((s >= lo) & last)
            fired += last
        return fired.sum(1).double() / seq.numel()


@TRIGGER_POLICIES.register("ars")
class ARS(TriggerPolicy):
    """Checkpointed certainty with a tightening suppression threshold (see the module docstring)."""

    name = "ars"
    uses_probe = True

    def __init__(self, probe: str = "entropy", checkpoint_every: int = 4, certainty: float = 0.9,
                 tighten: float = 0.05, floor: float = 0.5):
        super().__init__()
        self.probe = _check_probe(probe)
        self.every = check_int("trigger.checkpoint_every", checkpoint_every, low=1)
        self.certainty = check_float("trigger.certainty", certainty, low=0.0, high=1.0)
        self.tighten = check_float("trigger.tighten", tighten, low=0.0, high=1.0)
        self.floor = check_float("trigger.floor", floor, low=0.0, high=1.0)
        if self.floor > self.certainty:
            raise ValueError(f"trigger.floor={floor} must be <= trigger.certainty={certainty}")

    def initial_state(self, batch_size, device):
        return {"trigger_step": torch.zeros(batch_size, dtype=torch.long, device=device),
                "trigger_threshold": torch.full((batch_size,), self.certainty, device=device),
                "trigger_suppressed": torch.zeros(batch_size, dtype=torch.bool, device=device)}

    def decide(self, context, score, state, forced=None):
        step, threshold, suppressed = state["trigger_step"], state["trigger_threshold"], state["trigger_suppressed"]
        checkpoint = (step > 0) & (step % self.every == 0)
        certain = (1.0 - score) >= threshold
        suppressed = torch.where(checkpoint, certain, suppressed)
        tightened = torch.where(certain, (threshold - self.tighten).clamp_min(self.floor),
                                torch.full_like(threshold, self.certainty))
        threshold = torch.where(checkpoint, tightened, threshold)
        fire = ~suppressed if forced is None else forced
        return fire, {"trigger_step": step + 1, "trigger_threshold": threshold, "trigger_suppressed": suppressed}


def _check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"trigger.probe={probe!r} is not a probe; valid: {list(PROBES)}")
    return probe


def build_trigger_policy(cfg: Mapping[str, Any], d_context: int) -> TriggerPolicy:
    """``cfg``: ``{policy: learned|meco|ars|always|never, <its knobs>, cost_coef, cost}`` (the last two
    belong to the cost, see :func:`trigger_cost_settings`)."""
    cfg = dict(cfg)
    name = cfg.pop("policy", None)
    if name not in TRIGGER_POLICIES:
        raise ValueError(TRIGGER_POLICIES.unknown(name))
    cls = TRIGGER_POLICIES.get(name)
    for key in COST_KEYS:
        cfg.pop(key, None)
    knobs = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "d_context")]
    check_keys("trigger", cfg, knobs + list(COST_KEYS), of=f"trigger={name}")
    takes_context = "d_context" in inspect.signature(cls.__init__).parameters
    return cls(d_context, **cfg) if takes_context else cls(**cfg)


def trigger_cost_settings(cfg: Mapping[str, Any]) -> tuple[float, float | None, int]:
    """``(cost_coef >= 0, cost in MFLOPs or None = measured, cost_warmup frames >= 0)``, checked."""
    coef = check_float("trigger.cost_coef", cfg.get("cost_coef", 0.0), low=0.0)
    cost = cfg.get("cost")
    if cost is not None:
        cost = check_float("trigger.cost", cost, low=0.0)
    warmup = check_int("trigger.cost_warmup", cfg.get("cost_warmup", 0), low=0)
    return coef, cost, warmup


class TriggeredMemory(MemorySystem):
    """A memory with a gated path plus the policy that decides it: ``x: [B, T, d_in] -> y: [B, T, d_out]``.

    ``forward(x, state, is_init, trigger=None)``: without ``trigger`` it decides step by step (acting);
    with stored ``trigger: [B, T]`` it replays them. :meth:`run` also returns what was decided:
    ``{"trigger": [B, T] bool, "trigger_logits": [B, T] (learned), "trigger_score": [B, T] (probes)}``.
    ``probe``: ``y: [N, d_out] -> uncertainty [N]`` in [0, 1] (built by the agent from its policy head).
    ``record_context``: also record ``trigger_context: [B, T, d_in + d_out]``, the decision context
    ``[x_t ; y_{t-1}]`` (what the critic reads for a memory whose path changes the current output).
    """

    def __init__(self, memory: MemorySystem, policy: TriggerPolicy,
                 probe: Callable[[torch.Tensor], torch.Tensor] | None = None, record_context: bool = False):
        super().__init__()
        if getattr(memory, "trigger_path", None) is None:
            raise ValueError(f"trigger={policy.name}: memory system {type(memory).__name__} has no gated path to "
                             "trigger (memories with one: infinity, miras, darmt, stm, cmrn with top_k > 1)")
        if policy.uses_probe and probe is None:
            raise ValueError(f"trigger={policy.name} needs a probe of the agent's previous output")
        self.memory, self.policy, self._probe = memory, policy, probe
        self.record_context = bool(record_context)
        self.d_in, self.d_out = memory.d_in, memory.d_out
        # ``trigger_path`` stays None: here ``trigger=None`` means "the policy decides", not "always"
        self.gated_path = memory.trigger_path

    def initial_state(self, batch_size, device=None):
        state = self.memory.initial_state(batch_size, device)
        if _PREV in state.keys():
            raise ValueError(f"{type(self.memory).__name__}'s state already has a key {_PREV!r}")
        state[_PREV] = torch.zeros(batch_size, self.d_out, device=device)
        for key, value in self.policy.initial_state(batch_size, device).items():
            state[key] = value
        return state

    def _split(self, state: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        extra = [_PREV, *self.policy.initial_state(1, "cpu")]
        return state.exclude(*extra), state.select(*extra)

    def score(self, prev_y: torch.Tensor) -> torch.Tensor | None:
        """The probe's uncertainty of the previous outputs ``prev_y: [..., d_out]`` -> ``[...]``."""
        if not self.policy.uses_probe:
            return None
        if self.policy.probe == "hidden_var":
            return prev_y.var(-1, unbiased=False)
        return self._probe(prev_y, self.policy.probe)

    def forward(self, x, state, is_init, trigger=None):
        y, next_state, _ = self.run(x, state, is_init, trigger)
        return y, next_state

    def run(self, x, state, is_init, trigger=None):
        check_inputs(self, x, state, is_init)
        check_trigger(self, trigger, is_init)
        if trigger is None:
            return self._decide_and_run(x, state, is_init)
        return self._replay(x, state, is_init, trigger)

    def _reset_extra(self, extra: dict, is_init_t: torch.Tensor, batch: int, device) -> dict:
        if not bool(is_init_t.any()):
            return extra
        init = {_PREV: torch.zeros_like(extra[_PREV]), **self.policy.initial_state(batch, device)}
        return {k: torch.where(is_init_t.view(-1, *([1] * (v.dim() - 1))), init[k], v) for k, v in extra.items()}

    def _decide_and_run(self, x, state, is_init):
        inner, extra_td = self._split(state)
        extra = dict(extra_td.items())
        B, T = x.shape[:2]
        ys, fires, logits, scores, contexts = [], [], [], [], []
        for t in range(T):
            extra = self._reset_extra(extra, is_init[:, t], B, x.device)
            context = torch.cat([x[:, t], extra[_PREV]], -1)
            contexts.append(context)
            score = self.score(extra[_PREV])
            policy_state = {k: v for k, v in extra.items() if k != _PREV}
            if self.policy.learned:  # the logits once: they decide and are recorded for the joint log-prob
                logits.append(self.policy.logits(context))
                fire = self.policy.choose(logits[-1])
            else:
                fire, policy_state = self.policy.decide(context, score, policy_state)
            y, inner = self.memory(x[:, t : t + 1], inner, is_init[:, t : t + 1], trigger=fire.unsqueeze(1))
            extra = {_PREV: y[:, 0], **policy_state}
            ys.append(y)
            fires.append(fire)
            if score is not None:
                scores.append(score)
        record = {"trigger": torch.stack(fires, 1)}
        if logits:
            record["trigger_logits"] = torch.stack(logits, 1)
        if scores:
            record["trigger_score"] = torch.stack(scores, 1)
        if self.record_context:
            record["trigger_context"] = torch.stack(contexts, 1)
        return torch.cat(ys, 1), self._join(inner, extra), record

    def _replay(self, x, state, is_init, trigger):
        inner, extra_td = self._split(state)
        y, inner = self.memory(x, inner, is_init, trigger=trigger)
        prev = torch.cat([extra_td[_PREV].unsqueeze(1), y[:, :-1]], 1)  # y_{t-1}; 0 where an episode starts
        prev = prev.masked_fill(is_init.unsqueeze(-1), 0.0)
        record = {"trigger": trigger}
        context = torch.cat([x, prev], -1) if self.policy.learned or self.record_context else None
        if self.policy.learned:
            record["trigger_logits"] = self.policy.logits(context)
        if self.record_context:
            record["trigger_context"] = context
        score = self.score(prev)
        if score is not None:
            record["trigger_score"] = score
        # the policy's own state follows the stored decisions (cheap [B] ops per step)
        extra = dict(extra_td.items())
        policy_state = {k: v for k, v in extra.items() if k != _PREV}
        if policy_state:
            B = x.shape[0]
            for t in range(x.shape[1]):
                policy_state = self._reset_extra({_PREV: prev[:, t], **policy_state}, is_init[:, t], B, x.device)
                policy_state.pop(_PREV)
                _, policy_state = self.policy.decide(None, None if score is None else score[:, t], policy_state,
                                                     forced=trigger[:, t])
        return y, self._join(inner, {_PREV: y[:, -1], **policy_state}), record

    @staticmethod
    def _join(inner: TensorDictBase, extra: dict) -> TensorDict:
        state = inner.clone(False)
        for key, value in extra.items():
            state[key] = value
        return state

    def aux_loss(self):
        return self.memory.aux_loss()

    def diagnostics(self):
        return self.memory.diagnostics()


class TriggeredMemoryModule(MemoryModule):
    """:class:`~rlmem.torchrl_wrapper.MemoryModule` for a :class:`TriggeredMemory`: step mode writes the
    decisions (``trigger``, and ``trigger_logits`` / ``trigger_score`` where the policy has them, and
    ``trigger_context`` where the memory records it) next to the features; sequence mode replays
    ``td["trigger"]`` and rewrites ``trigger_logits`` and ``trigger_context`` (with gradients)."""

    def __init__(self, memory: TriggeredMemory, in_key: str = "embed", out_key: str = "features"):
        super().__init__(memory, in_key, out_key)
        self.in_keys = [*self.in_keys, "trigger"]
        record = ["trigger"] + (["trigger_logits"] if memory.policy.learned else []) \
            + (["trigger_score"] if memory.policy.uses_probe else []) \
            + (["trigger_context"] if memory.record_context else [])
        self.out_keys = [*self.out_keys, *record]

    def _forward_sequence(self, td: TensorDictBase) -> TensorDictBase:
        x = td.get(self.in_key)
        is_init = td.get("is_init").reshape(td.batch_size)
        state = td.get(STATE_KEY)[:, 0]
        trigger = td.get("trigger").reshape(td.batch_size)
        y, _, record = self.memory.run(x, state, is_init, trigger)
        td.set(self.out_key, y)
        for key, value in record.items():
            if key != "trigger":
                td.set(key, value)
        return td

    def _step(self, x, state, is_init):
        return self.memory.run(x, state, is_init)  # decides, runs, and returns what it decided


class WithTrigger(torch.distributions.Distribution):
    """The joint policy of (env action, trigger) given the trigger already drawn: ``log_prob(action) =
    log p(action) + log p(trigger)`` (Bernoulli of ``trigger_logits``), entropy the sum of both;
    sampling draws the env action only (the trigger was drawn before the memory's path ran)."""

    arg_constraints: dict = {}

    def __init__(self, trigger_logits: torch.Tensor, trigger: torch.Tensor, base_class: type = None,
                 base_kwargs: Mapping[str, Any] | None = None, **base_params):
        self.base = base_class(**base_params, **dict(base_kwargs or {}))
        self.trigger_dist = torch.distributions.Bernoulli(logits=trigger_logits)
        self.trigger = trigger.to(trigger_logits.dtype)
        super().__init__(batch_shape=self.base.batch_shape, event_shape=self.base.event_shape, validate_args=False)

    def log_prob(self, value):
        return self.base.log_prob(value) + self.trigger_dist.log_prob(self.trigger)

    def entropy(self):
        if has_analytic_entropy(self.base):
            base = self.base.entropy()
        else:  # e.g. TanhNormal: a Monte Carlo estimate, reparameterized, as TorchRL's PPO loss makes it
            x = self.base.rsample((4,)) if self.base.has_rsample else self.base.sample((4,))
            base = -self.base.log_prob(x).mean(0)
        return base + self.trigger_dist.entropy()

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    @property
    def mode(self):
        return self.base.mode

    @property
    def deterministic_sample(self):
        if hasattr(type(self.base), "deterministic_sample"):  # TanhNormal has one but no analytical mode
            return self.base.deterministic_sample
        return self.base.mode

    @property
    def mean(self):
        return self.base.mean
