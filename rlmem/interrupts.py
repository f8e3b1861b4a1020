"""Stop a training run cleanly on Ctrl-C or SIGTERM: checkpoint at the next safe point, exit.

The trainers poll :attr:`GracefulStop.requested` at their safe points (RecurrentPPO: between collection
steps and between the minibatches of an update, whose partial update it discards; the LM trainer: after
every step), save a checkpoint there and raise :class:`TrainingInterrupted`. ``on_request`` is called at
once with the signal (the trainers log ``stopping: ...``). A second signal stops at once
(``KeyboardInterrupt``), for a step that hangs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by a trainer after it saved a checkpoint because a stop was requested."""

    def __init__(self, signum: int, progress: str, checkpoint: Path):
        self.signum, self.progress, self.checkpoint = signum, progress, Path(checkpoint)
        super().__init__(f"{signal.Signals(signum).name} at {progress}: checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + self.signum


class GracefulStop:
    """Context manager: while active, SIGINT and SIGTERM set :attr:`requested` instead of stopping.

    SIGINT is taken over only where Python handles it by default: a process started with SIGINT ignored
    (a background job of a non-interactive shell) keeps ignoring it. Outside the main thread (where
    signal handlers cannot be installed) this does nothing.
    """

    def __init__(self, on_request: Callable[[int, str], None] | None = None):
        self.requested: int | None = None
        self.on_request = on_request
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        if self.on_request is not None:
            self.on_request(signum, signal.Signals(signum).name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._handle)
        return self

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
