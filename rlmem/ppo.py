"""Recurrent PPO on TorchRL.

One iteration (CleanRL's loop, TorchRL's pieces):

1. **Collect** ``num_envs x rollout_len`` frames with TorchRL's ``Collector``; the policy runs in step
   mode and records, at every step, the memory state it started from, the action log-prob and the value.
2. **Advantages**: the bootstrap value ``V(next obs, next state)`` is the next step's recorded value,
   except at the rollout's last step and at truncations, where it is computed from the stored
   ``("next", ...)`` entries; then TorchRL's ``GAE`` on those precomputed values.
3. **Update**: the rollout ``[N, T]`` is cut into slices ``[N * T / seq_len, seq_len]``; each epoch
   shuffles the slices into ``minibatches`` groups. Every slice is replayed in sequence mode from its
   *stored* start state (never a fresh zero state, never shuffled single steps), resetting exactly where
   ``is_init``; TorchRL's ``ClipPPOLoss`` (advantage normalization, entropy bonus) on the replayed
   features, gradient-norm clipping.

Greedy evaluation episodes run every ``eval_interval`` frames. On a GPU (``device="cuda"``) the agent learns
there while a CPU copy of it acts beside the envs (collection, evaluation), its weights refreshed after
every update. The run's lifecycle is :class:`rlmem.run.Run`'s (shared with the LM trainer): atomic,
weights-only checkpoints; a run resumes from its last one (TensorBoard events and ``progress.csv`` rows after
it are purged, so curves stay one clean line); a finished run is reported rather than retrained; hooks
(:mod:`rlmem.callbacks`, ``stop_at``) can end it.

Ctrl-C / SIGTERM are checked between collection steps (``collector=sync``), between evaluation steps and
between the minibatches of an update: a stop during an update **discards the partial update** (the weights, optimizer, reward statistics
and counters from before the rollout are restored and checkpointed), so a resumed run redoes that iteration
with a fresh rollout; a stop during collection checkpoints the state after the last whole iteration.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from rlmem.agent_protocol import TrainableAgent, check_agent
from rlmem.callbacks import Callback, build_callbacks
from rlmem.collectors import CollectorConfig, EnvFactory, WorkerWhere, build_collector, check_collector_supports
from rlmem.compute import ComputeMeter, TriggerCost
from rlmem.devices import check_device
from rlmem.env_factory import effective_env_kwargs, horizon_warning, success_threshold
from rlmem.evaluate import EvaluationStopped, evaluate_greedy, evaluation_seed
from rlmem.interrupts import TrainingInterrupted
from rlmem.reward_scaling import ReturnScaler
from rlmem.run import Run
from rlmem.run_io import NonFiniteError, check_finite, flatten
from rlmem.torchrl_wrapper import STATE_KEY
from rlmem.validate import check_float, check_int, from_mapping

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PPOConfig:
    num_envs: int = 32
    rollout_len: int = 64  # steps per env per iteration
    seq_len: int = 64  # length of the replayed slices; divides rollout_len
    epochs: int = 4
    minibatches: int = 4  # equal groups of slices per epoch; divides the number of slices
    lr: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.003
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    normalize_reward: bool = True  # divide rewards by the running std of the discounted return (if > 1)
    eval_interval: int = 25_000  # frames between greedy evaluations
    eval_episodes: int = 64

    def __post_init__(self):
        # types first, so a wrong one names its key instead of failing in a comparison
        for field in dataclasses.fields(self):
            name, value = f"ppo.{field.name}", getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            if field.type == "int":
                check_int(name, value, low=1)
            if field.type == "float":
                setattr(self, field.name, check_float(name, value))
        if self.rollout_len % self.seq_len:
            raise ValueError(f"ppo.seq_len={self.seq_len} must divide ppo.rollout_len={self.rollout_len}")
        n_slices = self.num_envs * self.rollout_len // self.seq_len
        if n_slices % self.minibatches:
            valid = [d for d in range(1, n_slices + 1) if n_slices % d == 0]
            raise ValueError(f"ppo.minibatches={self.minibatches} must divide the number of replayed slices "
                             f"num_envs * rollout_len / seq_len = {n_slices} (equal minibatches); valid: {valid}")
        for name in ("lr", "max_grad_norm", "clip_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("entropy_coef", "value_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def frames_per_batch(self) -> int:
        return self.num_envs * self.rollout_len

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PPOConfig:
        """From a mapping (the ``ppo`` config group): every key and type checked, see
        :func:`rlmem.validate.from_mapping`; ranges in ``__post_init__``."""
        return from_mapping(cls, cfg, "ppo")


class _UpdateDiscarded(Exception):
    """A stop was requested between two minibatches; the partial update was undone."""


class _CollectionStopped(Exception):
    """A stop was requested between two collection steps (``collector=sync``)."""


class RecurrentPPO:
    """Trains one agent on one env; every output goes to ``run_dir`` (the lifecycle of :class:`rlmem.run.Run`).

    ``resume``: True continues from ``run_dir/checkpoints/last.pt`` when it exists (else starts fresh);
    False starts fresh and refuses a ``run_dir`` that already holds a run; a path resumes from that
    checkpoint (which must have been trained with the same agent, env and trigger: the error names the keys
    that differ). ``progress_bar``: a bar on a terminal; everywhere (log files too) a line with the percentage
    done, frames/s and ETA is logged every ``summary_interval`` seconds and at each evaluation.
    ``verbose``: 0 silent, 1 progress and summary (printed on stderr by the Python API, as by the command
    line). ``callbacks``: :class:`rlmem.callbacks.Callback` hooks (``on_step``, ``on_eval``, ``on_checkpoint``;
    returning False ends the run cleanly); ``stop_at``: e.g. ``{"eval_success": 0.95, "evals": 2}`` ends
    the run at the 2nd consecutive evaluation with ``eval_success >= 0.95`` (:class:`rlmem.callbacks.StopAt`).
    ``csv``: also write the logged scalars to ``run_dir/progress.csv`` (default true). ``config``: the resolved
    run config, recorded in ``metrics.json`` and TensorBoard; its ``logger.stop_at`` and ``logger.csv`` apply
    where ``stop_at`` / ``csv`` are not given. ``collector``: where the envs step (:mod:`rlmem.collectors`;
    default ``{"type": "sync"}``, the trainer's own process). ``device``: where the agent learns (``"cpu"`` or
    ``"cuda[:i]"``); elsewhere than the CPU, ``acting_agent`` is a CPU copy that collects and evaluates.

    The learning rate anneals linearly to 0 at the run's last frame. A finished run continued with a larger
    ``total_frames`` anneals from the learning rate it ended with to 0 at the new end (logged as a warning),
    never jumping back up.
    """

    def __init__(
        self,
        agent: TrainableAgent,
        env_cfg: Mapping[str, Any],
        ppo: PPOConfig,
        run_dir: str | Path,
        *,
        seed: int = 0,
        total_frames: int = 200_000,
        resume: bool | str | Path = True,
        log_interval: int = 1,
        checkpoint_interval: int = 50_000,
        progress_bar: bool = True,
        summary_interval: float = 30.0,
        verbose: int = 1,
        callbacks: list[Callback] | None = None,
        stop_at: Mapping[str, Any] | None = None,
        csv: bool | None = None,
        config: Mapping[str, Any] | None = None,
        collector: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        check_agent(agent)
        # train_rl's builder passes the resolved config: its logger settings fill what it does not pass itself
        logger_cfg = (config or {}).get("logger") or {}
        stop_at = stop_at if stop_at is not None else logger_cfg.get("stop_at")
        csv = csv if csv is not None else logger_cfg.get("csv", True)
        check_int("seed", seed, low=0)
        check_int("total_frames", total_frames, low=1)
        check_int("logger.log_interval", log_interval, low=1)
        check_int("logger.checkpoint_interval", checkpoint_interval, low=1)
        check_float("logger.summary_interval", summary_interval, low=0.0)
        for name, value in (("logger.progress_bar", progress_bar), ("logger.csv", csv)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.ppo, self.env_cfg = ppo, dict(env_cfg)
        self.run_dir, self.seed, self.total_frames = Path(run_dir), seed, total_frames
        self.log_interval, self.checkpoint_interval = log_interval, checkpoint_interval
        self.progress_bar, self.summary_interval, self.verbose = progress_bar, summary_interval, verbose
        self.config = dict(config or {})
        self.collector_cfg = CollectorConfig.from_mapping(collector, ppo.num_envs)
        self.device = check_device(device)
        torch.manual_seed(seed)
        np.random.seed(seed)

        # the agent (rlmem.agents.build_agent) was built for this env: bad env names/values failed there
        self.acting_agent = self._make_acting_agent(agent)  # collects and evaluates, on the CPU
        self.agent = agent.to(self.device)  # learns
        self.agent_cfg, self.trigger_cfg = dict(agent.config["agent"]), dict(agent.config["trigger"])
        self.success_threshold = success_threshold(self.env_cfg)
        self.env_kwargs = effective_env_kwargs(self.env_cfg)
        horizon = horizon_warning(self.env_cfg, ppo.seq_len, ppo.rollout_len)
        if horizon is not None:  # a run whose slices cannot connect what the env asks to remember
            log.warning(horizon)

        self.loss_module = ClipPPOLoss(
            self.agent.actor,
            self.agent.critic,
            clip_epsilon=ppo.clip_epsilon,
            entropy_coeff=ppo.entropy_coef,
            critic_coeff=ppo.value_coef,
            loss_critic_type="l2",
            normalize_advantage=ppo.normalize_advantage,
        )
        self.gae = GAE(gamma=ppo.gamma, lmbda=ppo.gae_lambda, value_network=None)
        # values and advantages are learned on scaled rewards; returns are reported unscaled (RewardSum)
        self.reward_scaler = ReturnScaler(ppo.num_envs, ppo.gamma) if ppo.normalize_reward else None
        # compute accounting of a memory's gated path (compute/* in TensorBoard and metrics.json)
        self.compute_meter = ComputeMeter(ppo.num_envs, agent.path_cost) if agent.path_cost is not None else None
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=ppo.lr, eps=1e-5)

        self.frames, self.iteration, self.wall_before = 0, 0, 0.0
        self._t0: float | None = None  # perf_counter at the start of train()
        self.next_eval = 0
        self.metrics: dict[str, Any] = {}
        self.lr_schedule: dict[str, float] | None = None  # linear: from_lr at from_frames -> 0 at to_frames
        self.stopped_by: str | None = None  # the callback that ended the run (stop_at, ...)
        self.run = Run(self.run_dir, identity={"agent": self.agent_cfg, "env": self.env_cfg,
                                               "trigger": self.trigger_cfg},
                       legacy=_legacy_identity, resume=resume, unit="frames", verbose=verbose, progress_bar=progress_bar,
                       summary_interval=summary_interval, callbacks=build_callbacks(callbacks, stop_at), csv=csv)
        self.callbacks = self.run.callbacks
        self.checkpoint_path = self.run.checkpoint_path
        ckpt = self.run.restore()
        if ckpt is not None:
            self._load(ckpt)
        check_collector_supports(self.collector_cfg, agent, self.frames)

    # --- checkpoints ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frames": self.frames,
            "iteration": self.iteration,
            "next_eval": self.next_eval,
            "metrics": self.metrics,
            "agent_cfg": self.agent_cfg,
            "trigger_cfg": self.trigger_cfg,
            "compute_meter": None if self.compute_meter is None else self.compute_meter.state_dict(),
            "env_cfg": self.env_cfg,
            "ppo": dataclasses.asdict(self.ppo),
            "torch_rng": torch.get_rng_state(),
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
            "lr_schedule": self.lr_schedule,
            "stopped_by": self.stopped_by,
        }

    def _load(self, ckpt: Mapping[str, Any]) -> None:
        self.agent.load_state_dict(ckpt["agent"])
        self._sync_acting_agent()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.frames, self.iteration = ckpt["frames"], ckpt["iteration"]
        self.wall_before, self.next_eval = ckpt["wall_seconds"], ckpt["next_eval"]
        self.metrics = dict(ckpt["metrics"])
        self.lr_schedule = ckpt.get("lr_schedule")
        self.stopped_by = ckpt.get("stopped_by")
        torch.set_rng_state(ckpt["torch_rng"])
        if self.reward_scaler is not None and ckpt.get("reward_scaler") is not None:
            # keeps the running variance; the per-env returns restart with the envs' fresh episodes
            self.reward_scaler.load_state_dict(ckpt["reward_scaler"])
        if self.compute_meter is not None and ckpt.get("compute_meter") is not None:
            state = dict(ckpt["compute_meter"])
            state["running"] = np.asarray(state["running"], dtype=np.float64)
            self.compute_meter.load_state_dict(state)

    def _make_acting_agent(self, agent):
        """Acting steps the envs one step at a time, where a GPU launch per step costs more than it computes:
        off the CPU a CPU copy acts, refreshed by :meth:`_sync_acting_agent` after every update."""
        return agent if self.device.type == "cpu" else copy.deepcopy(agent).cpu()

    def _sync_acting_agent(self) -> None:
        """The acting copy takes the learner's weights and buffers (a trigger's calibrated thresholds too)."""
        if self.acting_agent is not self.agent:
            self.acting_agent.load_state_dict(self.agent.state_dict())

    def _save_checkpoint(self) -> bool:
        """Returns False if a callback's ``on_checkpoint`` ends the run."""
        # a model that went non-finite must not replace the last good checkpoint
        check_finite(self.agent.state_dict(), f"agent parameters at frames={self.frames}", self._kept_checkpoint())
        return self.run.save(self, self.frames, self._state(), self.wall_seconds())

    def _kept_checkpoint(self) -> str:
        return self.run.kept_checkpoint()

    @property
    def last_checkpoint_frames(self) -> int | None:
        return self.run.last_checkpoint

    def wall_seconds(self) -> float:
        return self.wall_before + (0.0 if self._t0 is None else time.perf_counter() - self._t0)

    @property
    def finished(self) -> bool:
        return self.frames >= self.total_frames or self.stopped_by is not None

    def _records(self) -> dict[str, Any]:
        """What the run really used, for ``metrics.json``."""
        return {
            "env_id": self.env_cfg["id"],
            "env_kwargs": self.env_kwargs,
            "memory": self.agent_cfg.get("memory"),
            "trigger": self.trigger_cfg,
            **({} if self.agent.path_cost is None else
               {"flops_base": self.agent.path_cost.base, "flops_path": self.agent.path_cost.path}),
            "parameters": sum(p.numel() for p in self.agent.parameters()),
            "seed": self.seed,
            "total_frames": self.total_frames,
            "frames_per_batch": self.ppo.frames_per_batch,
            "collector": self.collector_cfg.records(),
            "torch_threads": torch.get_num_threads(),  # the trainer's (threads=auto resolved)
            "config": self.config,
        }

    # --- learning rate ----------------------------------------------------------------------
    def _plan_lr_schedule(self, end: int) -> None:
        """Linear annealing to 0 at ``end``; a run continued past the end it was planned for anneals from the
        learning rate it stopped at (no jump back up)."""
        if self.lr_schedule is None:
            self.lr_schedule = {"from_frames": 0, "from_lr": self.ppo.lr, "to_frames": end}
        elif self.lr_schedule["to_frames"] != end:
            current = self.optimizer.param_groups[0]["lr"]
            log.warning("total_frames changed: the learning rate anneals from its current %.3g at frames=%d to 0 "
                        "at frames=%d (it was planned to reach 0 at frames=%d)", current, self.frames, end,
                        self.lr_schedule["to_frames"])
            self.lr_schedule = {"from_frames": self.frames, "from_lr": current, "to_frames": end}

    def learning_rate(self, frames: int) -> float:
        """The learning rate of the update after ``frames`` frames (constant ``ppo.lr`` without ``anneal_lr``)."""
        if not self.ppo.anneal_lr or self.lr_schedule is None:
            return self.ppo.lr
        sched = self.lr_schedule
        span = max(sched["to_frames"] - sched["from_frames"], 1)
        return sched["from_lr"] * (1.0 - (frames - sched["from_frames"]) / span)

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to ``total_frames`` (or until a callback / ``stop_at`` ends the run) and return the metrics
        (also in ``run_dir/metrics.json``).

        Raises :class:`~rlmem.interrupts.TrainingInterrupted` after checkpointing on SIGINT/SIGTERM, and
        :class:`~rlmem.run_io.NonFiniteError` (keeping the last good checkpoint) on a non-finite memory
        state, parameter or loss.
        """
        with self.run.console():
            return self._train()

    def _train(self) -> dict[str, Any]:
        metrics_path = self.run.metrics_path
        if self.finished:
            if metrics_path.exists():
                self.metrics = json.loads(metrics_path.read_text())
            why = f" (ended by {self.stopped_by})" if self.stopped_by else ""
            log.info("%s already finished%s, results kept: %s", self.run_dir, why, self.summary())
            return self.metrics
        batches = math.ceil((self.total_frames - self.frames) / self.ppo.frames_per_batch)
        end = self.frames + batches * self.ppo.frames_per_batch
        rounding = "" if end == self.total_frames else f" (total_frames={self.total_frames} rounded up to whole " \
                                                       f"batches of {self.ppo.frames_per_batch})"
        log.info("training %s on %s from frames=%d to frames=%d%s; outputs in %s", self.agent_cfg.get("memory"),
                 self.env_cfg["id"], self.frames, end, rounding, self.run_dir)
        self._plan_lr_schedule(end)
        self.metrics.update(self._records())
        with self.run.session(self.frames, end, f"{self.agent_cfg.get('memory')} on {self.env_cfg['id']}"):
            if self.frames == 0:
                records = self._records()  # the config as given, and what it resolved to
                params = {**records.pop("config"), "effective": records}
                self.run.text("hyperparameters", _markdown_table(flatten(params)))
            self.callbacks.on_train_start(self)
            self._loop(end)
            self.callbacks.on_train_end(self)
        self.metrics["wall_seconds"] = self.wall_seconds()
        if self.stopped_by:
            self.metrics["stopped_by"] = self.stopped_by
        self.run.write_metrics(self.metrics)
        why = f" (ended by {self.stopped_by})" if self.stopped_by else ""
        log.info("done%s: %s%s", why, self.summary(), rounding)
        return self.metrics

    def summary(self) -> str:
        """One line: frames, fps, recent return and the last evaluation (integers printed as integers)."""
        m = self.metrics
        ret = m.get("episodic_return", float("nan"))
        ret = "no episode finished yet" if ret is None or math.isnan(ret) else f"return={ret:.3f}"
        parts = [f"frames={self.frames}", f"fps={m.get('fps', 0) or 0:.0f}", ret]
        if m.get("eval_return") is not None:
            parts.append(f"eval_return={m['eval_return']:.3f}")
            if m.get("eval_success") is not None and not math.isnan(m["eval_success"]):
                parts.append(f"eval_success={m['eval_success']:.3f}")
            parts.append(f"(eval at frames={m['eval_frames']})")
        return " ".join(parts)

    def _interrupted(self, signum: int):
        return TrainingInterrupted(signum, f"frames={self.frames}", self.checkpoint_path)

    def _snapshot(self) -> dict[str, Any]:
        """What an iteration changes before and during its update, to undo a partial update."""
        # frozen parameters (a pretrained LM inside a memory) never change in an update: not copied
        frozen = {name for name, p in self.agent.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {
            "agent": {k: v.detach().clone() for k, v in self.agent.state_dict().items() if k not in frozen},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "frames": self.frames, "iteration": self.iteration, "metrics": copy.deepcopy(self.metrics),
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.full_state_dict(),
            "compute_meter": None if self.compute_meter is None else copy.deepcopy(self.compute_meter.state_dict()),
        }

    def _restore(self, snap: Mapping[str, Any]) -> None:
        missing = self.agent.load_state_dict(snap["agent"], strict=False).missing_keys
        frozen = {name for name, p in self.agent.named_parameters(remove_duplicate=False) if not p.requires_grad}
        assert set(missing) <= frozen, missing
        self.optimizer.load_state_dict(snap["optimizer"])
        self._sync_acting_agent()
        self.frames, self.iteration, self.metrics = snap["frames"], snap["iteration"], snap["metrics"]
        if self.reward_scaler is not None:
            self.reward_scaler.load_full_state_dict(snap["reward_scaler"])
        if self.compute_meter is not None:
            self.compute_meter.load_state_dict(snap["compute_meter"])

    def _loop(self, end: int) -> None:
        ppo, run = self.ppo, self.run
        cost = []  # the trigger's compute cost, charged to the reward (the env itself is untouched)
        if self.agent.triggered and self.agent.path_cost is not None and self.agent.cost_coef > 0:
            cost = [TriggerCost(self.agent.cost_coef, self.agent.path_cost.path / 1e6)]
            self._warm_up_cost(cost[0])
        # a resumed run draws new episodes rather than replaying the first ones
        primer = self.acting_agent.memory_module.make_tensordict_primer()
        make_env = EnvFactory(self.env_cfg, ppo.num_envs, primer, cost, seed=self.seed + self.frames)
        sync = self.collector_cfg.type == "sync"
        # a worker's guard cannot call back into the trainer; the trainer's own (sync) one checks for a stop
        # between collection steps
        where = self._where_acting if sync else WorkerWhere(self.agent_cfg.get("memory"))
        guard = ActingGuard(self.acting_agent.policy, where, should_stop=self._stop_collecting if sync else None)
        collector = build_collector(self.collector_cfg, make_env, guard, ppo.frames_per_batch)
        self._t0 = time.perf_counter()
        frames_at_start = self.frames
        recent_returns: list[float] = []
        last_checkpoint = self.frames
        try:
            if self.frames >= self.next_eval and not self._evaluate():
                return self._end_early()
            it = iter(collector)
            while True:
                try:
                    data = next(it)
                except StopIteration:
                    break
                except _CollectionStopped:
                    self._save_checkpoint()
                    raise self._interrupted(run.stop_requested) from None
                snap = self._snapshot()
                data = data.reshape(ppo.num_envs, ppo.rollout_len)
                self._check_memory_state(data)
                if self.reward_scaler is not None:
                    reward, done = data["next", "reward"], data["next", "done"]
                    data["next", "reward"] = self.reward_scaler(reward.squeeze(-1), done.squeeze(-1)).unsqueeze(-1)
                # from the frames before this batch, so the last update still learns
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate(self.frames)
                self.frames += data.numel()
                self.iteration += 1
                episode_returns = data["next", "episode_reward"][data["next", "done"]].tolist()
                compute = self._account_compute(data)
                try:
                    losses = self._update(data)
                except _UpdateDiscarded:
                    self._restore(snap)
                    log.info("stopping: the partial update was discarded; checkpointing frames=%d", self.frames)
                    self._save_checkpoint()
                    raise self._interrupted(run.stop_requested) from None
                recent_returns = (recent_returns + episode_returns)[-100:]
                self._sync_acting_agent()
                collector.update_policy_weights_()  # from the acting agent, to worker collectors
                if cost:
                    self._warm_up_cost(cost[0])
                fps = (self.frames - frames_at_start) / (time.perf_counter() - self._t0)
                if self.iteration % self.log_interval == 0:
                    scalars = {}
                    if episode_returns:
                        scalars["charts/episodic_return"] = float(np.mean(episode_returns))
                    scalars["charts/SPS"] = fps
                    scalars["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
                    if self.reward_scaler is not None:
                        scalars["charts/reward_scale"] = 1.0 / self.reward_scaler.std
                    scalars.update({f"compute/{name}": value for name, value in compute.items()})
                    # "memory/<key>": the memory system's own diagnostics (MemorySystem.diagnostics)
                    scalars.update({name if name.startswith("memory/") else f"losses/{name}": value
                                    for name, value in losses.items()})
                    run.scalars(self.frames, scalars)
                self.metrics.update(
                    frames=self.frames, fps=fps, wall_seconds=self.wall_seconds(),
                    episodic_return=float(np.mean(recent_returns)) if recent_returns else float("nan"),
                )
                if compute:
                    self.metrics["compute"] = {**self.metrics.get("compute", {}), **compute}
                memory_diagnostics = {k[len("memory/"):]: v for k, v in losses.items() if k.startswith("memory/")}
                if memory_diagnostics:  # the last update's, as in TensorBoard
                    self.metrics["memory"] = memory_diagnostics
                ret = self.metrics["episodic_return"]
                run.advance(data.numel(), fps=f"{fps:.0f}", ret="-" if math.isnan(ret) else f"{ret:.3f}",
                            eval=f"{self.metrics.get('eval_success', float('nan')):.2f}")
                go_on = self.callbacks.on_step(self)
                evaluated = self.frames >= self.next_eval or self.frames >= end
                if evaluated:
                    go_on = self._evaluate() and go_on
                if evaluated or run.summary_due():
                    run.log_summary(self.frames, self.summary())
                done = self.frames >= end
                if not go_on:
                    return self._end_early()
                if done or run.stop_requested or self.frames - last_checkpoint >= self.checkpoint_interval:
                    if not self._save_checkpoint():  # an on_checkpoint hook ended the run
                        return self._end_early()
                    last_checkpoint = self.frames
                run.write_metrics(self.metrics)
                if done:
                    break
                if run.stop_requested:
                    raise self._interrupted(run.stop_requested)
        finally:
            collector.shutdown()

    def _end_early(self) -> None:
        """A callback ended the run: checkpoint it as finished (a rerun reports it)."""
        self.stopped_by = self.stopped_by or self.callbacks.stopped_by or "a callback"
        log.info("stopping: %s ended the run at frames=%d", self.stopped_by, self.frames)
        self._save_checkpoint()

    def _stop_collecting(self) -> bool:
        return self.run.stop_requested is not None

    def _warm_up_cost(self, cost: TriggerCost) -> None:
        """The trigger's cost ramps up linearly over its first ``cost_warmup`` frames: a path switched off
        before the agent has learned what it is for would never be found useful."""
        warmup = self.agent.cost_warmup
        cost.set_scale(1.0 if warmup == 0 else self.frames / warmup)

    def _account_compute(self, data: TensorDict) -> dict[str, float]:
        """``trigger_rate``, ``flops_per_step`` and ``episode_flops`` (mean over the episodes that ended in
        this rollout) of a memory with a gated path; lets the trigger policy calibrate on the rollout."""
        if self.compute_meter is None:
            return {}
        if "trigger" in data.keys():
            fired = data["trigger"].reshape(data.batch_size)
        else:  # trigger=always: the path runs on every step
            fired = torch.ones(data.batch_size, dtype=torch.bool)
        numbers = self.compute_meter.update(fired, data["next", "done"].reshape(data.batch_size))
        ended = numbers.pop("episode_flops")
        if ended:
            numbers["episode_flops"] = float(np.mean(ended))
        self.agent.after_rollout(data)
        return numbers

    def _where_acting(self) -> tuple[str, str]:
        return (f"memory system {self.agent_cfg.get('memory')!r} while acting after frames={self.frames}",
                self._kept_checkpoint())

    def _check_memory_state(self, data: TensorDict) -> None:
        """Stop on a non-finite memory state before it reaches an update or a checkpoint."""
        if STATE_KEY in data["next"].keys():
            where = f"the state of memory system {self.agent_cfg.get('memory')!r} at frames={self.frames}"
            check_finite(data["next", STATE_KEY], where, self._kept_checkpoint())

    def _evaluate(self) -> bool:
        """Greedy evaluation; returns False if a callback's ``on_eval`` (``stop_at``, ...) ends the run."""
        self.acting_agent.eval()
        try:
            result = evaluate_greedy(self.acting_agent, self.env_cfg, self.ppo.eval_episodes,
                                     seed=evaluation_seed(self.seed),
                                     success_threshold=self.success_threshold, should_stop=self._stop_collecting)
        except EvaluationStopped:  # a safe point: evaluating changes nothing; a resumed run evaluates again
            self.acting_agent.train()
            self._save_checkpoint()
            raise self._interrupted(self.run.stop_requested) from None
        self.acting_agent.train()
        scalars = {"charts/eval_return": result["eval_return"]}
        if "eval_trigger_rate" in result and self.agent.path_cost is not None:
            scalars["compute/eval_trigger_rate"] = result["eval_trigger_rate"]
        if not math.isnan(result["eval_success"]):
            scalars["charts/eval_success"] = result["eval_success"]
        self.run.scalars(self.frames, scalars)
        self.metrics.update(result)
        self.metrics["eval_frames"] = self.frames
        self.next_eval = self.frames + self.ppo.eval_interval
        go_on = self.callbacks.on_eval(self, self.metrics)
        if not go_on:
            self.stopped_by = self.callbacks.stopped_by
        return go_on

    @torch.no_grad()
    def _add_bootstrap_values(self, data: TensorDict) -> None:
        """``("next", "state_value")``: the next recorded value, or a fresh one where the next step is not
        in the rollout (last column) or belongs to a new episode (truncation; after termination it is unused).

        Computed under the collector's exploration type (RANDOM): a learned trigger samples its decision as
        it did inside the rollout, rather than firing greedily (logit > 0)."""
        value = data["state_value"]
        next_value = torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], 1)
        need = data["next", "truncated"].squeeze(-1).clone()
        need[:, -1] = True
        nxt = data["next"][need].select("observation", *_state_keys(data)).to(self.device)
        nxt.set("is_init", torch.zeros(nxt.shape[0], 1, dtype=torch.bool, device=self.device))
        with set_exploration_type(ExplorationType.RANDOM):
            self.agent.critic(self.agent.backbone(nxt))
        next_value[need] = nxt["state_value"].to(next_value.device)
        data.set(("next", "state_value"), next_value)

    def _update(self, data: TensorDict) -> dict[str, float]:
        """The PPO epochs over ``data``. Raises :class:`_UpdateDiscarded` when a stop is requested between two
        minibatches (the caller restores the state from before the rollout)."""
        ppo = self.ppo
        self._add_bootstrap_values(data)
        with torch.no_grad():
            self.gae(data)
        slices = data.reshape(ppo.num_envs, ppo.rollout_len // ppo.seq_len, ppo.seq_len).reshape(-1, ppo.seq_len)
        # the replay reads only each slice's start state: minibatches are indexed without the per-step states
        # (thousands of numbers per step for the larger memories), and the start state is put back as a view
        start_states = slices.get(STATE_KEY)[:, 0].to(self.device) if STATE_KEY in slices.keys() else None
        slices = slices.exclude(STATE_KEY, ("next", STATE_KEY)).to(self.device)  # one copy to the GPU, if any
        sums: dict[str, float] = {}
        n = 0
        for _ in range(ppo.epochs):
            # equal minibatches (PPOConfig checks that minibatches divides the number of slices)
            for idx in torch.randperm(slices.shape[0], device=self.device).view(ppo.minibatches, -1):
                if self.run.stop_requested is not None:  # a safe point: the caller undoes the partial update
                    raise _UpdateDiscarded
                batch = slices[idx]
                if start_states is not None:
                    batch.set(STATE_KEY, start_states[idx].unsqueeze(1).expand(*batch.batch_size))
                with set_recurrent_mode(True):
                    self.agent.backbone(batch)
                    # a sequence mode can fail where acting did not (the policy's NaN logits would otherwise
                    # surface as an obscure sampling error inside the loss)
                    if not torch.isfinite(batch["features"]).all():
                        raise NonFiniteError(
                            f"non-finite output of memory system {self.agent_cfg.get('memory')!r} in the PPO "
                            f"replay (sequence mode) at frames={self.frames}; {self._kept_checkpoint()}; acting "
                            "(step mode) was finite, so compare the memory's sequence mode with its steps "
                            "(rlmem.check_memory) or try a lower ppo.lr")
                    out = self.loss_module(batch)
                loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                aux = self.agent.aux_loss()
                if aux is not None:
                    loss = loss + aux
                diagnostics = self.agent.diagnostics()
                if not torch.isfinite(loss):
                    parts = {k: float(v.detach().float().mean()) for k, v in out.items() if v.is_floating_point()}
                    raise NonFiniteError(
                        f"non-finite PPO loss at frames={self.frames}: {parts}; {self._kept_checkpoint()}; "
                        "try a lower ppo.lr or ppo.max_grad_norm"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.agent.parameters(), ppo.max_grad_norm)
                self.optimizer.step()
                stats = {
                    "policy_loss": out["loss_objective"],
                    "value_loss": out["loss_critic"],
                    "entropy": out["entropy"],
                    "approx_kl": out["kl_approx"],
                    "clipfrac": out["clip_fraction"],
                }
                if aux is not None:
                    stats["aux_loss"] = aux
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                # the memory's diagnostics of this replay (computed before the optimizer step changed it)
                for key, value in diagnostics.items():
                    sums[f"memory/{key}"] = sums.get(f"memory/{key}", 0.0) + float(value)
                n += 1
        returns = data["value_target"]
        values = data["state_value"]
        explained = 1 - (returns - values).var() / returns.var().clamp_min(1e-8)
        # losses by name, and the memory's diagnostics as "memory/<key>" (means over the minibatch replays)
        return {**{k: v / n for k, v in sums.items()}, "explained_variance": float(explained)}


class ActingGuard(TensorDictModuleBase):
    """The collector's policy: when acting fails (e.g. sampling from NaN logits), say whether the memory
    produced a non-finite state or output at that step. The check runs only after a failure, so acting
    costs nothing more; ``where()`` returns (where it happened, which checkpoint is kept)."""

    def __init__(self, policy: TensorDictModuleBase, where, should_stop=None):
        super().__init__()
        self.policy, self.where, self.should_stop = policy, where, should_stop
        self.in_keys, self.out_keys = policy.in_keys, policy.out_keys

    def forward(self, td):
        if self.should_stop is not None and self.should_stop():  # Ctrl-C / SIGTERM between collection steps
            raise _CollectionStopped
        try:
            return self.policy(td)
        except RuntimeError:
            where, kept = self.where()
            next_state = td.get(("next", STATE_KEY), None)  # written in place by the memory before the failure
            if next_state is not None:
                check_finite(next_state, f"the state of {where}", kept)
            if "features" in td.keys():
                check_finite({"features": td["features"]}, f"the output of {where}", kept)
            raise


def _legacy_identity(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Identity and progress of a checkpoint from before :class:`rlmem.run.Run` (and before triggers)."""
    return ({"agent": ckpt["agent_cfg"], "env": ckpt["env_cfg"],
             "trigger": ckpt.get("trigger_cfg", {"policy": "always"})}, ckpt["frames"])


def _state_keys(data: TensorDict) -> list:
    return [STATE_KEY] if STATE_KEY in data["next"].keys() else []


def _markdown_table(params: Mapping[str, Any]) -> str:
    rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(params.items()))
    return f"|param|value|\n|-|-|\n{rows}"
