"""Where the envs step while PPO collects: in the trainer's process, in worker processes, or on Ray.

``collector`` config (``rlmem/conf/collector/``)::

    type: sync | process | ray
    num_workers: auto          # process: worker processes; ray: remote collectors (Ray actors); auto: one
                               # per usable core of this machine, the most that divide ppo.num_envs
    address: null              # ray only: null = start a local Ray, "auto" = join the running cluster,
                               # or an address such as "ray://head:10001"
    ray_init_config: {num_cpus: 2}   # ray only: more ray.init() kwargs (resource keys only for a local Ray)
    remote_configs: {num_cpus: 1}    # ray only: ray.remote() options of each collector actor

- ``sync``: TorchRL's ``Collector`` steps all ``num_envs`` envs in the trainer's process (the default);
- ``process``: TorchRL's ``MultiSyncCollector``: ``num_workers`` processes, each stepping
  ``num_envs / num_workers`` envs with its own copy of the policy (one torch thread each);
- ``ray``: TorchRL's ``RayCollector`` (synchronous): ``num_workers`` Ray actors, each a ``Collector`` over
  ``num_envs / num_workers`` envs; needs ``pip install -e ".[ray]"``.

Every iteration the trainer collects one batch, updates, and sends the new weights to every worker
(``update_policy_weights_()``) before the next batch is collected, so PPO stays on-policy. A worker's
batch is ``[envs of the worker, rollout_len]``; the workers' batches are joined along the env dim, so the
trainer gets ``[num_envs, rollout_len]`` with one env's consecutive steps per row, as with ``sync``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import torch
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import ExplorationType

from rlmem.devices import usable_cores
from rlmem.env_factory import MissingDependencyError, make_torchrl_env, resolve_env_id
from rlmem.registry import Registry
from rlmem.validate import check_keys

#: collector type -> ``build(cfg, make_env, policy, frames_per_batch)``, the TorchRL collector of that type
COLLECTORS: Registry[Callable[..., Any]] = Registry("collector", "collector.type")
RAY_INSTALL = 'pip install -e ".[ray]"'
#: ray.init() kwargs Ray refuses when joining a running cluster (they size a local Ray)
LOCAL_RAY_ONLY = ("num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard")


@dataclasses.dataclass
class CollectorConfig:
    """A validated ``collector`` config (see the module docstring)."""

    type: str = "sync"
    num_workers: int = 1
    address: str | None = None
    ray_init_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    remote_configs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None, num_envs: int) -> CollectorConfig:
        """Raise a ValueError naming the valid choices for an unknown type or key, ``num_workers < 1`` or
        ``num_envs`` not divisible by ``num_workers``; a MissingDependencyError for ``ray`` without Ray."""
        cfg = dict(cfg or {})
        kind = cfg.get("type", "sync")
        if kind not in COLLECTORS:
            raise ValueError(COLLECTORS.unknown(kind))
        valid = {"type"} | ({"num_workers"} if kind != "sync" else set()) | (
            {"address", "ray_init_config", "remote_configs"} if kind == "ray" else set())
        check_keys("collector", cfg, valid, of=f"collector={kind}")
        divisors = [d for d in range(1, num_envs + 1) if num_envs % d == 0]  # worker counts that split the envs
        workers = cfg.get("num_workers", "auto" if kind != "sync" else 1)
        if workers == "auto":  # one worker per usable core, as many as divide the envs evenly
            workers = max(d for d in divisors if d <= usable_cores())
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"collector.num_workers must be auto or an integer >= 1, got {workers!r}")
        if num_envs % workers:
            raise ValueError(f"collector.num_workers={workers} must divide ppo.num_envs={num_envs} (every worker "
                             f"steps the same number of envs); valid: {divisors}")
        address = cfg.get("address")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"collector.address must be null (a local Ray), 'auto' or a Ray address, got {address!r}")
        for key in ("ray_init_config", "remote_configs"):
            value = cfg.get(key) or {}
            if not isinstance(value, Mapping):
                raise ValueError(f"collector.{key} must be a mapping of keyword arguments, got {value!r}")
            cfg[key] = dict(value)
        if kind == "ray" and importlib.util.find_spec("ray") is None:
            raise MissingDependencyError(f"collector=ray needs Ray, which is not installed: {RAY_INSTALL}")
        return cls(kind, workers, address, cfg["ray_init_config"], cfg["remote_configs"])

    def ray_init_kwargs(self) -> dict[str, Any]:
        """The ``ray.init()`` kwargs: ``address`` plus ``ray_init_config`` (without the keys that size a local
        Ray when joining a cluster). A local Ray's workers import from the trainer's ``sys.path`` (your own
        modules, e.g. ``imports=[my_envs]``) unless ``ray_init_config`` sets a ``runtime_env``."""
        kwargs = dict(self.ray_init_config)
        if self.address is not None:
            kwargs = {k: v for k, v in kwargs.items() if k not in LOCAL_RAY_ONLY}
        else:
            paths = os.pathsep.join(p for p in sys.path if p)
            kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": paths}})
        return {**kwargs, "address": self.address}

    def records(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the collector."""
        out: dict[str, Any] = {"type": self.type}
        if self.type != "sync":
            out["num_workers"] = self.num_workers
        if self.type == "ray":
            out.update(address=self.address, ray_init_config=self.ray_init_config,
                       remote_configs=self.remote_configs)
        return out


def check_collector_supports(cfg: CollectorConfig, agent, frames: int) -> None:
    """Raise a ValueError for what worker envs cannot do: a trigger's compute cost still warming up (its
    scale follows the trainer's frames, and workers hold a copy of the cost transform)."""
    if cfg.type == "sync":
        return
    charged = agent.triggered and agent.path_cost is not None and agent.cost_coef > 0
    if charged and frames < agent.cost_warmup:
        raise ValueError(f"collector={cfg.type} cannot ramp up the trigger's compute cost (trigger.cost_warmup="
                         f"{agent.cost_warmup}): the workers' envs charge a fixed cost; use collector=sync, or "
                         "trigger.cost_warmup=0")


class EnvFactory:
    """Builds the collector's env, :func:`~rlmem.env_factory.make_torchrl_env` ``(env_cfg, num_envs, primer,
    extra)``, seeded with ``seed`` (its envs get ``seed, seed + 1, ...``), in this process or in a worker (it
    pickles). Seeding it before the collector's first reset keeps the first observations those of the seeded
    episodes; in a worker it also seeds torch (the policy's sampling there).

    A worker process does not run the code that registered a Gymnasium id outside an importable module (a
    script, a test file): the factory carries the id's ``EnvSpec`` and registers it there when missing.
    A worker's factory (:meth:`split`) also makes the worker ignore SIGINT: Ctrl-C reaches every process of
    the terminal's process group, and the trainer checkpoints first and then stops its workers itself.
    """

    def __init__(self, env_cfg: Mapping[str, Any], num_envs: int, primer=None, extra: Sequence = (), *,
                 seed: int = 0, worker: bool = False):
        self.env_cfg, self.num_envs, self.primer, self.extra = dict(env_cfg), num_envs, primer, tuple(extra)
        env_id = resolve_env_id(self.env_cfg["id"])
        self.env_id, self.spec, self.seed, self.worker = env_id, gym.spec(env_id), seed, worker

    def split(self, parts: int) -> list[EnvFactory]:
        """One factory per worker, each with ``num_envs / parts`` of the envs and their seeds."""
        share = self.num_envs // parts
        return [EnvFactory(self.env_cfg, share, self.primer, self.extra, seed=self.seed + i * share, worker=True)
                for i in range(parts)]

    def __call__(self):
        if self.worker:
            torch.manual_seed(self.seed)  # the worker's action sampling: reproducible, its own stream
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.env_id not in gym.registry:
            gym.registry[self.env_id] = self.spec
        env = make_torchrl_env(self.env_cfg, self.num_envs, self.primer, self.extra)
        env.set_seed(self.seed)
        return env


def build_collector(cfg: CollectorConfig, make_env: EnvFactory, policy, frames_per_batch: int):
    """The TorchRL collector of ``cfg`` stepping ``make_env``'s envs (split among the workers, each env with
    the seed it has in ``make_env``) with ``policy``. Its batches have ``num_envs * rollout_len`` frames that
    ``reshape(num_envs, rollout_len)`` turns into one env's consecutive steps per row."""
    return COLLECTORS.get(cfg.type)(cfg, make_env, policy, frames_per_batch)


@COLLECTORS.register("sync")
def _sync_collector(cfg: CollectorConfig, make_env: EnvFactory, policy, frames_per_batch: int):
    return Collector(
        make_env(),
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=-1,
        device="cpu",  # env, policy and storage on one device: no per-step casts
        exploration_type=ExplorationType.RANDOM,
        # each batch is written into the same buffer instead of a copy (55 ms per batch for infinity):
        # the trainer is done with a batch before it asks for the next
        return_same_td=True,
    )


@COLLECTORS.register("process")
def _process_collector(cfg: CollectorConfig, make_env: EnvFactory, policy, frames_per_batch: int):
    return MultiSyncCollector(
        make_env.split(cfg.num_workers),
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=-1,
        device="cpu",
        exploration_type=ExplorationType.RANDOM,
        cat_results=0,  # [envs of worker 0; envs of worker 1; ...] x rollout_len
        use_buffers=True,  # (what cat_results needs; said here, TorchRL would warn it assumed it)
        num_threads=torch.get_num_threads(),  # the trainer keeps its own thread count
        num_sub_threads=1,  # one torch thread per worker: fastest for these small models
    )


@COLLECTORS.register("ray")
def _ray_collector(cfg: CollectorConfig, make_env: EnvFactory, policy, frames_per_batch: int):
    from torchrl.collectors.distributed import RayCollector

    collector = RayCollector(
        make_env.split(cfg.num_workers),
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=sys.maxsize,  # RayCollector reads -1 ("no limit" elsewhere) as a limit already reached
        device="cpu",
        exploration_type=ExplorationType.RANDOM,
        collector_class=RayWorkerCollector,
        sync=True,  # one batch from every worker per iteration, all acting with the same weights
        ray_init_config=cfg.ray_init_kwargs(),
        remote_configs=cfg.remote_configs or {"num_cpus": 1},
    )
    collector.update_policy_weights_()  # connects the weight sync before the first batch
    return collector


class RayWorkerCollector(Collector):
    """TorchRL's ``Collector`` as a Ray actor, with a one-line repr: Ray prefixes the actor's log lines with
    it (the default repr prints the whole env and policy)."""

    def __repr__(self) -> str:
        return "RayWorkerCollector"


class WorkerWhere:
    """What the acting guard reports for a failure inside a collector worker (the trainer's own ``where``
    does not pickle)."""

    def __init__(self, memory: str | None):
        self.memory = memory

    def __call__(self) -> tuple[str, str]:
        return (f"memory system {self.memory!r} while acting in a collector worker",
                "the trainer keeps its last good checkpoint")
