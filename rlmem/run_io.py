"""Run outputs shared by the training scripts: atomic checkpoints and ``metrics.json``.

Both are written to a temporary file in the same directory and moved into place with ``os.replace``,
so a run killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` atomically."""
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically (NaN/inf become null so the file stays valid JSON)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, torch.Tensor):
            return clean(v.item())
        return v

    text = json.dumps({k: clean(v) for k, v in metrics.items()}, indent=2, sort_keys=True)
    _atomic_write(Path(path), lambda f: f.write(text.encode()))
