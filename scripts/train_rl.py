"""Train an agent with recurrent PPO: ``python scripts/train_rl.py agent=gru env=delayed_cue``.

Config groups (scripts/conf/): ``agent`` (memory system + sizes), ``env`` (id + knobs), ``ppo``,
``logger``; top-level ``seed``, ``total_frames``, ``device``, ``threads``, ``resume``. Outputs (TensorBoard events,
``metrics.json``, ``checkpoints/last.pt``) go to the Hydra run dir (``hydra.run.dir=...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlmem.ppo import PPOConfig, RecurrentPPO


def build_trainer(cfg: DictConfig, run_dir: str | Path) -> RecurrentPPO:
    """Everything is validated here, before any training starts."""
    if cfg.device != "cpu":
        raise ValueError(f"device={cfg.device!r}: the trainer runs on the CPU only for now; valid: 'cpu'")
    resume = cfg.resume
    if not isinstance(resume, (bool, str)):
        raise ValueError(f"resume must be true, false or a checkpoint path, got {resume!r}")
    container = OmegaConf.to_container(cfg, resolve=True)
    return RecurrentPPO(
        container["agent"],
        container["env"],
        PPOConfig.from_mapping(container["ppo"]),
        run_dir,
        seed=int(cfg.seed),
        total_frames=int(cfg.total_frames),
        resume=resume,
        log_interval=int(cfg.logger.log_interval),
        checkpoint_interval=int(cfg.logger.checkpoint_interval),
        progress_bar=bool(cfg.logger.progress_bar),
        hparams=_flatten(container),
    )


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@hydra.main(config_path="conf", config_name="train_rl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    torch.set_num_threads(int(cfg.threads))
    try:
        trainer = build_trainer(cfg, run_dir)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        print(f"train_rl.py: invalid configuration: {err}", file=sys.stderr)
        sys.exit(2)
    metrics = trainer.train()
    summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("frames", "fps", "eval_return", "eval_success")
                        if isinstance(metrics.get(k), (int, float)))
    print(f"done: {summary}\noutputs: {run_dir}")


if __name__ == "__main__":
    main()
