"""Run outputs shared by the training scripts: atomic checkpoints, ``metrics.json``, and the checks that
keep a bad run from overwriting good results.

Files are written to a temporary file in the same directory and moved into place with ``os.replace``,
so a run killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDictBase


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


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Write ``metrics.json`` atomically (NaN/inf become null so the file stays valid JSON)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, torch.Tensor):
            return clean(v.item())
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(metrics), indent=2, sort_keys=True, default=str)
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def run_dir_holds_a_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds results of an earlier run (a checkpoint or ``metrics.json``)."""
    run_dir = Path(run_dir)
    return (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "metrics.json").exists()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ppo": {"lr": 1e-3}} -> {"ppo.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class NonFiniteError(FloatingPointError):
    """Training met a NaN or infinity (in a loss, a memory state or the parameters) and stopped."""


def check_finite(tensors: Mapping[str, torch.Tensor] | TensorDictBase, where: str, kept: str) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite entry of ``tensors`` and ``where`` it was;
    ``kept`` says which checkpoint survives."""
    items = tensors.items(include_nested=True, leaves_only=True) if isinstance(tensors, TensorDictBase) \
        else tensors.items()
    for key, value in items:
        # a finite sum means every entry is finite (one reduction, no bool tensor); a non-finite one may also
        # be an overflow of finite entries, so only then is each entry checked
        if value.is_floating_point() and not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
            name = ".".join(key) if isinstance(key, tuple) else key
            raise NonFiniteError(f"non-finite values in {where} (entry {name!r}); training stopped, {kept}")
