"""Evaluate and watch a trained agent.

A thin wrapper for a checkout: ``python scripts/evaluate.py ...`` =
``rlmem-evaluate`` or ``python -m rlmem.commands.evaluate`` (the code:
rlmem/commands/evaluate.py; ``--help`` lists the options)."""

from rlmem.commands.evaluate import main

if __name__ == "__main__":
    main()
