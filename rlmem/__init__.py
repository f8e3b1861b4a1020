"""rlmem: measure what neural memory systems remember, for how long and at what cost, in RL.

``import rlmem`` registers the ``rlmem/<Name>-v0`` Gymnasium environments and the memory systems.
"""

import rlmem.envs  # noqa: F401  (registers the environments)
from rlmem.memory import (
    MemoryContractError,
    MemorySystem,
    available_memories,
    build_memory,
    check_memory,
    register_memory,
)

__version__ = "0.1.0"

__all__ = [
    "MemoryContractError",
    "MemorySystem",
    "available_memories",
    "build_memory",
    "check_memory",
    "register_memory",
    "__version__",
]
