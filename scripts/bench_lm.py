"""Benchmark of the LM tasks: generator throughput and train_lm.py training throughput.

    python scripts/bench_lm.py                 # prints a markdown table
    python scripts/bench_lm.py --json out.json

1. Generator tokens/s per task at sequence length 256 (``LMTask.batch``: numpy generation + torch tensors).
2. ``scripts/train_lm.py`` tokens/s (forward + backward + optimizer step, as reported in its metrics.json)
   for ``model=gru`` (d_model 64, hidden 64) at sequence length 256, run as a subprocess with 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlmem.lm_tasks import build_task  # noqa: E402

# every config has sequence length 256; assoc_recall as in Zoology's MQAR (16 pairs, vocabulary 8192)
GENERATOR_CONFIGS = {
    "copy_memory": {"n_items": 16, "delay": 224, "vocab_size": 16},
    "assoc_recall": {"seq_len": 256, "n_pairs": 16, "vocab_size": 8192},
    "selective_copy": {"seq_len": 256, "n_items": 16, "vocab_size": 16},
    "induction_head": {"seq_len": 256, "vocab_size": 16},
    "babi": {"seq_len": 256, "hops": 2},
}
TRAIN_TASKS = ["copy_memory", "assoc_recall"]


def generator_tokens_per_s(name: str, knobs: dict, batch_size: int, seconds: float) -> float:
    task = build_task(name, **knobs)
    rng = np.random.default_rng(0)
    task.batch(batch_size, rng)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        task.batch(batch_size, rng)
        n += 1
    return n * batch_size * task.seq_len / (time.perf_counter() - start)


def train_lm_tokens_per_s(task: str, steps: int, batch_size: int) -> dict:
    overrides = [f"task.{k}={v}" for k, v in GENERATOR_CONFIGS[task].items()]
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, str(ROOT / "scripts" / "train_lm.py"), "model=gru", "model.d_model=64",
            "model.hidden_size=64", f"task={task}", *overrides, f"steps={steps}", f"batch_size={batch_size}",
            f"eval_interval={steps}", "eval_batches=1", "threads=1", f"hydra.run.dir={out}",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads((Path(out) / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256, help="generator batch size")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per generator measurement")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "generator": {}, "train_lm": {}}
    print(f"| task | knobs | generator tokens/s (batch {args.batch_size}) |\n|---|---|---|")
    for name, knobs in GENERATOR_CONFIGS.items():
        tps = generator_tokens_per_s(name, knobs, args.batch_size, args.seconds)
        results["generator"][name] = {"knobs": knobs, "tokens_per_s": tps}
        print(f"| {name} | {knobs} | {tps:,.0f} |", flush=True)
    print("\n| train_lm.py, model=gru d_model=64 | steps x batch | tokens/s |\n|---|---|---|")
    for task in TRAIN_TASKS:
        m = train_lm_tokens_per_s(task, args.train_steps, args.train_batch_size)
        results["train_lm"][task] = {k: m[k] for k in ("tokens_per_s", "steps", "wall_seconds", "task_knobs")}
        print(f"| {task} (seq len 256) | {m['steps']} x {args.train_batch_size} | {m['tokens_per_s']:,.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
