"""Memory systems behind one contract (see :mod:`rlmem.memory.base`), built by name."""

from rlmem.memory.base import MemorySystem, reset_state
from rlmem.memory.check import CHECKS, MemoryContractError, check_memory
from rlmem.memory.registry import available_memories, build_memory, memory_class, register_memory

# Importing a module registers its systems.
from rlmem.memory import baselines  # noqa: E402,F401  isort:skip
from rlmem.memory import mamba, ssm, transformer, miras, infinity  # noqa: E402,F401  isort:skip
from rlmem.memory import armt, darmt  # noqa: E402,F401  isort:skip
from rlmem.memory import cmrn  # noqa: E402,F401  isort:skip
from rlmem.memory import stm  # noqa: E402,F401  isort:skip
from rlmem.memory import adapter  # noqa: E402,F401  isort:skip

__all__ = [
    "CHECKS",
    "MemoryContractError",
    "MemorySystem",
    "available_memories",
    "build_memory",
    "check_memory",
    "memory_class",
    "register_memory",
    "reset_state",
]
