"""One registry type for every extensible concept: memory systems, trigger policies, collectors.

Each concept keeps one :class:`Registry` (``rlmem.memory.registry.MEMORIES``,
``rlmem.agents.triggers.TRIGGER_POLICIES``, ``rlmem.collectors.COLLECTORS``); adding one is one decorator
in one file::

    @MEMORIES.register("ema")
    class EMAMemory(MemorySystem): ...

An unknown name raises a ``KeyError`` whose message names the config key, a close match and the choices.
This module is in rlmem's bottom layer: it imports nothing of rlmem but :mod:`rlmem.validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rlmem.validate import suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind. ``kind`` says what they are (``"memory system"``); ``key`` is the
    config key that names one (``"agent.memory"``), used in error messages."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` over a class or function."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` as ``name``; the same object twice is fine, another one under a taken name is not."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered to {_label(self._entries[name])}")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; a KeyError naming the choices otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config
            raise KeyError(self.unknown(name)) from None

    def unknown(self, name: object, extra: str = "") -> str:
        """The message for an unknown ``name``: the key, a close match and the valid choices."""
        return (f"{self.key}={name!r} is not a {self.kind}{suggest(name, self._entries)}; "
                f"valid choices: {', '.join(self.names())}{extra}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _label(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)
