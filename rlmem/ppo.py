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

Greedy evaluation episodes run every ``eval_interval`` frames; checkpoints are atomic and ``resume``
continues from the last one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from torch.utils.tensorboard import SummaryWriter
from torchrl.collectors import Collector
from torchrl.envs import ExplorationType
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from tqdm import tqdm

from rlmem.agents import ActorCritic
from rlmem.env_factory import make_torchrl_env, success_threshold
from rlmem.evaluate import evaluate_greedy
from rlmem.run_io import load_checkpoint, save_checkpoint, write_metrics


@dataclasses.dataclass
class PPOConfig:
    num_envs: int = 32
    rollout_len: int = 64  # steps per env per iteration
    seq_len: int = 64  # length of the replayed slices; divides rollout_len
    epochs: int = 4
    minibatches: int = 4
    lr: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.003
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    eval_interval: int = 25_000  # frames between greedy evaluations
    eval_episodes: int = 64

    def __post_init__(self):
        positive = ("num_envs", "rollout_len", "seq_len", "epochs", "minibatches", "eval_interval", "eval_episodes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ppo.{name} must be a positive integer, got {value!r}")
        if self.rollout_len % self.seq_len:
            raise ValueError(f"ppo.seq_len={self.seq_len} must divide ppo.rollout_len={self.rollout_len}")
        n_slices = self.num_envs * self.rollout_len // self.seq_len
        if self.minibatches > n_slices:
            raise ValueError(f"ppo.minibatches={self.minibatches} > number of slices {n_slices}")
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
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"unknown ppo options {unknown}; valid: {sorted(valid)}")
        return cls(**cfg)


class RecurrentPPO:
    """Trains one agent on one env; every output goes to ``run_dir``."""

    def __init__(
        self,
        agent_cfg: Mapping[str, Any],
        env_cfg: Mapping[str, Any],
        ppo: PPOConfig,
        run_dir: str | Path,
        *,
        seed: int = 0,
        total_frames: int = 200_000,
        resume: bool | str = False,
        log_interval: int = 1,
        checkpoint_interval: int = 50_000,
        progress_bar: bool = True,
        hparams: Mapping[str, Any] | None = None,
    ):
        if total_frames < 1:
            raise ValueError(f"total_frames must be >= 1, got {total_frames}")
        self.ppo, self.env_cfg, self.agent_cfg = ppo, dict(env_cfg), dict(agent_cfg)
        self.run_dir, self.seed, self.total_frames = Path(run_dir), seed, total_frames
        self.log_interval, self.checkpoint_interval, self.progress_bar = log_interval, checkpoint_interval, progress_bar
        self.hparams = dict(hparams or {})
        torch.manual_seed(seed)
        np.random.seed(seed)

        # build the env first: bad env names/values fail here, before anything is written
        probe = make_torchrl_env(self.env_cfg, 1)
        obs_dim = probe.observation_spec["observation"].shape[-1]
        action_spec = probe.action_spec_unbatched
        n_actions = action_spec.space.n
        probe.close()
        self.agent = ActorCritic(obs_dim, n_actions, action_spec, self.agent_cfg)
        self.success_threshold = success_threshold(self.env_cfg)

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
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=ppo.lr, eps=1e-5)

        self.frames, self.iteration, self.wall_before = 0, 0, 0.0
        self._t0: float | None = None  # perf_counter at the start of train()
        self.next_eval = 0
        self.metrics: dict[str, Any] = {}
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        if resume:
            self._load(Path(resume) if isinstance(resume, str) else self.checkpoint_path)

    # --- checkpoints ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frames": self.frames,
            "iteration": self.iteration,
            "wall_seconds": self.wall_seconds(),
            "next_eval": self.next_eval,
            "metrics": self.metrics,
            "agent_cfg": self.agent_cfg,
            "env_cfg": self.env_cfg,
            "ppo": dataclasses.asdict(self.ppo),
            "torch_rng": torch.get_rng_state(),
        }

    def _load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        ckpt = load_checkpoint(path)
        if ckpt["agent_cfg"] != self.agent_cfg or ckpt["env_cfg"] != self.env_cfg:
            raise ValueError(
                f"resume: checkpoint {path} was trained with agent={ckpt['agent_cfg']} env={ckpt['env_cfg']}, "
                f"not agent={self.agent_cfg} env={self.env_cfg}"
            )
        self.agent.load_state_dict(ckpt["agent"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.frames, self.iteration = ckpt["frames"], ckpt["iteration"]
        self.wall_before, self.next_eval = ckpt["wall_seconds"], ckpt["next_eval"]
        self.metrics = ckpt["metrics"]
        torch.set_rng_state(ckpt["torch_rng"])

    def wall_seconds(self) -> float:
        return self.wall_before + (0.0 if self._t0 is None else time.perf_counter() - self._t0)

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        ppo = self.ppo
        self.run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(self.run_dir))
        if self.frames == 0:
            writer.add_text("hyperparameters", _markdown_table(self.hparams))
        env = make_torchrl_env(self.env_cfg, ppo.num_envs, self.agent.memory_module.make_tensordict_primer())
        # a resumed run draws new episodes rather than replaying the first ones
        env.set_seed(self.seed + self.frames)
        collector = Collector(
            env,
            self.agent.policy,
            frames_per_batch=ppo.frames_per_batch,
            total_frames=-1,
            device="cpu",  # env, policy and storage on one device: no per-step casts
            exploration_type=ExplorationType.RANDOM,
        )
        self._t0 = time.perf_counter()
        frames_at_start = self.frames
        recent_returns: list[float] = []
        bar = tqdm(total=self.total_frames, initial=self.frames, unit="frames", disable=not self.progress_bar,
                   dynamic_ncols=True, desc=f"{self.agent_cfg.get('memory')} on {self.env_cfg['id']}")
        last_checkpoint = self.frames
        try:
            if self.frames >= self.next_eval:
                self._evaluate(writer)
            for data in collector:
                if self.frames >= self.total_frames:
                    break
                data = data.reshape(ppo.num_envs, ppo.rollout_len)
                self.frames += data.numel()
                self.iteration += 1
                episode_returns = data["next", "episode_reward"][data["next", "done"]].tolist()
                recent_returns = (recent_returns + episode_returns)[-100:]
                if ppo.anneal_lr:
                    for group in self.optimizer.param_groups:
                        group["lr"] = ppo.lr * max(0.0, 1.0 - self.frames / self.total_frames)
                losses = self._update(data)
                collector.update_policy_weights_()
                fps = (self.frames - frames_at_start) / (time.perf_counter() - self._t0)
                if self.iteration % self.log_interval == 0:
                    if episode_returns:
                        writer.add_scalar("charts/episodic_return", np.mean(episode_returns), self.frames)
                    writer.add_scalar("charts/SPS", fps, self.frames)
                    writer.add_scalar("charts/learning_rate", self.optimizer.param_groups[0]["lr"], self.frames)
                    for name, value in losses.items():
                        writer.add_scalar(f"losses/{name}", value, self.frames)
                self.metrics.update(
                    frames=self.frames, fps=fps, wall_seconds=self.wall_seconds(),
                    episodic_return=float(np.mean(recent_returns)) if recent_returns else float("nan"),
                )
                bar.update(data.numel())
                bar.set_postfix(fps=f"{fps:.0f}", ret=f"{self.metrics['episodic_return']:.3f}",
                                eval=f"{self.metrics.get('eval_success', float('nan')):.2f}")
                if self.frames >= self.next_eval or self.frames >= self.total_frames:
                    self._evaluate(writer)
                if self.frames - last_checkpoint >= self.checkpoint_interval or self.frames >= self.total_frames:
                    save_checkpoint(self.checkpoint_path, self._state())
                    last_checkpoint = self.frames
                write_metrics(self.run_dir / "metrics.json", self.metrics)
                if self.frames >= self.total_frames:
                    break
        finally:
            bar.close()
            collector.shutdown()
            writer.close()
        self.metrics["wall_seconds"] = self.wall_seconds()
        write_metrics(self.run_dir / "metrics.json", self.metrics)
        return self.metrics

    def _evaluate(self, writer: SummaryWriter) -> None:
        self.agent.eval()
        result = evaluate_greedy(self.agent, self.env_cfg, self.ppo.eval_episodes, seed=10_000 + self.seed,
                                 success_threshold=self.success_threshold)
        self.agent.train()
        writer.add_scalar("charts/eval_return", result["eval_return"], self.frames)
        if not math.isnan(result["eval_success"]):
            writer.add_scalar("charts/eval_success", result["eval_success"], self.frames)
        self.metrics.update(result)
        self.metrics["eval_frames"] = self.frames
        self.next_eval = self.frames + self.ppo.eval_interval

    @torch.no_grad()
    def _add_bootstrap_values(self, data: TensorDict) -> None:
        """``("next", "state_value")``: the next recorded value, or a fresh one where the next step is not
        in the rollout (last column) or belongs to a new episode (truncation; after termination it is unused)."""
        value = data["state_value"]
        next_value = torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], 1)
        need = data["next", "truncated"].squeeze(-1).clone()
        need[:, -1] = True
        nxt = data["next"][need].select("observation", *_state_keys(data))
        nxt.set("is_init", torch.zeros(nxt.shape[0], 1, dtype=torch.bool))
        self.agent.critic(self.agent.backbone(nxt))
        next_value[need] = nxt["state_value"]
        data.set(("next", "state_value"), next_value)

    def _update(self, data: TensorDict) -> dict[str, float]:
        ppo = self.ppo
        self._add_bootstrap_values(data)
        with torch.no_grad():
            self.gae(data)
        slices = data.reshape(ppo.num_envs, ppo.rollout_len // ppo.seq_len, ppo.seq_len).reshape(-1, ppo.seq_len)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(ppo.epochs):
            for idx in torch.randperm(slices.shape[0]).chunk(ppo.minibatches):
                batch = slices[idx]
                with set_recurrent_mode(True):
                    self.agent.backbone(batch)
                    out = self.loss_module(batch)
                loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                aux = self.agent.aux_loss()
                if aux is not None:
                    loss = loss + aux
                if not torch.isfinite(loss):
                    parts = {k: float(v.detach().float().mean()) for k, v in out.items() if v.is_floating_point()}
                    raise FloatingPointError(
                        f"non-finite PPO loss at frame {self.frames}: {parts}; try a lower ppo.lr or ppo.max_grad_norm"
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
                n += 1
        returns = data["value_target"]
        values = data["state_value"]
        explained = 1 - (returns - values).var() / returns.var().clamp_min(1e-8)
        return {**{k: v / n for k, v in sums.items()}, "explained_variance": float(explained)}


def _state_keys(data: TensorDict) -> list:
    return ["memory_state"] if "memory_state" in data["next"].keys() else []


def _markdown_table(params: Mapping[str, Any]) -> str:
    rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(params.items()))
    return f"|param|value|\n|-|-|\n{rows}"
