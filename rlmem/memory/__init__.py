"""Memory systems behind one contract (see :mod:`rlmem.memory.base`), built by name."""

import importlib
import pkgutil

from rlmem.memory.base import MemorySystem, reset_state
from rlmem.memory.check import CHECKS, MemoryContractError, check_memory
from rlmem.memory.registry import available_memories, build_memory, memory_class, register_memory


def _import_systems() -> None:
    """Import every module of this package: each registers its systems (``@register_memory``), so a new
    built-in memory system is one new file here. Sub-packages (``reference``: the readable versions of the
    optimized kernels) are not memory systems."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
        importlib.import_module(f"{__name__}.{module}")


_import_systems()

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
