"""PPO frames/s at each torch thread setting, on an idle machine and beside busy processes.

    python scripts/bench_threads.py                          # gru and cmrn, threads 1 / 2 / auto, 0 and 2 busy loops
    python scripts/bench_threads.py --agents gru --busy 0 1 2 --frames 16384 --repeats 3

Each measurement is a fresh ``python -m rlmem.commands.train_rl`` run (the command users run, so
``threads=auto`` is resolved and governed as in any run) on DelayedCue with evaluation off, timed by its own
``metrics.json`` (``fps``). ``--busy K`` starts K processes that spin on one core each for the whole
measurement (another training, a test run: what a shared machine looks like). Settings are interleaved
within each repeat so that a change in the machine's load hits them alike; the table gives the median
frames/s and each setting's ratio to the best setting at the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SPIN = "while True: pass"


def run(agent: str, threads: str, frames: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "rlmem.commands.train_rl", f"agent={agent}", "env=delayed_cue",
               f"threads={threads}", f"total_frames={frames}", "ppo.eval_interval=100000000",
               "logger.progress_bar=false", f"hydra.run.dir={run_dir}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        return json.loads((Path(run_dir) / "metrics.json").read_text())["fps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=["gru", "cmrn"])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 2], help="busy processes beside the run")
    parser.add_argument("--frames", type=int, default=8192, help="frames per run (per agent: --frames-for)")
    parser.add_argument("--frames-for", nargs="*", default=["cmrn=4096"], metavar="AGENT=N")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    frames_for = {k: int(v) for k, v in (item.split("=") for item in args.frames_for)}

    results: dict[tuple[str, int, str], list[float]] = {}
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            for repeat in range(args.repeats):
                for agent in args.agents:
                    for threads in args.threads:
                        fps = run(agent, threads, frames_for.get(agent, args.frames))
                        results.setdefault((agent, busy, threads), []).append(fps)
                        print(f"busy={busy} repeat={repeat} agent={agent} threads={threads}: {fps:.0f} frames/s",
                              flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()

    print("\n| agent | busy processes | " + " | ".join(f"threads={t}" for t in args.threads) + " | auto / best |")
    print("|---|---:|" + "---:|" * (len(args.threads) + 1))
    for agent in args.agents:
        for busy in args.busy:
            medians = {t: statistics.median(results[agent, busy, t]) for t in args.threads}
            best = max(medians.values())
            cells = " | ".join(f"{medians[t]:.0f}" for t in args.threads)
            auto = f"{medians['auto'] / best:.2f}" if "auto" in medians else "-"
            print(f"| {agent} | {busy} | {cells} | {auto} |")


if __name__ == "__main__":
    main()
