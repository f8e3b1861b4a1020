"""Train an agent with recurrent PPO.

A thin wrapper for a checkout: ``python scripts/train_rl.py ...`` =
``rlmem-train`` or ``python -m rlmem.commands.train_rl`` (the code:
rlmem/commands/train_rl.py; ``--help`` lists the options)."""

from rlmem.commands.train_rl import main

if __name__ == "__main__":
    main()
