"""Registry of memory systems by name (``build_memory("gru", d_in=32, hidden_size=64)``).

A name may also be a class path, ``"my_package.my_memories:EMAMemory"``: the module is imported (from
``sys.path`` or the working directory) and the class used directly, registered or not.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from rlmem.memory.base import MemorySystem

_REGISTRY: dict[str, type[MemorySystem]] = {}


def register_memory(name: str) -> Callable[[type[MemorySystem]], type[MemorySystem]]:
    """Class decorator: make a memory system buildable by ``name``."""

    def decorator(cls: type[MemorySystem]) -> type[MemorySystem]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"memory system {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def available_memories() -> list[str]:
    return sorted(_REGISTRY)


def memory_class(name: str) -> type[MemorySystem]:
    """The class registered as ``name``, or the class at ``"package.module:ClassName"``."""
    if isinstance(name, str) and ":" in name:
        from rlmem.user_code import load_object

        cls = load_object(name)
        if not (isinstance(cls, type) and issubclass(cls, MemorySystem)):
            raise TypeError(f"{name} is {cls!r}, not a subclass of rlmem.MemorySystem")
        return cls
    if name not in _REGISTRY:
        raise KeyError(f"unknown memory system {name!r}; valid choices: {', '.join(available_memories())} "
                       "(or a class path 'package.module:ClassName')")
    return _REGISTRY[name]


def build_memory(name: str, d_in: int, **kwargs) -> MemorySystem:
    """Build a registered memory system; unknown keyword arguments raise naming the valid ones."""
    cls = memory_class(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p not in ("self", "d_in")]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"memory system {name!r} got unknown parameters {unknown}; valid: {valid}")
    return cls(d_in=d_in, **kwargs)
