"""Moved: the LM trainer is :mod:`rlmem.lm_training` (``from rlmem.lm_training import LMTrainer, run, ...``).

``rlmem.lm_tasks`` holds only the data (tasks, solvers). This module re-exports the trainer's names lazily
(a ``DeprecationWarning`` on first use) for the code not yet moved to the new path; it goes away with it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn("rlmem.lm_tasks.training moved to rlmem.lm_training", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("rlmem.lm_training"), name)
