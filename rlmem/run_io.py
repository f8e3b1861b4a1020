"""Run outputs shared by the training scripts: atomic checkpoints, ``metrics.json``, and the checks that
keep a bad run from overwriting good results.

Checkpoints hold only what ``torch.load(..., weights_only=True)`` accepts: tensors, dicts, lists, tuples,
ints, floats, strings, bools and None (:func:`save_checkpoint` turns numpy arrays and scalars into tensors
and Python numbers, and refuses anything else). They are loaded with ``weights_only=True`` and nothing
allow-listed, so a crafted file cannot run code: it is refused with a one-line
:class:`CheckpointError` naming the file.

Files are written to a temporary file in the same directory and moved into place with ``os.replace``,
so a run killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase

# TorchRL logs INFO lines (with ANSI colours) to stdout through its own handler: they are about its own spec
# checks, not the run, and stdout is where the commands print their JSON results. Set here, where both
# trainers and rlmem.agents (whose build_agent checks the env specs) import from.
logging.getLogger("torchrl").setLevel(logging.WARNING)


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


class CheckpointError(ValueError):
    """A file that is not an rlmem checkpoint, or carries objects rlmem does not write (refused unread)."""


def weights_only_safe(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers; raises ``TypeError``
    naming the entry if anything else is not loadable with ``torch.load(..., weights_only=True)``."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor) and not isinstance(value, TensorDictBase):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (torch.device, torch.dtype)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be saved weights-only")
            out[k] = weights_only_safe(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (bool, int, float, str)):  # subclasses (IntEnum, ...): their plain value
        return type(value).__mro__[-2](value)
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be saved in a checkpoint "
                    "(checkpoints hold only tensors, dicts, lists, numbers, strings, bools and None)")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` atomically, after :func:`weights_only_safe` (numpy -> tensors / numbers)."""
    payload = weights_only_safe(payload, "checkpoint")
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU. A file whose pickle holds anything else than
    what rlmem writes (a class, a function, a numpy object of a checkpoint from before rlmem wrote only
    tensors and numbers) is refused unread with a one-line :class:`CheckpointError`."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        detail = " ".join(str(err).split())
        found = re.search(r"GLOBAL ([\w.]+)", detail)  # torch names the first object it refused
        if found:
            raise CheckpointError(
                f"{path} is not an rlmem checkpoint: it carries objects rlmem does not write ({found.group(1)}); it was "
                "not loaded and nothing in it ran (checkpoints load with weights_only=True; one written by an rlmem older than "
                "that with numpy objects in it is refused too)") from None
        detail = detail.split("WeightsUnpickler error: ")[-1].split(" Check the documentation")[0]
        raise CheckpointError(f"{path} is not an rlmem checkpoint: torch cannot read it ({type(err).__name__}: "
                              f"{detail[:160]}); nothing in it ran") from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path} is not an rlmem checkpoint: it holds a {type(payload).__name__}, not a dict")
    return payload


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
