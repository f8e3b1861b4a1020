"""Pretrain a small causal LM (LLaMA- or GPT-2-style, from ``transformers``) on an LM task and save it.

    python scripts/pretrain_lm.py task=babi hydra.run.dir=outputs/babi_lm     # -> outputs/babi_lm/model

Next-token prediction on the task's samples, the answers included (rlmem.causal_lm.pretrain_causal_lm).
The model is written with ``save_pretrained`` into ``<run dir>/model`` (a temporary directory renamed into
place, so a killed run never leaves half a model), with ``metrics.json`` (held-out loss and answer accuracy
before and after training) beside it. Any system that takes a causal LM source accepts that directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlmem.causal_lm import pretrain_causal_lm, tiny_causal_lm
from rlmem.lm_tasks import build_task
from rlmem.run_io import write_metrics

log = logging.getLogger("pretrain_lm")


def pretrain(cfg: dict, run_dir: Path) -> dict:
    """Build, pretrain and save the model described by ``cfg`` (the keys of rlmem/conf/pretrain_lm.yaml)."""
    task_cfg = dict(cfg["task"])
    task = build_task(task_cfg.pop("name"), **task_cfg)
    torch.set_num_threads(int(cfg["threads"]))
    model = tiny_causal_lm(cfg["arch"], vocab_size=int(cfg["vocab_size"] or task.vocab_size),
                           hidden_size=int(cfg["hidden_size"]), n_layers=int(cfg["n_layers"]),
                           n_heads=int(cfg["n_heads"]), max_positions=int(cfg["max_positions"]), seed=int(cfg["seed"]))
    if task.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"task sequences ({task.seq_len} tokens) are longer than max_positions "
                         f"({model.config.max_position_embeddings})")
    metrics = pretrain_causal_lm(model, task, steps=int(cfg["steps"]), batch_size=int(cfg["batch_size"]),
                                 lr=float(cfg["lr"]), warmup_steps=int(cfg["warmup_steps"]), seed=int(cfg["seed"]),
                                 eval_seed=int(cfg["eval_seed"]), progress=bool(cfg["progress_bar"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / "model"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".model."))
    model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    metrics = {"task": task.name, "task_knobs": task.knobs(), "arch": cfg["arch"], "model_dir": str(final),
               "parameters": sum(p.numel() for p in model.parameters()), **metrics}
    write_metrics(run_dir / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="pretrain_lm")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = pretrain(OmegaConf.to_container(cfg, resolve=True), run_dir)
    log.info("saved %s (eval loss %.3f -> %.3f, answer accuracy %.3f -> %.3f, chance %.3f)", metrics["model_dir"],
             metrics["eval_loss_before"], metrics["eval_loss"], metrics["eval_answer_accuracy_before"],
             metrics["eval_answer_accuracy"], metrics["chance_accuracy"])
    print(json.dumps({k: metrics[k] for k in ("model_dir", "eval_loss", "eval_answer_accuracy", "chance_accuracy",
                                              "wall_seconds")}, indent=1))


if __name__ == "__main__":
    main()
