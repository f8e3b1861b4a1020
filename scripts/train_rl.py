"""Train an agent with recurrent PPO: ``python scripts/train_rl.py agent=gru env=delayed_cue``.

Config groups (rlmem/conf/): ``agent`` (memory system + sizes), ``env`` (id + knobs), ``trigger``
(when a memory's gated path runs: always, never, learned, meco, ars), ``ppo``, ``logger``, ``collector``
(where the envs step: sync, process, ray); top-level
``seed``, ``total_frames``, ``device``, ``threads``, ``compile``, ``resume``, ``imports``. Outputs
(TensorBoard events, ``metrics.json``, ``checkpoints/last.pt``, ``train_rl.log``) go to the Hydra run dir
(``hydra.run.dir=...``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rlmem.agents import build_agent

from rlmem.cli import run_job
from rlmem.devices import resolve_threads
from rlmem.ppo import PPOConfig, RecurrentPPO
from rlmem.user_code import import_modules


def build_trainer(cfg: DictConfig, run_dir: str | Path) -> RecurrentPPO:
    """Everything is validated here, before any training starts."""
    config = OmegaConf.to_container(cfg, resolve=True)
    import_modules(config["imports"])  # the user's own memories and envs register themselves
    torch.set_num_threads(resolve_threads(config["threads"]))
    if config["compile"] is True and config["collector"].get("type") != "sync":
        raise ValueError(f"compile=true needs collector=sync (a compiled memory is not sent to workers), got "
                         f"collector={config['collector'].get('type')}")
    logger = config["logger"]
    return RecurrentPPO(
        build_agent(config["agent"], config["env"], config["trigger"], compile=config["compile"], seed=config["seed"]),
        config["env"],
        PPOConfig.from_mapping(config["ppo"]),
        run_dir,
        seed=config["seed"],
        total_frames=config["total_frames"],
        resume=config["resume"],
        log_interval=logger["log_interval"],
        checkpoint_interval=logger["checkpoint_interval"],
        progress_bar=logger["progress_bar"],
        summary_interval=logger["summary_interval"],
        config=config,
        collector=config["collector"],
        device=config["device"],
    )


@hydra.main(config_path="pkg://rlmem.conf", config_name="train_rl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job("train_rl", cfg, build_trainer)


if __name__ == "__main__":
    main()
