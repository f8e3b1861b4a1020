"""Benchmarks: suites, PPO throughput, learning, pareto.

A thin wrapper for a checkout: ``python scripts/benchmark.py ...`` =
``rlmem-benchmark`` or ``python -m rlmem.commands.benchmark`` (the code:
rlmem/commands/benchmark.py; ``--help`` lists the options)."""

from rlmem.commands.benchmark import main

if __name__ == "__main__":
    main()
