"""Train an agent with recurrent PPO: ``rlmem-train agent=gru env=delayed_cue``.

Config groups (rlmem/conf/): ``agent`` (memory system + sizes), ``env`` (id + knobs), ``trigger``
(when a memory's gated path runs: always, never, learned, meco, ars), ``ppo``, ``logger``, ``collector``
(where the envs step: sync, process, ray); top-level ``seed``, ``total_frames``, ``device``, ``threads``,
``compile``, ``resume``, ``imports``. Outputs (TensorBoard events, ``metrics.json``, ``checkpoints/last.pt``,
``train_rl.log``) go to the Hydra run dir (``outputs/train_rl/<agent>-<env>/<time>``, or ``hydra.run.dir=...``).
Also ``python -m rlmem.commands.train_rl`` and, in a checkout, ``python scripts/train_rl.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlmem.commands._hydra import qualified, run_hydra


def build_trainer(cfg: DictConfig, run_dir: str | Path):
    """The trainer of a composed ``train_rl`` config; everything is validated here, before any training."""
    import torch

    from rlmem.agents import build_agent
    from rlmem.callbacks import AutoThreads
    from rlmem.devices import resolve_threads
    from rlmem.ppo import PPOConfig, RecurrentPPO
    from rlmem.user_code import import_modules

    config = OmegaConf.to_container(cfg, resolve=True)
    import_modules(config["imports"])  # the user's own memories and envs register themselves
    torch.set_num_threads(resolve_threads(config["threads"]))
    if config["compile"] is True and config["collector"].get("type") != "sync":
        raise ValueError(f"compile=true needs collector=sync (a compiled memory is not sent to workers), got "
                         f"collector={config['collector'].get('type')}")
    logger = config["logger"]
    try:
        agent = build_agent(config["agent"], config["env"], config["trigger"], compile=config["compile"],
                            seed=config["seed"])
    except ValueError as err:  # "delay must be ..." -> "env.delay must be ..."
        env_keys = [k for k in config["env"] if k != "id"]
        agent_keys = [k for k in config["agent"] if k != "memory"]
        better = qualified(err, "env", env_keys)
        raise (better if better is not err else qualified(err, "agent", agent_keys)) from err
    return RecurrentPPO(
        agent,
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
        callbacks=[AutoThreads()] if config["threads"] == "auto" else None,
    )


def _job(cfg: DictConfig) -> None:
    from rlmem.cli import run_job

    run_job("train_rl", cfg, build_trainer)


def main(argv: Sequence[str] | None = None) -> None:
    """``rlmem-train [overrides]`` (``argv``: the overrides, default ``sys.argv[1:]``)."""
    run_hydra("train_rl", "train_rl", _job, __doc__, argv)


if __name__ == "__main__":
    main()
