"""Train a memory system on a synthetic LM task.

A thin wrapper for a checkout: ``python scripts/train_lm.py ...`` =
``rlmem-train-lm`` or ``python -m rlmem.commands.train_lm`` (the code:
rlmem/commands/train_lm.py; ``--help`` lists the options)."""

from rlmem.commands.train_lm import main

if __name__ == "__main__":
    main()
