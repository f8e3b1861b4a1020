"""Supervised training of any registered memory system on a synthetic LM task.

    python scripts/train_lm.py model=gru task=copy_memory steps=500 hydra.run.dir=runs/gru_copy

Embedding -> memory system (sequence mode) -> LM head, cross-entropy on answer positions only, evaluated
on held-out batches of another seed. Writes TensorBoard events (lm/train_loss, lm/eval_accuracy),
metrics.json and checkpoints/last.pt into the Hydra run dir. The pieces live in rlmem.lm_tasks.training.
"""

from __future__ import annotations

import json
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rlmem  # noqa: F401  (registers the memory systems)
from rlmem.lm_tasks.training import ConfigError, run


@hydra.main(version_base="1.3", config_path="conf", config_name="train_lm")
def main(cfg: DictConfig) -> None:
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = run(OmegaConf.to_container(cfg, resolve=True), out_dir)
    except ConfigError as e:
        sys.exit(f"train_lm: invalid config: {e}")
    print(json.dumps({k: metrics[k] for k in ("task", "model", "steps", "eval_accuracy", "chance_accuracy",
                                              "tokens_per_s", "wall_seconds")}, indent=1))
    print(f"outputs in {out_dir}")


if __name__ == "__main__":
    main()
