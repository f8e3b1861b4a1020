"""The reference implementation beside rlmem's PPO: sb3-contrib's ``RecurrentPPO`` on an rlmem env config.

    python -m rlmem.commands.sb3_reference env=cartpole total_frames=300000 hydra.run.dir=outputs/sb3_cartpole

``MlpLstmPolicy`` with sb3-contrib's other defaults (separate actor and critic LSTMs of
``lstm_hidden_size``), ``num_envs`` envs. Every ``eval_interval`` frames and at the end, ``eval_episodes``
greedy episodes (``deterministic=True``, env seeds from ``evaluation_seed(seed)``, as train_rl); the success threshold
is train_rl's. Writes ``metrics.json`` (frames, fps, wall_seconds, eval_return, eval_success, parameters)
and TensorBoard events (``charts/eval_return``, ``charts/eval_success``) into the run dir, so a benchmark
suite reads it like a train_rl run. Needs the ``dev`` extra (``stable-baselines3``, ``sb3-contrib``).
A finished run dir is reported, not retrained; an unfinished one starts over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rlmem  # noqa: F401  (registers the rlmem envs)
from rlmem.commands._hydra import run_hydra
from rlmem.env_factory import effective_env_kwargs, split_env_config, success_threshold
from rlmem.evaluate import evaluation_seed
from rlmem.run_io import write_metrics

log = logging.getLogger("sb3_reference")


def train(cfg: dict, run_dir: Path) -> dict:
    try:
        import gymnasium as gym
        from sb3_contrib import RecurrentPPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.evaluation import evaluate_policy
    except ImportError as err:
        raise SystemExit(f"sb3_reference needs sb3-contrib: pip install -e '.[dev]' ({err})") from None
    from torch.utils.tensorboard import SummaryWriter

    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("frames", 0) >= done.get("total_frames", float("inf")):
            log.info("%s already finished, results kept: eval_return=%.3f", run_dir, done["eval_return"])
            return done
    torch.set_num_threads(int(cfg["threads"]))
    env_cfg = cfg["env"]
    env_id, kwargs = split_env_config(env_cfg)
    threshold = success_threshold(env_cfg)
    seed, n_eval = int(cfg["seed"]), int(cfg["eval_episodes"])
    venv = make_vec_env(lambda: gym.make(env_id, **kwargs), n_envs=int(cfg["num_envs"]), seed=seed)
    eval_env = make_vec_env(lambda: gym.make(env_id, **kwargs), n_envs=min(n_eval, 8), seed=evaluation_seed(seed))
    model = RecurrentPPO("MlpLstmPolicy", venv, seed=seed, device="cpu", verbose=0,
                         policy_kwargs={"lstm_hidden_size": int(cfg["lstm_hidden_size"])})
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir), purge_step=0)
    metrics = {"env_id": env_id, "env_kwargs": effective_env_kwargs(env_cfg), "memory": "sb3-contrib RecurrentPPO",
               "parameters": sum(p.numel() for p in model.policy.parameters()), "seed": seed,
               "total_frames": int(cfg["total_frames"]), "config": cfg}
    start = time.perf_counter()

    def evaluate(frames: int) -> None:
        returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=n_eval, deterministic=True,
                                     return_episode_rewards=True)
        metrics.update(eval_return=float(np.mean(returns)), eval_frames=frames)
        writer.add_scalar("charts/eval_return", metrics["eval_return"], frames)
        if threshold is not None:
            metrics["eval_success"] = float(np.mean(np.asarray(returns) >= threshold))
            writer.add_scalar("charts/eval_success", metrics["eval_success"], frames)
        log.info("frames=%d eval_return=%.3f eval_success=%s", frames, metrics["eval_return"],
                 metrics.get("eval_success", "n/a"))

    class Evaluations(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next_eval = int(cfg["eval_interval"])

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_eval:
                evaluate(self.num_timesteps)
                self.next_eval += int(cfg["eval_interval"])
            return True

    evaluate(0)
    model.learn(int(cfg["total_frames"]), callback=Evaluations())
    if metrics["eval_frames"] != model.num_timesteps:
        evaluate(int(model.num_timesteps))
    wall = time.perf_counter() - start
    metrics.update(frames=int(model.num_timesteps), wall_seconds=wall, fps=model.num_timesteps / wall)
    writer.close()
    write_metrics(metrics_path, metrics)
    return metrics


def _job(cfg: DictConfig) -> None:
    metrics = train(OmegaConf.to_container(cfg, resolve=True), Path(HydraConfig.get().runtime.output_dir))
    print(json.dumps({k: metrics.get(k) for k in ("env_id", "frames", "eval_return", "eval_success", "fps")}))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlmem.commands.sb3_reference [overrides]``."""
    run_hydra("sb3_reference", "sb3_reference", _job, __doc__, argv)


if __name__ == "__main__":
    main()
