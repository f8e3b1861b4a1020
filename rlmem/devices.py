"""Where a run computes: the device it learns on (``device: cpu``, the default, or ``cuda`` / ``cuda:<i>`` where
a GPU exists) and how many CPU threads torch uses (``threads``).

Envs always step on the CPU. ``train_lm`` puts the model and its batches on the device; ``train_rl`` keeps
an acting copy of the agent on the CPU beside the envs (one small forward per env step is faster there than
a GPU launch per step) and learns on the device (see :class:`rlmem.ppo.RecurrentPPO`).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` this machine has, or a ValueError naming the valid choices."""
    valid = ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(value) if isinstance(value, (str, torch.device)) else None
    except RuntimeError:
        device = None
    ok = device is not None and (device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()))
    if not ok:
        why = "" if torch.cuda.is_available() else " (this machine has no CUDA device)"
        raise ValueError(f"{name}={value!r} is not a device of this machine{why}; valid: {valid}")
    return device


#: ``threads=auto`` uses the cores this process may run on, but at most this many: the models here are small,
#: and past a few threads the per-op synchronisation costs more than the split work saves
MAX_AUTO_THREADS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under ``taskset``; else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(value: Any, name: str = "threads") -> int:
    """``value`` as a torch thread count: ``auto`` -> ``min(usable_cores(), MAX_AUTO_THREADS)``, an integer
    >= 1 as it is; anything else is a ValueError naming the valid choices."""
    if value == "auto":
        return max(1, min(usable_cores(), MAX_AUTO_THREADS))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not a thread count; valid: auto or an integer >= 1")
    return value
