"""Per-step acting latency and memory early vs late in one long episode, for the memory systems of the agents.

    python scripts/bench_memory.py                       # mamba ssm infinity transformer gru stm, B = 1 and 16
    python scripts/bench_memory.py --systems mamba transformer:window=256 --steps 2000 --batch-sizes 1
    python scripts/bench_memory.py --systems stm stm:n_refine=0 --batch-sizes 1 16
    python scripts/bench_memory.py --train-only                 # training-pass cost of every agent's memory

Each system is built from its agent config (``rlmem/conf/agent/<name>.yaml``: ``encoder_dim`` is
``d_in``, the other keys are memory kwargs) and stepped like an acting policy: ``forward`` with T=1 under
``no_grad``, carrying its state, ``is_init`` only at step 0. The latency "at step s" is the median time
of one more step from the state reached after s steps (early and late steps timed alternately); a
constant-state system has ratio late/early ~ 1, a windowed one is bounded once its window is full.
Memory: the process's resident set size (RSS, from ``/proc/self/statm``) after ``early`` steps and after
``steps`` steps, and the peak RSS sampled every 50 steps in between: a system whose state does not grow keeps
it flat (the peak over the whole process, ``ru_maxrss``, is printed at the end).
Also reported: one training pass (sequence mode, forward + backward) on a ``[16, 64]`` batch (16 replayed
slices of 64 steps).

``--train-only``: just the training pass, for every agent config unless ``--systems`` is given, on what PPO
replays at its defaults on DelayedCue: a ``[32, 64]`` batch whose rows hold 12-step episodes starting at a
random phase; the systems are timed in turns (``--rounds`` of them) so that a change in the machine's load
hits them all alike. Prints ms per pass and µs per frame (per step of one row).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import yaml

from rlmem.commands.overrides import group_config
from rlmem.conf import available
from rlmem.memory import build_memory


def build(spec: str):
    """``"transformer"`` or with overrides of the agent config, ``"transformer:window=256,n_layers=2"``."""
    name, _, overrides = spec.partition(":")
    cfg = group_config("agent", name)  # agent/<name>.yaml with the memory/<name>.yaml it includes
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    cfg.pop("name", None)
    memory = cfg.pop("memory")
    d_in = int(cfg.pop("encoder_dim", 64))
    return build_memory(memory, d_in=d_in, **cfg), d_in


PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> float:
    """Resident set size of this process now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_MB


@torch.no_grad()
def latencies(memory, d_in: int, batch: int, steps: int, early: int, samples: int) -> tuple[list, list, int, dict]:
    """Play one episode of ``steps`` steps, keeping the states after ``early`` and after ``steps`` steps;
    then time one more step from each, alternating, ``samples`` times (alternating keeps the comparison
    fair when other jobs share the machine). Returns seconds per step (early, late), the state size
    (floats per row) after ``steps`` steps and the RSS in MB (``early``, ``late``, ``peak`` between them)."""
    memory.eval()
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(64, batch, 1, d_in, generator=g)  # inputs cycle through a small pool
    state = memory.initial_state(batch)
    start, cont = torch.ones(batch, 1, dtype=torch.bool), torch.zeros(batch, 1, dtype=torch.bool)
    rss = {}
    for t in range(steps):
        _, state = memory(pool[t % len(pool)], state, start if t == 0 else cont)
        if t + 1 == early:
            early_state = state
            rss["early"] = rss["peak"] = rss_mb()
        elif t + 1 > early and (t + 1) % 50 == 0:
            rss["peak"] = max(rss["peak"], rss_mb())
    rss["late"] = rss_mb()
    rss["peak"] = max(rss["peak"], rss["late"])
    x = pool[steps % len(pool)]
    times = {"early": [], "late": []}
    for _ in range(samples):
        for key, s in (("early", early_state), ("late", state)):
            t0 = time.perf_counter()
            memory(x, s, cont)
            times[key].append(time.perf_counter() - t0)
    return times["early"], times["late"], sum(v[0].numel() for v in state.values()), rss


def train_pass_ms(memory, d_in: int, batch: int = 16, T: int = 64, reps: int = 5) -> float:
    memory.train()
    x = torch.randn(batch, T, d_in)
    is_init = torch.zeros(batch, T, dtype=torch.bool)
    is_init[:, 0] = True
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        y, _ = memory(x, memory.initial_state(batch), is_init)
        y.pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    memory.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times[1:])  # the first pass warms up


def replay_batch(batch: int = 32, T: int = 64, episode: int = 12, seed: int = 0) -> torch.Tensor:
    """``is_init: [batch, T]``: episodes of ``episode`` steps, each row at a random phase (as PPO replays them)."""
    phase = torch.randint(episode, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(T) + phase) % episode == 0


def train_costs(systems: list[str], rounds: int, batch: int = 32, T: int = 64) -> None:
    """The ``--train-only`` table: median ms per training pass (forward + backward of a random readout)."""
    is_init = replay_batch(batch, T)
    built = {}
    for name in systems:
        memory, d_in = build(name)
        memory.train()
        readout = torch.randn(memory.d_out)  # a random readout: its gradient is not LayerNorm's rounding noise
        x = torch.randn(batch, T, d_in)
        built[name] = memory, x, readout, []
    for _ in range(rounds + 1):  # the first round warms up
        for memory, x, readout, times in built.values():
            t0 = time.perf_counter()
            y, _ = memory(x, memory.initial_state(batch), is_init)
            (y * readout).sum().backward()
            times.append(time.perf_counter() - t0)
            memory.zero_grad(set_to_none=True)
    print(f"| system | parameters | ms per pass [{batch}x{T}] | µs per frame |")
    print("|---|---:|---:|---:|")
    for name, (memory, _, _, times) in built.items():
        ms = 1e3 * statistics.median(times[1:])
        n_params = sum(p.numel() for p in memory.parameters() if p.requires_grad)
        print(f"| {name} | {n_params:,} | {ms:.1f} | {1e3 * ms / (batch * T):.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=None,
                        help="agent names (rlmem/conf/agent/<name>.yaml), optionally name:key=value,... "
                             "(default: mamba ssm infinity transformer gru stm; every agent with --train-only)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=5000, help="episode length; the late point")
    parser.add_argument("--early", type=int, default=10, help="the early point")
    parser.add_argument("--samples", type=int, default=200, help="timed steps per point")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true",
                        help="only the training pass, of every agent config unless --systems is given")
    parser.add_argument("--rounds", type=int, default=8, help="--train-only: timed passes per system")
    args = parser.parse_args()
    if args.train_only:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        systems = args.systems or available("agent")
        print(f"torch {torch.__version__}, {args.threads} thread(s); median of {args.rounds} passes\n")
        train_costs(systems, args.rounds)
        return
    if args.systems is None:
        args.systems = ["mamba", "ssm", "infinity", "transformer", "gru", "stm"]
    if not (0 < args.early < args.steps and args.samples > 0):
        parser.error("need 0 < early < steps and samples > 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {args.threads} thread(s); median ms per step over {args.samples} steps\n")
    header = (f"| system | params | state floats/row | B | ms @ step {args.early} | ms @ step {args.steps} "
              f"| ratio | RSS MB @ step {args.early} | RSS MB @ step {args.steps} (peak between) "
              "| train fwd+bwd [16x64] ms |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.systems:
        memory, d_in = build(name)
        n_params = sum(p.numel() for p in memory.parameters())  # trainable (a frozen generator is buffers)
        train_ms = train_pass_ms(memory, d_in)
        for batch in args.batch_sizes:
            early, late, state_size, rss = latencies(memory, d_in, batch, args.steps, args.early, args.samples)
            early, late = 1e3 * statistics.median(early), 1e3 * statistics.median(late)
            print(f"| {name} | {n_params} | {state_size} | {batch} | {early:.3f} | {late:.3f} | {late / early:.2f} "
                  f"| {rss['early']:.0f} | {rss['late']:.0f} ({rss['peak']:.0f}) | {train_ms:.1f} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(f"\npeak RSS of the whole process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
