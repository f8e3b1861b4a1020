"""Benchmarks: suites of ordinary training runs with results tables and plots, and PPO-loop measurements.

``python scripts/benchmark.py suite=smoke``: a suite (``rlmem/conf/suite/<name>.yaml``: agents x envs x
knob values x seeds), each run a normal train_rl / train_lm run in ``<suite dir>/runs/``, ``jobs`` at a time;
writes ``results.csv``, ``results.md`` and PNGs (learning curves, memory-horizon curves) into the suite dir
(default ``outputs/benchmark/<suite>``). Rerunning the command skips finished runs and resumes the rest.
``publish=true`` also writes ``docs/results.md`` and its PNGs from the run.

``python scripts/benchmark.py pareto``: the suite ``pareto`` (trigger policies x memories with a gated path:
eval return vs memory FLOPs per episode, table and PNG); ``publish=true`` also updates docs/triggers.md.

``python scripts/benchmark.py throughput``: frames/s and peak memory of rlmem's recurrent PPO
(collect + update, ``agent=gru env=delayed_cue``) against sb3-contrib ``RecurrentPPO``
(``MlpLstmPolicy``) on the same env with the same number of envs, hidden size, rollout length, epochs
and minibatch count, and ``agent=infinity``; rlmem with one torch thread, with ``threads=auto`` and with
``collector=process`` on every core. Each measurement runs in a fresh subprocess (clean peak-RSS, no shared
warm-up); ``--repeats N`` runs every row N times, interleaved, and reports medians (on a shared machine
one run's frames/s can move by a third).

``python scripts/benchmark.py learning --agents gru mamba --delays 50 200 --frames 1000000``: eval
success on DelayedCue per agent and delay, and the frames at which it first reached 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from rlmem.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


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
    if a["memory"] == "gru":  # sized like sb3-contrib's LSTM
        agent_cfg = {"memory": "gru", "encoder_dim": a["hidden"], "hidden_size": a["hidden"]}
    else:  # the agent as train_rl builds it by default
        import yaml

        agent_cfg = yaml.safe_load((CONF_DIR / "agent" / f"{a['memory']}.yaml").read_text())
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

    def record(writer):
        evaluate(writer)
        history.append((trainer.frames, trainer.metrics["eval_success"]))

    trainer._evaluate = record
    start = time.perf_counter()
    metrics = trainer.train()
    reached = next((f for f, s in history if s >= 0.9), None)
    return {"eval_success": metrics["eval_success"], "frames_to_0.9": reached, "fps": metrics["fps"],
            "wall_seconds": time.perf_counter() - start, "history": history}


def long_delay_overrides(a: dict) -> list[str]:
    """The rollout overrides of a DelayedCue episode of ``delay + 2`` steps (see long_episode_overrides)."""
    from rlmem.suite import long_episode_overrides

    return long_episode_overrides(a["agent"], a["delay"] + 2, default_rollout=0)


WORKERS = {"rlmem": worker_rlmem, "sb3": worker_sb3, "learning": worker_learning}


def run_worker(kind: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "_worker", kind, json.dumps(args)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput_rows(ns: argparse.Namespace, cores: int, auto_threads: int) -> list[tuple[str, str, dict]]:
    """``(name, worker kind, worker args)`` of every measurement: rlmem gru and infinity with one thread, with
    train_rl's default ``threads=auto`` and with ``collector=process`` on every core, and sb3-contrib."""
    base = {"num_envs": ns.num_envs, "rollout_len": ns.rollout_len, "epochs": ns.epochs,
            "minibatches": ns.minibatches, "hidden": ns.hidden, "delay": ns.delay, "frames": ns.frames,
            "threads": ns.threads}
    rows = []
    for memory, label in (("gru", "gru"), ("infinity", "infinity")):
        rows.append((f"rlmem RecurrentPPO ({label}, threads={ns.threads})", "rlmem", {**base, "memory": memory}))
        if auto_threads != ns.threads:
            rows.append((f"rlmem RecurrentPPO ({label}, threads=auto: {auto_threads})", "rlmem",
                         {**base, "memory": memory, "threads": auto_threads}))
        if cores > 1 and ns.num_envs % cores == 0:
            rows.append((f"rlmem RecurrentPPO ({label}, collector=process, {cores} workers)", "rlmem",
                         {**base, "memory": memory, "threads": auto_threads,
                          "collector": {"type": "process", "num_workers": cores}}))
        if memory == "gru":
            rows.append(("sb3-contrib RecurrentPPO (MlpLstmPolicy)", "sb3", {**base, "shared_lstm": False}))
            rows.append(("sb3-contrib RecurrentPPO (shared LSTM)", "sb3", {**base, "shared_lstm": True}))
    return rows


def throughput(ns: argparse.Namespace) -> None:
    import statistics
    import tempfile

    from rlmem.devices import resolve_threads, usable_cores

    cores, auto_threads = usable_cores(), resolve_threads("auto")
    rows = throughput_rows(ns, cores, auto_threads)
    print(f"PPO throughput on rlmem/DelayedCue-v0 (delay {ns.delay}, 4 cues): {ns.num_envs} envs, rollout "
          f"{ns.rollout_len}, {ns.epochs} epochs x {ns.minibatches} minibatches, hidden {ns.hidden}, "
          f"{ns.frames} frames, {cores} usable core(s); gru sized as sb3's LSTM, infinity with its agent config; "
          f"every row {ns.repeats} time(s), the rows interleaved")
    fps: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(ns.repeats):
            for i, (name, kind, args) in enumerate(rows):
                result = run_worker(kind, {**args, "tmp": f"{tmp}/{repeat}_{i}"})
                fps[name].append(result["fps"])
                rss[name] = max(rss.get(name, 0.0), result["peak_rss_mb"])
    reference = rows[0][0]

    def ratio(name: str, to: str) -> float:  # the median of the per-repeat ratios: each pair ran close in time
        return statistics.median(a / b for a, b in zip(fps[name], fps[to]))

    # peak RSS of the trainer's process (collector workers not included)
    print(f"{'implementation':64s} {'frames/s (median)':>17s} {'peak RSS MB':>12s} {'this / first row':>18s}")
    for name, _, _ in rows:
        runs = " / ".join(f"{v:.0f}" for v in fps[name]) if ns.repeats > 1 else ""
        print(f"{name:64s} {statistics.median(fps[name]):17.0f} {rss[name]:12.0f} {ratio(name, reference):17.2f}x"
              f"  {runs}")
    print("infinity / gru at the same settings (median over repeats):")
    for name, _, _ in rows:
        if "infinity" in name:
            twin = name.replace("infinity", "gru")
            print(f"  {name[len('rlmem RecurrentPPO (infinity, '):-1]:36s} {ratio(name, twin):.2f}  "
                  f"({' / '.join(f'{a / b:.2f}' for a, b in zip(fps[name], fps[twin]))})")


def learning(ns: argparse.Namespace) -> None:
    import tempfile

    print(f"DelayedCue (4 cues) eval success within {ns.frames} frames, seed {ns.seed}; per delay: "
          + "; ".join(f"{d}: {' '.join(long_delay_overrides({'delay': d, 'agent': 'transformer'}))}"
                      for d in ns.delays))
    print(f"{'agent':12s} {'delay':>6s} {'success':>8s} {'frames to 0.9':>14s} {'frames/s':>9s} {'minutes':>8s}")
    for agent in ns.agents:
        for delay in ns.delays:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_worker("learning", {"agent": agent, "delay": delay, "frames": ns.frames, "seed": ns.seed,
                                            "threads": ns.threads, "eval_interval": ns.eval_interval, "tmp": tmp})
            reached = "-" if r["frames_to_0.9"] is None else str(r["frames_to_0.9"])
            print(f"{agent:12s} {delay:6d} {r['eval_success']:8.2f} {reached:>14s} {r['fps']:9.0f} "
                  f"{r['wall_seconds'] / 60:8.1f}", flush=True)


def suite_main() -> None:
    """``benchmark.py suite=<name> [jobs=N] [publish=true] [hydra overrides]``: see the module docstring."""
    import hydra

    hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="benchmark")(run_suite)()


def run_suite(cfg) -> None:
    import logging
    import os
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlmem.suite import execute, plan
    from rlmem.suite_report import write_report

    log = logging.getLogger("benchmark")
    suite_dir = Path(HydraConfig.get().runtime.output_dir)
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    jobs = int(cfg.jobs or os.cpu_count() or 1)
    runs = plan(suite["groups"])
    start = time.perf_counter()
    failed = execute(runs, suite_dir, jobs, launcher=cfg.launcher,
                     ray_init_config=OmegaConf.to_container(cfg.ray, resolve=True)) if cfg.run else []
    # the command as typed, without where it wrote and what it did with the results
    shown = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "publish=", "run="))]
    rows = write_report(suite["name"], runs, failed, suite_dir, time.perf_counter() - start if cfg.run else None,
                        jobs, float(cfg.success_threshold), " ".join(["python scripts/benchmark.py", *shown]))
    log.info("results: %s, %s", suite_dir / "results.csv", suite_dir / "results.md")
    if cfg.publish:
        publish(suite["name"], suite_dir)
        log.info("published docs/results/%s.md, its PNGs and docs/results.md", suite["name"])
    if cfg.run and (failed or any(r["status"] != "finished" for r in rows)):
        raise SystemExit(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.group}/{r.name}" for r in failed))


def publish(suite: str, suite_dir: Path) -> None:
    """Copy a suite's results.md and PNGs to docs/results/ (PNGs prefixed with the suite's name) and
    rebuild docs/results.md from every suite published there."""
    import shutil

    docs = ROOT / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    text = (suite_dir / "results.md").read_text()
    for png in sorted(suite_dir.glob("*.png")):
        shutil.copy(png, docs / f"{suite}_{png.name}")
        text = text.replace(f"]({png.name})", f"]({suite}_{png.name})")
    (docs / f"{suite}.md").write_text(text)
    parts = []
    for md in sorted(docs.glob("*.md")):
        part = md.read_text().replace("](", "](results/").replace("](results/http", "](http")
        parts.append(part.replace("# Benchmark suite", "## Benchmark suite", 1).replace("\n## ", "\n### "))
    header = ("# Benchmark results\n\nGenerated from real runs by `python scripts/benchmark.py suite=<name> "
              "publish=true` (one section per suite; each says its command, machine and time). Regenerate a "
              "section from an existing suite dir without training: add `run=false`.\n\n")
    (ROOT / "docs" / "results.md").write_text(header + "\n".join(parts))
    if suite == "pareto":
        publish_triggers(suite_dir)


def publish_triggers(suite_dir: Path) -> None:
    """Put the pareto suite's return-vs-compute table and PNGs between the markers of docs/triggers.md."""
    doc = ROOT / "docs" / "triggers.md"
    start, end = "<!-- pareto results: generated by scripts/benchmark.py pareto publish=true -->", "<!-- end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the markers {start!r} ... {end!r} to write the results between")
    results = (suite_dir / "results.md").read_text()
    header = "\n".join(line for line in results.splitlines()[:6] if "Machine:" in line)
    table = results.split("## Return vs compute", 1)[1].strip() if "## Return vs compute" in results else "(no runs)"
    images = "\n".join(f"![{p.stem}](results/pareto_{p.name})" for p in sorted(suite_dir.glob("compute_*.png")))
    body = f"{start}\n{header}\n\n{table}\n\n{images}\n{end}"
    before, rest = text.split(start, 1)
    (doc).write_text(before + body + rest.split(end, 1)[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "pareto":  # the return-vs-compute suite of the trigger policies
        sys.argv[1:2] = ["suite=pareto"]
    if len(sys.argv) == 1 or sys.argv[1] not in ("_worker", "throughput", "learning", "-h", "--help"):
        return suite_main()
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="frames/s of the PPO loop vs sb3-contrib RecurrentPPO")
    t.add_argument("--num-envs", type=int, default=64)
    t.add_argument("--rollout-len", type=int, default=64)
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--minibatches", type=int, default=4)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--delay", type=int, default=10)
    t.add_argument("--frames", type=int, default=131072)
    t.add_argument("--threads", type=int, default=1, help="torch threads of the single-thread rows")
    t.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved; medians")
    t.set_defaults(func=throughput)
    s = sub.add_parser("learning", help="eval success on DelayedCue per agent and delay")
    s.add_argument("--agents", nargs="+", default=["gru"])
    s.add_argument("--delays", nargs="+", type=int, default=[50, 200])
    s.add_argument("--frames", type=int, default=1_000_000)
    s.add_argument("--eval-interval", type=int, default=50_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=learning)
    ns = parser.parse_args()
    if ns.command == "throughput" and (ns.repeats < 1 or ns.threads < 1):
        parser.error(f"--repeats and --threads must be >= 1, got {ns.repeats} and {ns.threads}")
    ns.func(ns)


if __name__ == "__main__":
    main()
