"""sb3-contrib's RecurrentPPO on an rlmem env (the suites' reference).

A thin wrapper for a checkout: ``python scripts/sb3_reference.py ...`` =
``python -m rlmem.commands.sb3_reference`` (the code:
rlmem/commands/sb3_reference.py; ``--help`` lists the options)."""

from rlmem.commands.sb3_reference import main

if __name__ == "__main__":
    main()
