"""The device a run learns on: ``device: cpu`` (the default) or ``cuda`` / ``cuda:<i>`` where a GPU exists.

Envs always step on the CPU. ``train_lm`` puts the model and its batches on the device; ``train_rl`` keeps
an acting copy of the agent on the CPU beside the envs (one small forward per env step is faster there than
a GPU launch per step) and learns on the device (see :class:`rlmem.ppo.RecurrentPPO`).
"""

from __future__ import annotations

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
