"""Supervised training of any registered memory system on a synthetic LM task:
``rlmem-train-lm model=gru task=copy_memory steps=500``.

Embedding -> memory system (sequence mode) -> LM head, cross-entropy on answer positions only, evaluated
on held-out batches of another seed. Writes TensorBoard events (lm/train_loss, lm/eval_accuracy),
metrics.json, checkpoints/last.pt and train_lm.log into the Hydra run dir
(``outputs/train_lm/<model>-<task>/<time>``, or ``hydra.run.dir=...``), and prints the main metrics as JSON on
stdout. The pieces live in rlmem.lm_training. Also ``python -m rlmem.commands.train_lm`` and, in a
checkout, ``python scripts/train_lm.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlmem.commands._hydra import run_hydra


def build_trainer(cfg: DictConfig, run_dir: Path):
    import rlmem  # noqa: F401  (registers the memory systems)
    from rlmem.lm_training import LMTrainer

    return LMTrainer(OmegaConf.to_container(cfg, resolve=True), run_dir)


def _job(cfg: DictConfig) -> None:
    from rlmem.cli import run_job

    metrics = run_job("train_lm", cfg, build_trainer)
    if metrics is not None:
        print(json.dumps({k: metrics[k] for k in ("task", "model", "steps", "eval_accuracy", "chance_accuracy",
                                                  "tokens_per_s", "wall_seconds")}, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    """``rlmem-train-lm [overrides]``."""
    run_hydra("train_lm", "train_lm", _job, __doc__, argv)


if __name__ == "__main__":
    main()
