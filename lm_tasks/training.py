"""Supervised training on the LM tasks: model wrapper, answer-only loss, evaluation and the run loop.

``scripts/train_lm.py`` is a thin Hydra front end to :func:`run`; the pieces are importable on their own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rlmem.envs.core import check_float, check_int
from rlmem.lm_tasks.tasks import LMBatch, LMTask, build_task
from rlmem.memory import build_memory
from rlmem.run_io import load_checkpoint, save_checkpoint, write_metrics

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
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 500
    resume: bool = True
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self):
        check_int("seed", self.seed)
        check_int("eval_seed", self.eval_seed)
        if self.eval_seed == self.seed:
            raise ValueError(f"eval_seed must differ from seed (held-out evaluation), both are {self.seed}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            check_int(name, getattr(self, name), low=1)
        check_float("lr", self.lr, low=1e-12)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("grad_clip", self.grad_clip, low=0.0)  # 0 = no clipping
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be true or false, got {self.resume!r}")
        if self.device != "cpu" and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise ValueError(f"device must be 'cpu' or, when CUDA is available, 'cuda[:i]'; got {self.device!r}")

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
    if "name" not in task_cfg:
        raise ValueError(f"task config needs a 'name' key, got keys {sorted(task_cfg)}")
    task = build_task(task_cfg.pop("name"), **task_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(task.vocab_size, model_cfg).to(train_cfg.device)
    return train_cfg, task, model


def run(cfg: Mapping[str, Any], out_dir: str | Path, writer=None, progress: bool = True) -> dict[str, Any]:
    """Train on ``cfg`` (see :func:`setup`), writing to ``out_dir``: ``checkpoints/last.pt`` (resumed from
    if present and ``resume``), ``metrics.json``, and TensorBoard events unless another ``writer`` is given.
    Returns the metrics."""
    tc, task, model = setup(cfg)
    out_dir = Path(out_dir)
    torch.set_num_threads(tc.threads)
    own_writer = writer is None
    if own_writer:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        writer = SummaryWriter(str(out_dir))
    try:
        return _train(tc, task, model, cfg, out_dir, writer, progress)
    finally:
        if own_writer:
            writer.close()


def _train(tc: TrainConfig, task: LMTask, model: LMModel, cfg, out_dir: Path, writer, progress: bool) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    rng = np.random.default_rng(tc.seed)
    eval_rng = np.random.default_rng(tc.eval_seed)
    eval_set = [task.batch(tc.batch_size, eval_rng).to(tc.device) for _ in range(tc.eval_batches)]
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    identity = {"model": dict(cfg.get("model", {})), "task": dict(cfg.get("task", {}))}
    step = 0
    if tc.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["identity"] != identity:
            raise ConfigError(
                f"{ckpt_path} was written for {ckpt['identity']}, not {identity}; "
                "use another hydra.run.dir or resume=false"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["data_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "identity": identity,
        })

    start_step, train_seconds, t_start = step, 0.0, time.perf_counter()
    losses: list[float] = []
    ev = evaluate(model, eval_set) if step >= tc.steps else None
    bar = tqdm(total=tc.steps, initial=step, desc=f"train_lm {task.name}/{cfg['model'].get('memory')}",
               disable=not progress, dynamic_ncols=True)
    model.train()
    while step < tc.steps:
        t0 = time.perf_counter()
        inputs, targets, mask = task.batch(tc.batch_size, rng).to(tc.device)
        loss = answer_loss(model(inputs, mask), targets, mask)
        aux = model.memory.aux_loss()
        if aux is not None:
            loss = loss + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        train_seconds += time.perf_counter() - t0
        step += 1
        losses.append(loss.item())
        writer.add_scalar("lm/train_loss", losses[-1], step)
        if step % tc.eval_every == 0 or step == tc.steps:
            ev = evaluate(model, eval_set)
            writer.add_scalar("lm/eval_accuracy", ev["accuracy"], step)
            writer.add_scalar("lm/eval_sequence_accuracy", ev["sequence_accuracy"], step)
            writer.add_scalar("lm/eval_loss", ev["loss"], step)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", eval_acc=f"{ev['accuracy']:.3f}")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
        bar.update(1)
    bar.close()
    trained_tokens = (step - start_step) * tc.batch_size * task.seq_len
    metrics = {
        "task": task.name,
        "task_knobs": task.knobs(),
        "model": cfg["model"].get("memory"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "eval_accuracy": ev["accuracy"],
        "eval_sequence_accuracy": ev["sequence_accuracy"],
        "eval_loss": ev["loss"],
        "chance_accuracy": task.chance_accuracy(),
        "train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        # training throughput of this process: batch tokens through forward + backward + optimizer step
        "tokens_per_s": trained_tokens / train_seconds if train_seconds > 0 else float("nan"),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_metrics(out_dir / "metrics.json", metrics)
    return metrics
