"""Supervised training of any registered memory system on a synthetic LM task.

    python scripts/train_lm.py model=gru task=copy_memory steps=500 hydra.run.dir=outputs/gru_copy

Embedding -> memory system (sequence mode) -> LM head, cross-entropy on answer positions only, evaluated
on held-out batches of another seed. Writes TensorBoard events (lm/train_loss, lm/eval_accuracy),
metrics.json, checkpoints/last.pt and train_lm.log into the Hydra run dir, and prints the main metrics as
JSON on stdout. The pieces live in rlmem.lm_tasks.training.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import rlmem  # noqa: F401  (registers the memory systems)
from rlmem.cli import run_job
from rlmem.lm_tasks.training import LMTrainer


def build_trainer(cfg: DictConfig, run_dir: Path) -> LMTrainer:
    return LMTrainer(OmegaConf.to_container(cfg, resolve=True), run_dir)


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="train_lm")
def main(cfg: DictConfig) -> None:
    metrics = run_job("train_lm", cfg, build_trainer)
    if metrics is not None:
        print(json.dumps({k: metrics[k] for k in ("task", "model", "steps", "eval_accuracy", "chance_accuracy",
                                                  "tokens_per_s", "wall_seconds")}, indent=1))


if __name__ == "__main__":
    main()
