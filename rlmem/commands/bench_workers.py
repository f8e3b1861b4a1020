"""The measurements of ``rlmem-benchmark throughput`` / ``learning`` / ``probe``, each run in a fresh interpreter
(clean peak RSS, no shared warm-up): ``python -m rlmem.commands.bench_workers <kind> '<json args>'`` prints
the result as JSON (with ``peak_rss_mb``) on its last stdout line. :func:`run_worker` does that."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_rlmem(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from rlmem.agents import build_agent
    from rlmem.ppo import PPOConfig, RecurrentPPO

    ppo = PPOConfig(num_envs=a["num_envs"], rollout_len=a["rollout_len"], seq_len=a["rollout_len"],
                    epochs=a["epochs"], minibatches=a["minibatches"], eval_interval=10**9)
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": a["delay"], "n_cues": 4}
    from rlmem.conf import available

    if a["memory"] == "gru" and not a.get("defaults"):  # sized like sb3-contrib's LSTM
        agent_cfg = {"memory": "gru", "encoder_dim": a["hidden"], "hidden_size": a["hidden"]}
    elif a["memory"] in available("agent"):  # the agent as train_rl builds it by default
        from rlmem.commands.overrides import group_config

        agent_cfg = group_config("agent", a["memory"])
    else:  # a memory system without an agent config (miras): its class defaults
        agent_cfg = {"memory": a["memory"], "encoder_dim": 64}
    if a.get("memory_class"):  # the same agent config with another class (module:Class) as its memory
        agent_cfg = {**agent_cfg, "memory": a["memory_class"]}
    agent = build_agent(agent_cfg, env_cfg, seed=0)
    trainer = RecurrentPPO(agent, env_cfg, ppo, Path(a["tmp"]), total_frames=a["frames"], progress_bar=False,
                           collector=a.get("collector"))
    trainer.next_eval = 10**12  # throughput only: no evaluation episodes
    start = time.perf_counter()
    metrics = trainer.train()
    return {"fps": metrics["frames"] / (time.perf_counter() - start), "frames": metrics["frames"]}


def worker_sb3(a: dict) -> dict:
    import gymnasium as gym
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    import rlmem  # noqa: F401

    torch.set_num_threads(a["threads"])
    venv = make_vec_env(lambda: gym.make("rlmem/DelayedCue-v0", delay=a["delay"], n_cues=4), n_envs=a["num_envs"],
                        seed=0)
    policy_kwargs = {"lstm_hidden_size": a["hidden"], "net_arch": [a["hidden"]]}
    if a["shared_lstm"]:
        policy_kwargs.update(shared_lstm=True, enable_critic_lstm=False)
    model = RecurrentPPO("MlpLstmPolicy", venv, n_steps=a["rollout_len"], n_epochs=a["epochs"],
                         batch_size=a["num_envs"] * a["rollout_len"] // a["minibatches"],
                         policy_kwargs=policy_kwargs, seed=0, device="cpu", verbose=0)
    start = time.perf_counter()
    model.learn(a["frames"])
    return {"fps": a["frames"] / (time.perf_counter() - start), "frames": a["frames"]}


def worker_learning(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlmem.agents import build_agent
    from rlmem.conf import CONF_DIR
    from rlmem.ppo import PPOConfig, RecurrentPPO

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_rl", overrides=[f"agent={a['agent']}", f"env.delay={a['delay']}",
                                             f"ppo.eval_interval={a['eval_interval']}", *long_delay_overrides(a)])
    c = OmegaConf.to_container(cfg, resolve=True)
    agent = build_agent(c["agent"], c["env"], c["trigger"], seed=a["seed"])
    trainer = RecurrentPPO(agent, c["env"], PPOConfig.from_mapping(c["ppo"]),
                           Path(a["tmp"]) / "learn", seed=a["seed"], total_frames=a["frames"], progress_bar=False)
    history = []
    evaluate = trainer._evaluate

    def record():
        go_on = evaluate()
        history.append((trainer.frames, trainer.metrics["eval_success"]))
        return go_on

    trainer._evaluate = record
    start = time.perf_counter()
    metrics = trainer.train()
    reached = next((f for f, s in history if s >= 0.9), None)
    return {"eval_success": metrics["eval_success"], "frames_to_0.9": reached, "fps": metrics["fps"],
            "wall_seconds": time.perf_counter() - start, "history": history}


def worker_probe(a: dict) -> dict:
    """The supervised DelayedCue probe: the agent's encoder, memory and policy head trained with cross-entropy
    on the cue at the query step of fresh episodes (``batch`` per update, Adam at ``lr``), no RL. Accuracy on
    each update's fresh batch (before its step) is the measure; returns the update at which a 10-update
    moving average first reached 0.9, the last such average, and seconds per update."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a["threads"])
    from rlmem.agents import build_agent
    from rlmem.commands.overrides import group_config

    delay, n_cues, B = a["delay"], a["n_cues"], a["batch"]
    T = delay + 2  # cue, delay blanks, query
    agent_cfg = {**group_config("agent", a["agent"]), **a.get("agent_overrides", {})}
    if a["agent"] == "transformer":  # its window must reach the cue, as the long-episode PPO settings make it
        agent_cfg["window"] = max(int(agent_cfg.get("window", 0)), T)
    env_cfg = {"id": "rlmem/DelayedCue-v0", "delay": delay, "n_cues": n_cues}
    agent = build_agent(agent_cfg, env_cfg, seed=a["seed"])
    memory = agent.memory
    params = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=a["lr"])
    g = torch.Generator().manual_seed(a["seed"])
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    accuracy, history, reached = [], [], None
    start = time.perf_counter()
    for update in range(a["updates"]):
        cue = torch.randint(n_cues, (B,), generator=g)
        obs = torch.zeros(B, T, n_cues + 1)
        obs[torch.arange(B), 0, cue] = 1.0
        obs[:, -1, -1] = 1.0  # the query flag
        y, _ = memory(agent.encoder(obs), memory.initial_state(B), is_init)
        logits = agent.policy_head(y[:, -1])
        loss = F.cross_entropy(logits, cue)
        aux = agent.aux_loss()
        optimizer.zero_grad()
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        accuracy.append(float((logits.argmax(-1) == cue).float().mean()))
        history.append(sum(accuracy[-10:]) / len(accuracy[-10:]))
        if reached is None and len(accuracy) >= 10 and history[-1] >= 0.9:
            reached = update + 1
            if a.get("stop_at_solved", True):
                break
    seconds = time.perf_counter() - start
    return {"updates_to_0.9": reached, "accuracy": history[-1], "updates": len(accuracy),
            "seconds_per_update": seconds / len(accuracy)}


def long_delay_overrides(a: dict) -> list[str]:
    """The rollout overrides of a DelayedCue episode of ``delay + 2`` steps (see long_episode_overrides)."""
    from rlmem.suite import long_episode_overrides

    return long_episode_overrides(a["agent"], a["delay"] + 2, default_rollout=0)


WORKERS = {"rlmem": worker_rlmem, "sb3": worker_sb3, "learning": worker_learning, "probe": worker_probe}


def run_worker(kind: str, args: dict) -> dict:
    """Run worker ``kind`` with ``args`` in a fresh interpreter; its result."""
    out = subprocess.run([sys.executable, "-m", "rlmem.commands.bench_workers", kind, json.dumps(args)],
                         check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))


if __name__ == "__main__":
    main()
