r"""rlmem's commands, each a module with a ``main()``; they work from any directory, installed or not.

==================  ======================================  ==========================================
console script      module                                  what it does
==================  ======================================  ==========================================
``rlmem-train``     ``python -m rlmem.commands.train_rl``    train an agent with recurrent PPO
``rlmem-train-lm``  ``python -m rlmem.commands.train_lm``    train a memory system on a synthetic LM task
``rlmem-evaluate``  ``python -m rlmem.commands.evaluate``    greedy episodes (and a GIF) of a trained agent
``rlmem-benchmark`` ``python -m rlmem.commands.benchmark``   suites, PPO throughput, learning, pareto
\-                  ``python -m rlmem.commands.sb3_reference`` sb3-contrib's RecurrentPPO (suites' reference)
==================  ======================================  ==========================================

In a checkout, ``python scripts/<module>.py ...`` runs the same ``main()``. Configs are package data
(``rlmem/conf``); outputs go under the current directory (``outputs/...``).
"""
