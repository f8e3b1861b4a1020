"""Supervised training on the LM tasks: model wrapper, answer-only loss, evaluation and the run loop.

``rlmem-train-lm`` (``rlmem/commands/train_lm.py``, ``scripts/train_lm.py``) is a thin Hydra front end to
:class:`LMTrainer`; the pieces are importable on their own. The run's lifecycle (run dir, resume, identity
check, weights-only checkpoints, graceful stop, TensorBoard with purge on resume, ``progress.csv``,
``metrics.json``, the progress line, callbacks and ``stop_at``) is :class:`rlmem.run.Run`'s, shared with
:class:`rlmem.ppo.RecurrentPPO`, with the same names: ``run_dir``, ``eval_interval``, ``checkpoint_interval``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlmem.callbacks import Callback, build_callbacks
from rlmem.devices import check_device
from rlmem.interrupts import TrainingInterrupted
from rlmem.lm_tasks.tasks import LMBatch, LMTask, build_task
from rlmem.memory import build_memory
from rlmem.run import Run, RunDirError
from rlmem.run_io import CheckpointError, NonFiniteError, check_finite
from rlmem.user_code import import_modules
from rlmem.validate import check_float, check_int, from_mapping

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
    eval_interval: int = 250  # steps between evaluations
    eval_batches: int = 8
    checkpoint_interval: int = 500  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    resume: bool = True
    threads: int = 1
    device: str = "cpu"
    progress_bar: bool = True  # on a terminal; everywhere a progress line at each evaluation
    summary_interval: float = 30.0  # seconds between progress lines in the log (and one at every evaluation)
    csv: bool = True  # also write the logged scalars to <run dir>/progress.csv
    # e.g. {eval_accuracy: 0.99, evals: 2}: stop at the 2nd evaluation in a row that reaches every target
    stop_at: dict[str, float] | None = None
    imports: list[str] = dataclasses.field(default_factory=list)  # user modules imported before building

    def __post_init__(self):
        check_int("seed", self.seed)
        check_int("eval_seed", self.eval_seed)
        if self.eval_seed == self.seed:
            raise ValueError(f"eval_seed must differ from seed (held-out evaluation), both are {self.seed}")
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval", "threads"):
            check_int(name, getattr(self, name), low=1)
        check_float("summary_interval", self.summary_interval, low=0.0)
        check_float("lr", self.lr, low=1e-12)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("grad_clip", self.grad_clip, low=0.0)  # 0 = no clipping
        for name in ("resume", "progress_bar", "csv"):
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
        valid = {f.name for f in dataclasses.fields(cls)}
        renamed = {k: RENAMED[k] for k in cfg if k not in valid and k in RENAMED}
        if renamed:
            raise ValueError(f"training options renamed: {', '.join(f'{k} is now {v}' for k, v in renamed.items())}")
        return from_mapping(cls, cfg, "")


#: options of earlier versions (the names the RL trainer uses now); refused with their new name
RENAMED = {"eval_every": "eval_interval", "checkpoint_every": "checkpoint_interval", "out_dir": "run_dir"}


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
    """Supervised training of one config (see :func:`setup`) into ``run_dir``: ``checkpoints/last.pt``,
    ``metrics.json``, TensorBoard events (unless another ``writer`` is given), ``progress.csv`` and a log line
    per evaluation, through :class:`rlmem.run.Run` (the RL trainer's lifecycle).

    With ``resume`` (the default) a run continues from its checkpoint, and a finished run is reported, not
    retrained; without it, a ``run_dir`` that already holds a run is refused, and so is a checkpoint of another
    model or task (the error names the keys that differ). Ctrl-C / SIGTERM save a checkpoint after the
    current step and raise :class:`~rlmem.interrupts.TrainingInterrupted`. ``callbacks``:
    :class:`rlmem.callbacks.Callback` hooks (``on_step``, ``on_eval``, ``on_checkpoint``; False ends the
    run); the config's ``stop_at`` adds :class:`rlmem.callbacks.StopAt`. ``verbose``: 0 silent, 1 progress
    and summary (on stderr when nothing configured logging). Config errors (a refused run dir included) raise
    :class:`ConfigError` from the constructor, before anything is written.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: str | Path, writer=None, progress: bool = True, *,
                 verbose: int = 1, callbacks: list[Callback] | None = None):
        self.cfg = dict(cfg)
        self.tc, self.task, self.model = setup(self.cfg)
        self.run_dir, self.writer, self.progress = Path(run_dir), writer, progress
        torch.set_num_threads(self.tc.threads)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        self.rng = np.random.default_rng(self.tc.seed)
        self.identity = {"model": dict(self.cfg.get("model", {})), "task": dict(self.cfg.get("task", {}))}
        self.step, self.train_seconds, self.wall_before = 0, 0.0, 0.0
        self.stopped_by: str | None = None
        self._t0: float | None = None
        try:
            self.run = Run(self.run_dir, identity=self.identity, resume=self.tc.resume, unit="steps",
                           verbose=verbose, progress_bar=self.tc.progress_bar and progress,
                           summary_interval=self.tc.summary_interval,
                           callbacks=build_callbacks(callbacks, self.tc.stop_at), csv=self.tc.csv,
                           legacy=lambda ckpt: (ckpt["identity"], ckpt["step"]))
            ckpt = self.run.restore()
        except (RunDirError, CheckpointError, ValueError) as err:
            raise ConfigError(str(err)) from None
        self.callbacks, self.ckpt_path = self.run.callbacks, self.run.checkpoint_path
        if ckpt is not None:
            self._load(ckpt)

    def _load(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["data_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = ckpt["step"]
        self.train_seconds, self.wall_before = ckpt.get("train_seconds", 0.0), ckpt.get("wall_seconds", 0.0)
        self.stopped_by = ckpt.get("stopped_by")

    def wall_seconds(self) -> float:
        return self.wall_before + (0.0 if self._t0 is None else time.perf_counter() - self._t0)

    def _checkpoint(self) -> bool:
        """Returns False if an ``on_checkpoint`` hook ends the run."""
        check_finite(self.model.state_dict(), f"the model parameters at step {self.step}", self._kept_checkpoint())
        return self.run.save(self, self.step, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            # the numpy generator's state: a dict of str and int, which weights-only checkpoints hold
            "data_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "train_seconds": self.train_seconds, "stopped_by": self.stopped_by,
        }, self.wall_seconds())

    def _kept_checkpoint(self) -> str:
        return self.run.kept_checkpoint()

    @property
    def finished(self) -> bool:
        return self.step >= self.tc.steps or self.stopped_by is not None

    def train(self) -> dict[str, Any]:
        """Train to ``steps`` (or until a callback / ``stop_at`` ends the run); returns the metrics (also in
        ``run_dir/metrics.json``)."""
        with self.run.console():
            return self._run()

    def _run(self) -> dict[str, Any]:
        metrics_path = self.run.metrics_path
        if self.finished and metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            why = f" (ended by {self.stopped_by})" if self.stopped_by else ""
            log.info("%s already finished at step %d%s, results kept: eval_accuracy=%.4f", self.run_dir,
                     metrics["steps"], why, metrics["eval_accuracy"])
            return metrics
        desc = f"train_lm {self.task.name}/{self.cfg['model'].get('memory')}"
        with self.run.session(self.step, self.tc.steps, desc, writer=self.writer):
            self.callbacks.on_train_start(self)
            metrics = self._train()
            self.callbacks.on_train_end(self)
        self.run.write_metrics(metrics)
        why = f" (ended by {self.stopped_by})" if self.stopped_by else ""
        log.info("done%s: step=%d eval_accuracy=%.4f eval_loss=%.4f tokens/s=%.0f", why, self.step,
                 metrics["eval_accuracy"], metrics["eval_loss"], metrics["tokens_per_s"])
        return metrics

    def _evaluate(self, eval_set, losses: list[float]) -> tuple[dict[str, float], bool]:
        ev = evaluate(self.model, eval_set)
        run = self.run
        run.scalars(self.step, {"lm/eval_accuracy": ev["accuracy"], "lm/eval_sequence_accuracy":
                                ev["sequence_accuracy"], "lm/eval_loss": ev["loss"]})
        run.advance(0, loss=f"{losses[-1]:.3f}" if losses else "-", eval_acc=f"{ev['accuracy']:.3f}")
        run.log_summary(self.step, f"step={self.step}/{self.tc.steps} train_loss="
                        f"{float(np.mean(losses[-50:])) if losses else float('nan'):.4f} "
                        f"eval_accuracy={ev['accuracy']:.4f} eval_loss={ev['loss']:.4f}")
        metrics = {"eval_accuracy": ev["accuracy"], "eval_sequence_accuracy": ev["sequence_accuracy"],
                   "eval_loss": ev["loss"], "steps": self.step}
        go_on = self.callbacks.on_eval(self, metrics)
        if not go_on:
            self.stopped_by = self.callbacks.stopped_by
        return ev, go_on

    def _train(self) -> dict[str, Any]:
        tc, task, model, optimizer, run = self.tc, self.task, self.model, self.optimizer, self.run
        eval_rng = np.random.default_rng(tc.eval_seed)
        eval_set = [task.batch(tc.batch_size, eval_rng).to(tc.device) for _ in range(tc.eval_batches)]
        self._t0 = time.perf_counter()
        losses: list[float] = []
        diagnostics: dict[str, float] = {}  # the memory's (MemorySystem.diagnostics) at the last training step
        ev = evaluate(model, eval_set) if self.finished else None
        log.info("training %s on %s from step %d to %d; outputs in %s", self.cfg["model"].get("memory"),
                 task.name, self.step, tc.steps, self.run_dir)
        model.train()
        while not self.finished:
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
            scalars = {"lm/train_loss": losses[-1], "lm/learning_rate": optimizer.param_groups[0]["lr"]}
            if aux is not None:
                scalars["lm/aux_loss"] = float(aux.detach())
            scalars.update({f"memory/{name}": value for name, value in diagnostics.items()})  # the memory's own
            run.scalars(self.step, scalars)
            run.advance(1)
            go_on = self.callbacks.on_step(self)
            if not go_on:
                self.stopped_by = self.callbacks.stopped_by
            if self.step % tc.eval_interval == 0 or self.step == tc.steps or not go_on:
                ev, evaluated_go_on = self._evaluate(eval_set, losses)
                go_on = go_on and evaluated_go_on
            elif run.summary_due():
                run.log_summary(self.step, f"step={self.step}/{tc.steps} train_loss={np.mean(losses[-50:]):.4f}")
            if self.step % tc.checkpoint_interval == 0 or self.finished or run.stop_requested:
                if not self._checkpoint():  # an on_checkpoint hook ended the run
                    self.stopped_by = self.callbacks.stopped_by or "a callback"
                    self._checkpoint()
            if self.stopped_by is not None:
                if ev is None:
                    ev, _ = self._evaluate(eval_set, losses)
                log.info("stopping: %s ended the run at step %d", self.stopped_by, self.step)
            if run.stop_requested and not self.finished:
                raise TrainingInterrupted(run.stop_requested, f"step {self.step}", self.ckpt_path)
        trained_tokens = self.step * tc.batch_size * task.seq_len
        metrics = {
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
            "wall_seconds": self.wall_seconds(),
            "config": self.cfg,
        }
        if self.stopped_by is not None:
            metrics["stopped_by"] = self.stopped_by
        return metrics


def run(cfg: Mapping[str, Any], run_dir: str | Path, writer=None, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Train on ``cfg`` (see :func:`setup` and :class:`LMTrainer`) into ``run_dir``; returns the metrics."""
    return LMTrainer(cfg, run_dir, writer, progress, **kwargs).train()
