"""Registry of memory systems by name (``build_memory("gru", d_in=32, hidden_size=64)``).

A name may also be a class path, ``"my_package.my_memories:EMAMemory"``: the module is imported (from
``sys.path`` or the working directory) and the class used directly, registered or not.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from rlmem.memory.base import MemorySystem
from rlmem.registry import Registry
from rlmem.validate import check_int, suggest

#: every memory system by name
MEMORIES: Registry[type[MemorySystem]] = Registry("memory system", "agent.memory")
_REGISTRY = MEMORIES._entries  # the name -> class dict itself (tests register temporary systems in it)


def register_memory(name: str) -> Callable[[type[MemorySystem]], type[MemorySystem]]:
    """Class decorator: make a memory system buildable by ``name``."""

    def decorator(cls: type[MemorySystem]) -> type[MemorySystem]:
        MEMORIES.add(name, cls)
        cls.registry_name = name
        return cls

    return decorator


def available_memories() -> list[str]:
    return MEMORIES.names()


def memory_class(name: str) -> type[MemorySystem]:
    """The class registered as ``name``, or the class at ``"package.module:ClassName"``."""
    if isinstance(name, str) and ":" in name:
        from rlmem.user_code import load_object

        cls = load_object(name)
        if not (isinstance(cls, type) and issubclass(cls, MemorySystem)):
            raise TypeError(f"{name} is {cls!r}, not a subclass of rlmem.MemorySystem")
        return cls
    if name not in MEMORIES:
        raise KeyError(MEMORIES.unknown(name, " (or a class path 'package.module:ClassName')"))
    return MEMORIES.get(name)


def build_memory(name: str, d_in: int, **kwargs) -> MemorySystem:
    """Build a registered memory system (``d_in``: the width of its inputs); an unknown keyword argument
    raises naming the valid ones and a close match."""
    cls = memory_class(name)
    check_int("d_in", d_in, low=1)
    valid = memory_options(cls)
    if valid is not None:
        for key in kwargs:
            if key not in valid:
                raise TypeError(f"{key!r} is not an option of memory system {name!r}{suggest(key, valid)}; "
                                f"valid: {', '.join(valid)}")
    return cls(d_in=d_in, **kwargs)


def memory_options(cls: type[MemorySystem]) -> list[str] | None:
    """The keyword arguments of a memory system's constructor besides ``d_in`` (None: it takes any)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p not in ("self", "d_in")]
