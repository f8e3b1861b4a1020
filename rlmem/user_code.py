"""Bringing a user's own code in: ``imports=[my_pkg.my_memories]``, ``env.id=my_module:MyEnv-v0`` and
``agent.memory=my_pkg.my_memories:EMAMemory``.

Modules are looked up on ``sys.path`` plus the current working directory: the training scripts run as
``python scripts/train_rl.py``, which puts ``scripts/`` (not the directory the user is in) on the path, so
without it a user's ``my_module.py`` next to their shell would not be found. The directory is appended,
never prepended, so it cannot shadow an installed package.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any


def import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)`` that also searches the working directory; a missing module raises
    ``ImportError`` naming it and where it was looked for."""
    if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"{name!r} is not a module name (e.g. my_package.my_memories)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise ImportError(f"cannot import module {name!r}: no module {err.name!r} on sys.path or in {cwd}") from err
        raise  # the module exists but one of its own imports is missing: keep the original error


def import_modules(names: Iterable[str] | str | None) -> list[ModuleType]:
    """Import each of ``names`` (so their ``@register_memory`` and ``gym.register`` calls run)."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    return [import_module(n) for n in names]


def load_object(path: str) -> Any:
    """``"package.module:Name"`` -> the object ``Name`` of that module."""
    module_name, sep, attr = path.partition(":")
    if not sep or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:Name'")
    module = import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}; it has: {public}") from None
