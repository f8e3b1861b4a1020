"""Benchmarks: suites of ordinary training runs with results tables and plots, and PPO-loop measurements.

``rlmem-benchmark`` (or ``python -m rlmem.commands.benchmark``, or ``python scripts/benchmark.py`` in a
checkout) has four forms: ``suite=<name> [key=value ...]`` (Hydra overrides; the default form),
``pareto [key=value ...]`` (= ``suite=pareto``), ``throughput [--options]`` and ``learning [--options]``
(argparse; ``rlmem-benchmark throughput --help``). The measurements run in fresh interpreters of
:mod:`rlmem.commands.bench_workers`.

``rlmem-benchmark suite=smoke``: a suite (``rlmem/conf/suite/<name>.yaml``: agents x envs x
knob values x seeds), each run a normal train_rl / train_lm run in ``<suite dir>/runs/``, ``jobs`` at a time;
writes ``results.csv``, ``results.md`` and PNGs (learning curves, memory-horizon curves) into the suite dir
(default ``outputs/benchmark/<suite>``). Rerunning the command skips finished runs and resumes the rest.
``publish=true`` also writes ``docs/results.md`` and its PNGs from the run.

``rlmem-benchmark pareto``: the suite ``pareto`` (trigger policies x memories with a gated path:
eval return vs memory FLOPs per episode, table and PNG); ``publish=true`` also updates docs/triggers.md.

``rlmem-benchmark throughput``: frames/s and peak memory of rlmem's recurrent PPO
(collect + update, ``agent=gru env=delayed_cue``) against sb3-contrib ``RecurrentPPO``
(``MlpLstmPolicy``) on the same env with the same number of envs, hidden size, rollout length, epochs
and minibatch count, and ``agent=infinity``; rlmem with one torch thread, with ``threads=auto`` and with
``collector=process`` on every core. Each measurement runs in a fresh subprocess (clean peak-RSS, no shared
warm-up); ``--repeats N`` runs every row N times, interleaved, and reports medians (on a shared machine
one run's frames/s can move by a third).

``rlmem-benchmark learning --agents gru mamba --delays 50 200 --frames 1000000``: eval
success on DelayedCue per agent and delay, and the frames at which it first reached 0.9.

``rlmem-benchmark probe --agents gru transformer --delays 100 300 --seeds 0 1 2``: the supervised DelayedCue
probe. The agent's encoder, memory and policy head learn the cue at the query step by cross-entropy on fresh
episodes, without RL: a memory that fails here cannot carry the cue over that delay even with a perfect
learning signal; one that passes here but fails in PPO is held back by the RL signal.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlmem.commands._hydra import run_hydra
from rlmem.commands.bench_workers import long_delay_overrides, run_worker

#: the argparse subcommands; anything else is the Hydra suite form (``pareto`` is ``suite=pareto``)
MEASUREMENTS = ("throughput", "learning", "probe")

def throughput_rows(ns: argparse.Namespace, cores: int, auto_threads: int) -> list[tuple[str, str, dict]]:
    """``(name, worker kind, worker args)`` of every measurement: rlmem gru and infinity with one thread, with
    train_rl's default ``threads=auto`` and with ``collector=process`` on every core, and sb3-contrib."""
    base = {"num_envs": ns.num_envs, "rollout_len": ns.rollout_len, "epochs": ns.epochs,
            "minibatches": ns.minibatches, "hidden": ns.hidden, "delay": ns.delay, "frames": ns.frames,
            "threads": ns.threads}
    if ns.memories:  # one row per memory system at its agent config's defaults, gru first: ratios to gru
        from rlmem.memory import available_memories

        memories = available_memories() if ns.memories == ["all"] else list(ns.memories)
        # NAME@package.module:Class: NAME's agent config with that class as its memory (e.g. the readable
        # reference of an optimized system, rlmem.memory.reference.cmrn:CMRNReference: before vs after)
        unknown = [m for m in memories if m.split("@")[0] not in available_memories()]
        if unknown:
            raise SystemExit(f"rlmem-benchmark throughput: --memories {unknown[0]!r} is not a memory system; "
                             f"valid: all, {', '.join(available_memories())} (or NAME@package.module:Class)")
        memories = ["gru"] + [m for m in memories if m != "gru"]
        rows = []
        for m in memories:
            name, _, cls = m.partition("@")
            args = {**base, "memory": name, "defaults": True, **({"memory_class": cls} if cls else {})}
            rows.append((f"rlmem RecurrentPPO ({m}, threads={ns.threads})", "rlmem", args))
        return rows
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
    if ns.memories:
        print("| memory | frames/s (median) | ratio to gru: median | range over repeats |")
        print("|---|---:|---:|---|")
        for name, _, _ in rows:
            ratios = [a / b for a, b in zip(fps[name], fps[reference])]
            print(f"| {name.split('(')[1].split(',')[0]} | {statistics.median(fps[name]):.0f} | "
                  f"{statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")
        return
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


def probe(ns: argparse.Namespace) -> None:
    """The supervised DelayedCue probe of every agent and delay (:func:`bench_workers.worker_probe`)."""
    from rlmem.conf import available

    unknown = [a for a in ns.agents if a not in available("agent")]
    if unknown:
        raise SystemExit(f"rlmem-benchmark probe: --agents {unknown[0]!r} is not an agent config; "
                         f"valid: {', '.join(available('agent'))}")
    if min(ns.delays) < 0 or ns.n_cues < 2 or ns.batch < 1 or ns.updates < 1 or ns.lr <= 0:
        raise SystemExit("rlmem-benchmark probe: needs --delays >= 0, --n-cues >= 2, --batch >= 1, --updates >= 1 "
                         "and --lr > 0")
    print(f"Supervised DelayedCue probe ({ns.n_cues} cues): cross-entropy on the cue at the query step, batch "
          f"{ns.batch}, Adam lr {ns.lr}, at most {ns.updates} updates, seeds {ns.seeds}; solved = 10-update "
          "moving accuracy >= 0.9")
    print(f"{'agent':12s} {'delay':>6s} {'seed':>4s} {'solved at':>10s} {'accuracy':>9s} {'ms/update':>10s}")
    for agent in ns.agents:
        for delay in ns.delays:
            for seed in ns.seeds:
                r = run_worker("probe", {"agent": agent, "delay": delay, "n_cues": ns.n_cues, "batch": ns.batch,
                                         "lr": ns.lr, "updates": ns.updates, "seed": seed, "threads": ns.threads})
                solved = "-" if r["updates_to_0.9"] is None else str(r["updates_to_0.9"])
                print(f"{agent:12s} {delay:6d} {seed:4d} {solved:>10s} {r['accuracy']:9.2f} "
                      f"{1000 * r['seconds_per_update']:10.1f}", flush=True)


def run_suite(cfg) -> None:
    import logging
    import os

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
                        jobs, float(cfg.success_threshold), " ".join(["rlmem-benchmark", *shown]))
    if suite.get("leaderboard"):  # the suite asks for a leaderboard: its section goes first in results.md
        from rlmem.leaderboard import report

        section, _ = report(suite, rows, suite_dir, float(cfg.success_threshold), memory_mflops)
        insert_section(suite_dir / "results.md", section)
    log.info("results: %s, %s", suite_dir / "results.csv", suite_dir / "results.md")
    if cfg.publish:
        publish(suite["name"], suite_dir)
        log.info("published docs/results/%s.md, its PNGs and docs/results.md", suite["name"])
    if cfg.run and (failed or any(r["status"] != "finished" for r in rows)):
        raise SystemExit(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.group}/{r.name}" for r in failed))


def memory_mflops(agent: str) -> float | None:
    """MFLOPs per acting step of agent config ``agent``'s memory at its defaults (batch 1, gated path on,
    :func:`rlmem.compute.measure_path_flops`'s count); None for a name without an agent config (the reference)
    or a memory of which FlopCounterMode counts nothing."""
    import torch

    from rlmem.commands.overrides import group_config
    from rlmem.compute import measure_path_flops
    from rlmem.conf import available
    from rlmem.memory import build_memory

    if agent not in available("agent"):
        return None
    cfg = group_config("agent", agent)
    cfg.pop("name", None)
    memory, d_in = cfg.pop("memory"), int(cfg.pop("encoder_dim", 64))
    torch.manual_seed(0)
    cost = measure_path_flops(build_memory(memory, d_in=d_in, **cfg))
    flops = cost.base + cost.path
    return flops / 1e6 if flops else None  # nothing counted (torch's fused LSTM is no op it knows): unknown, not 0


def insert_section(path: Path, section: str) -> None:
    """Put ``section`` into the markdown file ``path`` after its header (before its first ``## `` heading)."""
    text = path.read_text()
    head, sep, rest = text.partition("\n## ")
    path.write_text(f"{head.rstrip()}\n\n{section.rstrip()}\n{sep}{rest}" if sep else f"{text.rstrip()}\n\n{section}")


def publish(suite: str, suite_dir: Path, root: Path | None = None) -> None:
    """Copy a suite's results.md and PNGs to ``<root>/docs/results/`` (PNGs prefixed with the suite's name)
    and rebuild ``<root>/docs/results.md`` from every suite published there. ``root``: the current directory
    (run ``publish=true`` from the repository's root)."""
    import shutil

    root = Path.cwd() if root is None else Path(root)
    docs = root / "docs" / "results"
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
    (root / "docs" / "results.md").write_text(header + "\n".join(parts))
    if suite == "pareto":
        publish_triggers(suite_dir, root)


def publish_triggers(suite_dir: Path, root: Path) -> None:
    """Put the pareto suite's return-vs-compute table and PNGs between the markers of docs/triggers.md."""
    doc = root / "docs" / "triggers.md"
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


def measurement_parser() -> argparse.ArgumentParser:
    """The argparse forms: ``throughput``, ``learning`` and ``probe``."""
    parser = argparse.ArgumentParser(prog="rlmem-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    t.add_argument("--memories", nargs="+", default=None, metavar="NAME",
                   help="instead of the gru/infinity/sb3 rows: one row per memory system ('all': every registered "
                        "one) at its agent config's defaults, each with its ratio to gru; NAME@module:Class runs "
                        "NAME's agent config with that memory class (e.g. a reference implementation)")
    t.set_defaults(func=throughput)
    s = sub.add_parser("learning", help="eval success on DelayedCue per agent and delay")
    s.add_argument("--agents", nargs="+", default=["gru"])
    s.add_argument("--delays", nargs="+", type=int, default=[50, 200])
    s.add_argument("--frames", type=int, default=1_000_000)
    s.add_argument("--eval-interval", type=int, default=50_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=learning)
    p = sub.add_parser("probe", help="supervised DelayedCue probe: can a memory carry the cue over the delay "
                                     "when the gradient is given directly (no RL)?")
    p.add_argument("--agents", nargs="+", default=["gru"])
    p.add_argument("--delays", nargs="+", type=int, default=[10, 100])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n-cues", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=probe)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``rlmem-benchmark [suite=<name> ...|pareto ...|throughput ...|learning ...]`` (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in MEASUREMENTS:
        parser = measurement_parser()
        ns = parser.parse_args(args)
        if ns.command == "throughput" and (ns.repeats < 1 or ns.threads < 1):
            parser.error(f"--repeats and --threads must be >= 1, got {ns.repeats} and {ns.threads}")
        ns.func(ns)
        return
    if args and args[0] == "pareto":  # the return-vs-compute suite of the trigger policies
        args[:1] = ["suite=pareto"]
    run_hydra("benchmark", "benchmark", run_suite, __doc__, args)


if __name__ == "__main__":
    main()
