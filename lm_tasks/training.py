"""Supervised training on the LM tasks: model wrapper, answer-only loss, evaluation and the run loop.

``scripts/train_lm.py`` is a thin Hydra front end to :func:`run`; the pieces are importable on their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from rlmem.devices import check_device
from rlmem.validate import check_float, check_int
from rlmem.interrupts import GracefulStop, TrainingInterrupted
from rlmem.lm_tasks.tasks import LMBatch, LMTask, build_task
from rlmem.memory import build_memory
from rlmem.run_io import (NonFiniteError, check_finite, load_checkpoint, run_dir_holds_a_run, save_checkpoint,
                          write_metrics)
from rlmem.user_code import import_modules

log = logging.getLogger(__name__)

#: learning-rate schedules after the warm-up: step -> multiplier of ``lr`` (``progress`` in [0, 1])
LR_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}

#: keys of a model config that are not memory-system parameters
MODEL_KEYS = ("memory", "d_model")


class LMModel(nn.Module):
    """``tokens [B, T] -> logits [B, T, vocab_size]``: embedding -> memory system -> linear head.

    The memory runs in sequence mode from its initial state (``is_init`` True at t = 0 only), so each
    row of the batch is one episode.
    """

    def __init__(self, vocab_size: int, memory: str, d_model: int = 64, **memory_kwargs: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, check_int("d_model", d_model, low=1))
        self.memory = build_memory(memory, d_in=d_model, **memory_kwargs)
        self.head = nn.Linear(self.memory.d_out, vocab_size)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]``, or ``[N, vocab_size]`` at the N positions where ``mask [B, T]``
        is True (the head then skips non-answer positions: with a large vocabulary it dominates the cost)."""
        B, T = inputs.shape
        state = self.memory.initial_state(B, inputs.device)
        is_init = torch.zeros(B, T, dtype=torch.bool, device=inputs.device)
        is_init[:, 0] = True
        y, _ = self.memory(self.embed(inputs), state, is_init)
        return self.head(y if mask is None else y[mask])


def build_model(vocab_size: int, model_cfg: Mapping[str, Any]) -> LMModel:
    """From a flat model config ``{memory: <name>, d_model: 64, <memory kwargs>...}``."""
    cfg = dict(model_cfg)
    if "memory" not in cfg:
        raise ValueError(f"model config needs a 'memory' key (a registered memory system), got keys {sorted(cfg)}")
    return LMModel(vocab_size, cfg.pop("memory"), cfg.pop("d_model", 64), **cfg)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer positions only. ``targets``/``mask [B, T]``; ``logits [B, T, V]``, or
    ``[N, V]`` already at the N answer positions (``model(inputs, mask)``)."""
    return F.cross_entropy(logits[mask] if logits.dim() == 3 else logits, targets[mask])


@torch.no_grad()
def evaluate(model: LMModel, batches: Iterable[LMBatch]) -> dict[str, float]:
    """``accuracy`` over answer tokens, ``sequence_accuracy`` (every answer of a sample right), ``loss``."""
    was_training = model.training
    model.eval()
    right = total = seq_right = seqs = 0
    loss_sum = 0.0
    for inputs, targets, mask in batches:
        logits = model(inputs, mask)  # [N, V] at the answer positions
        correct = torch.zeros_like(mask)
        correct[mask] = logits.argmax(-1) == targets[mask]
        right += int(correct.sum())
        total += int(mask.sum())
        seq_right += int((correct.sum(1) == mask.sum(1)).sum())
        seqs += inputs.shape[0]
        loss_sum += float(F.cross_entropy(logits, targets[mask], reduction="sum"))
    model.train(was_training)
    return {"accuracy": right / total, "sequence_accuracy": seq_right / seqs, "loss": loss_sum / total}


@dataclasses.dataclass
class TrainConfig:
    """Everything of a run except the model and task configs (the top level of ``train_lm.yaml``)."""

    seed: int = 0
    eval_seed: int = 1000
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" (decays toward 0 at the last step) or "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 500
    resume: bool = True
    threads: int = 1
    device: str = "cpu"
    progress_bar: bool = True  # on a terminal; elsewhere a one-line summary at each evaluation
    imports: list[str] = dataclasses.field(default_factory=list)  # user modules imported before building

    def __post_init__(self):
        check_int("seed", self.seed)
        check_int("eval_seed", self.eval_seed)
        if self.eval_seed == self.seed:
            raise ValueError(f"eval_seed must differ from seed (held-out evaluation), both are {self.seed}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            check_int(name, getattr(self, name), low=1)
        check_float("lr", self.lr, low=1e-12)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("grad_clip", self.grad_clip, low=0.0)  # 0 = no clipping
        for name in ("resume", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_device(self.device)

    def learning_rate(self, step: int) -> float:
        """The learning rate of training step ``step`` (1-based): a linear warm-up over ``warmup_steps``, then
        ``lr_schedule`` over the remaining steps."""
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps + 1)
        return self.lr * LR_SCHEDULES[self.lr_schedule](min(progress, 1.0))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; valid: {valid}")
        return cls(**cfg)


class ConfigError(ValueError):
    """A bad training config (the message names the valid choices)."""


def setup(cfg: Mapping[str, Any]) -> tuple[TrainConfig, LMTask, LMModel]:
    """Validate the whole config and build task and model (so bad values fail before any training).

    ``cfg``: ``{"model": {...}, "task": {"name": ..., <knobs>}, <TrainConfig fields>}``. Raises
    :class:`ConfigError`.
    """
    try:
        return _setup(dict(cfg))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(e.args[0] if e.args else repr(e)) from e


def _setup(cfg: dict[str, Any]) -> tuple[TrainConfig, LMTask, LMModel]:
    model_cfg, task_cfg = dict(cfg.pop("model", {})), dict(cfg.pop("task", {}))
    train_cfg = TrainConfig.from_mapping(cfg)
    import_modules(train_cfg.imports)  # the user's own memory systems register themselves
    if "name" not in task_cfg:
        raise ValueError(f"task config needs a 'name' key, got keys {sorted(task_cfg)}")
    task = build_task(task_cfg.pop("name"), **task_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(task.vocab_size, model_cfg).to(train_cfg.device)
    return train_cfg, task, model


class LMTrainer:
    """Supervised training of one config (see :func:`setup`) into ``out_dir``: ``checkpoints/last.pt``,
    ``metrics.json``, TensorBoard events (unless another ``writer`` is given) and a log line per evaluation.

    With ``resume`` (the default) a run continues from its checkpoint, and a finished run is reported, not
    retrained; without it, an ``out_dir`` that already holds a run is refused. Ctrl-C / SIGTERM save a
    checkpoint and raise :class:`~rlmem.interrupts.TrainingInterrupted`. Config errors raise
    :class:`ConfigError` from the constructor, before anything is written.
    """

    def __init__(self, cfg: Mapping[str, Any], out_dir: str | Path, writer=None, progress: bool = True):
        self.cfg = dict(cfg)
        self.tc, self.task, self.model = setup(self.cfg)
        self.out_dir, self.writer, self.progress = Path(out_dir), writer, progress
        torch.set_num_threads(self.tc.threads)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        self.rng = np.random.default_rng(self.tc.seed)
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        self.identity = {"model": dict(self.cfg.get("model", {})), "task": dict(self.cfg.get("task", {}))}
        self.step, self.train_seconds, self.wall_before = 0, 0.0, 0.0
        self.last_checkpoint_step: int | None = None
        if self.tc.resume and self.ckpt_path.exists():
            self._load()
        elif not self.tc.resume and run_dir_holds_a_run(self.out_dir):
            raise ConfigError(f"{self.out_dir} already holds a run; resume=true continues it (or reports it if "
                              "finished), or choose another run dir (hydra.run.dir=...)")

    def _load(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt["identity"] != self.identity:
            raise ConfigError(f"{self.ckpt_path} was written for {ckpt['identity']}, not {self.identity}; "
                              "use another run dir (hydra.run.dir=...)")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["data_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = self.last_checkpoint_step = ckpt["step"]
        self.train_seconds, self.wall_before = ckpt.get("train_seconds", 0.0), ckpt.get("wall_seconds", 0.0)
        log.info("resuming from %s at step %d", self.ckpt_path, self.step)

    def _checkpoint(self, wall_seconds: float) -> None:
        kept = self._kept_checkpoint()
        check_finite(self.model.state_dict(), f"the model parameters at step {self.step}", kept)
        save_checkpoint(self.ckpt_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "data_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "identity": self.identity,
            "train_seconds": self.train_seconds, "wall_seconds": wall_seconds,
        })
        self.last_checkpoint_step = self.step

    def _kept_checkpoint(self) -> str:
        if self.last_checkpoint_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.ckpt_path} (step {self.last_checkpoint_step}) is kept"

    def train(self) -> dict[str, Any]:
        metrics_path = self.out_dir / "metrics.json"
        if self.step >= self.tc.steps and metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            log.info("%s already finished at step %d, results kept: eval_accuracy=%.4f", self.out_dir,
                     metrics["steps"], metrics["eval_accuracy"])
            return metrics
        writer = self.writer
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            # purge events a killed run wrote after its checkpoint (or all, when starting over)
            writer = SummaryWriter(str(self.out_dir), purge_step=self.step + 1 if self.step else 0)
        try:
            metrics = self._train(writer)
        finally:
            if self.writer is None:
                writer.close()
        write_metrics(metrics_path, metrics)
        return metrics

    def _train(self, writer) -> dict[str, Any]:
        tc, task, model, optimizer = self.tc, self.task, self.model, self.optimizer
        eval_rng = np.random.default_rng(tc.eval_seed)
        eval_set = [task.batch(tc.batch_size, eval_rng).to(tc.device) for _ in range(tc.eval_batches)]
        t_start = time.perf_counter()
        wall = lambda: self.wall_before + time.perf_counter() - t_start  # noqa: E731
        losses: list[float] = []
        diagnostics: dict[str, float] = {}  # the memory's (MemorySystem.diagnostics) at the last training step
        ev = evaluate(model, eval_set) if self.step >= tc.steps else None
        log.info("training %s on %s from step %d to %d; outputs in %s", self.cfg["model"].get("memory"),
                 task.name, self.step, tc.steps, self.out_dir)
        show_bar = self.progress and tc.progress_bar and sys.stderr.isatty()
        model.train()
        with GracefulStop() as stop, logging_redirect_tqdm(), tqdm(
            total=tc.steps, initial=self.step, desc=f"train_lm {task.name}/{self.cfg['model'].get('memory')}",
            disable=not show_bar, dynamic_ncols=True,
        ) as bar:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                inputs, targets, mask = task.batch(tc.batch_size, self.rng).to(tc.device)
                loss = answer_loss(model(inputs, mask), targets, mask)
                aux = model.memory.aux_loss()
                if aux is not None:
                    loss = loss + aux
                diagnostics = model.memory.diagnostics() if hasattr(model.memory, "diagnostics") else {}
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite training loss {loss.item()} at step {self.step + 1}; "
                                         f"training stopped, {self._kept_checkpoint()}")
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:  # from the step count, so a resumed run continues the schedule
                    group["lr"] = tc.learning_rate(self.step + 1)
                loss.backward()
                if tc.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                self.train_seconds += time.perf_counter() - t0
                self.step += 1
                losses.append(loss.item())
                writer.add_scalar("lm/train_loss", losses[-1], self.step)
                writer.add_scalar("lm/learning_rate", optimizer.param_groups[0]["lr"], self.step)
                if aux is not None:
                    writer.add_scalar("lm/aux_loss", float(aux.detach()), self.step)
                for name, value in diagnostics.items():  # the memory system's own numbers
                    writer.add_scalar(f"memory/{name}", value, self.step)
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    ev = evaluate(model, eval_set)
                    writer.add_scalar("lm/eval_accuracy", ev["accuracy"], self.step)
                    writer.add_scalar("lm/eval_sequence_accuracy", ev["sequence_accuracy"], self.step)
                    writer.add_scalar("lm/eval_loss", ev["loss"], self.step)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", eval_acc=f"{ev['accuracy']:.3f}")
                    log.info("step=%d/%d train_loss=%.4f eval_accuracy=%.4f eval_loss=%.4f", self.step, tc.steps,
                             float(np.mean(losses[-50:])), ev["accuracy"], ev["loss"])
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stop.requested:
                    writer.flush()  # events up to the checkpoint are on disk before it is
                    self._checkpoint(wall())
                bar.update(1)
                if stop.requested and self.step < tc.steps:
                    raise TrainingInterrupted(stop.requested, f"step {self.step}", self.ckpt_path)
        trained_tokens = self.step * tc.batch_size * task.seq_len
        return {
            "task": task.name,
            "task_knobs": task.knobs(),
            "model": self.cfg["model"].get("memory"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seed": tc.seed,
            "steps": self.step,
            "eval_accuracy": ev["accuracy"],
            "eval_sequence_accuracy": ev["sequence_accuracy"],
            "eval_loss": ev["loss"],
            "chance_accuracy": task.chance_accuracy(),
            "train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
            "memory": diagnostics,
            # training throughput over every step of the run (resumed parts included): batch tokens through
            # forward + backward + optimizer step, per second of those steps
            "tokens_per_s": trained_tokens / self.train_seconds if self.train_seconds > 0 else float("nan"),
            "wall_seconds": wall(),
            "config": self.cfg,
        }


def run(cfg: Mapping[str, Any], out_dir: str | Path, writer=None, progress: bool = True) -> dict[str, Any]:
    """Train on ``cfg`` (see :func:`setup` and :class:`LMTrainer`) into ``out_dir``; returns the metrics."""
    return LMTrainer(cfg, out_dir, writer, progress).train()
