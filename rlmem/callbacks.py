"""Training callbacks (hooks) of both trainers (:class:`rlmem.ppo.RecurrentPPO`, :class:`rlmem.lm_training.LMTrainer`).

As in Stable-Baselines3, a callback is an object with hooks the trainer calls; a hook returning ``False``
ends the run cleanly (a checkpoint, ``metrics.json``, and ``metrics["stopped_by"]`` naming the callback),
anything else (``None`` included) lets it go on::

    class StopOnReturn(rlmem.callbacks.Callback):
        def on_eval(self, trainer, metrics):
            return metrics["eval_return"] < 0.9

    RecurrentPPO(..., callbacks=[StopOnReturn()]).train()

Hooks: :meth:`~Callback.on_train_start`, :meth:`~Callback.on_step` (after every PPO iteration / LM
training step), :meth:`~Callback.on_eval`, :meth:`~Callback.on_checkpoint`, :meth:`~Callback.on_train_end`.
A callback whose decisions span evaluations keeps its state in :meth:`~Callback.state_dict` (plain numbers,
strings, lists, dicts: checkpoints are weights-only), so a resumed run continues it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlmem.devices import ThreadGovernor
from rlmem.validate import check_float, check_int

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing and lets training go on."""

    #: the name ``metrics["stopped_by"]`` records when this callback ends a run
    name: str = ""

    def on_train_start(self, trainer) -> None:
        pass

    def on_step(self, trainer) -> bool | None:
        """After every PPO iteration (RL) or training step (LM)."""

    def on_eval(self, trainer, metrics: Mapping[str, Any]) -> bool | None:
        """After every evaluation; ``metrics``: the trainer's metrics with this evaluation's numbers."""

    def on_checkpoint(self, trainer, path: Path) -> bool | None:
        """After a checkpoint was written to ``path``."""

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    @property
    def label(self) -> str:
        return self.name or type(self).__name__


class CallbackList(Callback):
    """Calls every callback's hook; the first to return ``False`` is recorded in :attr:`stopped_by`."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be rlmem.callbacks.Callback objects, got {type(cb).__name__}")
        self.stopped_by: str | None = None

    def _all(self, hook: str, *args) -> bool:
        go_on = True
        for cb in self.callbacks:
            if getattr(cb, hook)(*args) is False:
                go_on = False
                self.stopped_by = self.stopped_by or cb.label
        return go_on

    def on_train_start(self, trainer) -> None:
        self._all("on_train_start", trainer)

    def on_step(self, trainer) -> bool:
        return self._all("on_step", trainer)

    def on_eval(self, trainer, metrics) -> bool:
        return self._all("on_eval", trainer, metrics)

    def on_checkpoint(self, trainer, path) -> bool:
        return self._all("on_checkpoint", trainer, path)

    def on_train_end(self, trainer) -> None:
        self._all("on_train_end", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{cb.label}": cb.state_dict() for i, cb in enumerate(self.callbacks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, cb in enumerate(self.callbacks):
            if f"{i}:{cb.label}" in state:
                cb.load_state_dict(state[f"{i}:{cb.label}"])


class StopAt(Callback):
    """Ends training once every target metric is reached at ``evals`` consecutive evaluations.

    ``StopAt({"eval_success": 0.95, "evals": 2})``: stop at the second evaluation in a row with
    ``eval_success >= 0.95`` (the run's ``stop_at`` setting, ``logger.stop_at`` for train_rl). Metrics whose
    name ends in ``loss`` are targets from above (``eval_loss: 0.1`` stops at ``eval_loss <= 0.1``); a NaN
    never reaches its target.
    """

    name = "stop_at"

    def __init__(self, targets: Mapping[str, Any]):
        if not isinstance(targets, Mapping) or not targets:
            raise ValueError(f"stop_at must be a mapping of metric -> target (and optionally evals: n), "
                             f"e.g. {{eval_success: 0.95, evals: 2}}; got {targets!r}")
        targets = dict(targets)
        self.evals = check_int("stop_at.evals", targets.pop("evals", 1), low=1)
        if not targets:
            raise ValueError("stop_at needs at least one metric target besides evals, e.g. eval_success: 0.95")
        self.targets = {str(k): check_float(f"stop_at.{k}", v) for k, v in targets.items()}
        self.streak = 0

    def reached(self, metrics: Mapping[str, Any]) -> bool:
        for key, target in self.targets.items():
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or math.isnan(value):
                return False
            if not (value <= target if key.endswith("loss") else value >= target):
                return False
        return True

    def on_eval(self, trainer, metrics) -> bool:
        self.streak = self.streak + 1 if self.reached(metrics) else 0
        return self.streak < self.evals

    @property
    def label(self) -> str:
        targets = ", ".join(f"{k}{'<=' if k.endswith('loss') else '>='}{v:g}" for k, v in self.targets.items())
        return f"stop_at ({targets} at {self.evals} consecutive evaluation{'s' * (self.evals > 1)})"

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))


class AutoThreads(Callback):
    """``threads=auto`` while the run goes: after each iteration, every ``interval`` seconds, torch's thread
    count follows the cores other processes leave free (:class:`rlmem.devices.ThreadGovernor`): a run that
    started alone drops to one thread when a second training starts beside it, instead of slowing down
    several times, and takes the core back when it is free again."""

    name = "auto_threads"

    def __init__(self, interval: float = 10.0, governor: ThreadGovernor | None = None):
        self.governor = governor or ThreadGovernor(interval)

    def on_step(self, trainer) -> None:
        threads = self.governor.update()
        if threads is not None:
            log.info("threads=auto: now %d torch thread(s), the cores other processes leave free", threads)


def build_callbacks(callbacks: Iterable[Callback] | None, stop_at: Mapping[str, Any] | None) -> CallbackList:
    """The user's callbacks, then the built-in :class:`StopAt` when ``stop_at`` is set."""
    cbs = list(callbacks or [])
    if stop_at:
        cbs.append(StopAt(stop_at))
    return CallbackList(cbs)
