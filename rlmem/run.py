"""One run lifecycle under both trainers (RL: :class:`rlmem.ppo.RecurrentPPO`, LM: :class:`rlmem.lm_training.LMTrainer`).

A run lives in its ``run_dir``:

- ``checkpoints/last.pt``: the one checkpoint, written atomically (:func:`rlmem.run_io.save_checkpoint`),
  weights-only (loaded with ``torch.load(weights_only=True)``: a checkpoint never runs code). Every
  checkpoint holds ``identity`` (the settings a resumed run must share; a mismatch is refused naming the keys
  that differ), ``progress`` (the trainer's counter: frames or steps), ``wall_seconds``, ``callbacks`` (their
  state) and the trainer's own entries (weights, optimizer, RNG, ...);
- ``metrics.json`` (atomic), TensorBoard events (purged after the checkpoint's step on resume, so curves
  stay one line), ``progress.csv`` (the same scalars, one row per logged step, also purged on resume).

``resume``: ``True`` continues from ``checkpoints/last.pt`` if there is one (a finished run is reported, not
retrained); ``False`` starts fresh and refuses a run dir that already holds a run; a path resumes from that
checkpoint. Ctrl-C / SIGTERM (:mod:`rlmem.interrupts`) are logged at once (``stopping: ...``) and the trainer
checkpoints at its next safe point. Progress: a bar on a terminal; everywhere (log files included) a line
with the percentage done, the rate and the ETA every ``summary_interval`` seconds and at every evaluation.
``verbose``: 0 prints nothing; 1 (the default) shows the bar and, when nothing configured logging (the Python
API), prints rlmem's log lines on stderr as the command line does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from rlmem.callbacks import CallbackList
from rlmem.interrupts import GracefulStop
from rlmem.run_io import _atomic_write, flatten, load_checkpoint, run_dir_holds_a_run, save_checkpoint, write_metrics

log = logging.getLogger(__name__)


class RunDirError(FileExistsError):
    """A run dir that holds another run (``resume=false``) or a run with other settings."""


class SettingsDiffer(RunDirError, ValueError):
    """A checkpoint written with other settings than the run's (the message names the keys that differ)."""


def identity_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["agent.hidden_size: 8 -> 16", "env.delay: (unset) -> 5"]``: the flattened keys whose values differ."""
    a, b = flatten(stored), flatten(current)
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def check_identity(stored: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`RunDirError` naming the keys that differ between a checkpoint's identity and the run's."""
    diff = identity_diff(stored, current)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise SettingsDiffer(f"resume: checkpoint {path} was written with other settings ({shown}; checkpoint -> "
                          "now); use another run dir (hydra.run.dir=...) or the checkpoint's settings")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class CSVLog:
    """``progress.csv``: the logged scalars, one row per step (columns added as new scalars appear).

    Rows after ``purge_after`` (the step a run resumes from) are dropped, as TensorBoard's events are."""

    def __init__(self, path: Path, step_key: str, purge_after: int | None):
        self.path, self.step_key = Path(path), step_key
        self.rows: list[dict[str, Any]] = []
        self.fields: list[str] = [step_key]
        if purge_after is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [step_key])
                for row in reader:
                    try:
                        if int(float(row[step_key])) <= purge_after:
                            self.rows.append(row)
                    except (KeyError, ValueError):
                        continue
        self.dirty = purge_after is not None  # rewritten without the purged rows

    def add(self, step: int, values: Mapping[str, float]) -> None:
        if not self.rows or str(self.rows[-1][self.step_key]) != str(step):
            self.rows.append({self.step_key: step})
        for key, value in values.items():
            if key not in self.fields:
                self.fields.append(key)
            self.rows[-1][key] = value
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        text = buf.getvalue().encode()
        _atomic_write(self.path, lambda f: f.write(text))
        self.dirty = False


class Run:
    """The lifecycle of one run in ``run_dir`` (see the module docstring); the trainers drive it.

    ``identity``: the settings a resumed run must share with its checkpoint; ``unit``: ``"frames"`` (RL) or
    ``"steps"`` (LM), the counter of TensorBoard, ``progress.csv`` and the progress line.
    """

    def __init__(self, run_dir: str | Path, *, identity: Mapping[str, Any], resume: bool | str | Path = True,
                 unit: str = "frames", verbose: int = 1, progress_bar: bool = True, summary_interval: float = 30.0,
                 callbacks: CallbackList | None = None, csv: bool = True,
                 legacy: Callable[[Mapping[str, Any]], tuple[dict[str, Any], int]] | None = None):
        if not isinstance(resume, (bool, str, Path)):
            raise ValueError(f"resume must be true, false or a checkpoint path, got {resume!r}")
        if verbose not in (0, 1, 2) or isinstance(verbose, bool):
            raise ValueError(f"verbose must be 0 (silent), 1 (progress and summary) or 2, got {verbose!r}")
        self.run_dir, self.identity, self.resume, self.unit = Path(run_dir), dict(identity), resume, unit
        self.verbose, self.progress_bar, self.summary_interval = verbose, progress_bar, summary_interval
        self.callbacks = callbacks if callbacks is not None else CallbackList()
        self.csv_enabled, self.legacy = csv, legacy
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.metrics_path = self.run_dir / "metrics.json"
        self.csv_path = self.run_dir / "progress.csv"
        self.last_checkpoint: int | None = None  # progress of the last checkpoint written or loaded
        self.writer = None
        self.csv: CSVLog | None = None
        self.stop: GracefulStop | None = None
        self.bar: tqdm | None = None
        self._total = self._start = 0
        self._t_start = self._last_summary = 0.0

    # --- run dir ---------------------------------------------------------------------------
    def restore(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (identity checked), or None to start fresh; refuses a run dir that
        holds a run when ``resume`` is false."""
        if isinstance(self.resume, (str, Path)):
            path = Path(self.resume)
            if not path.exists():
                raise FileNotFoundError(f"resume: no checkpoint at {path}")
        elif self.resume and self.checkpoint_path.exists():
            path = self.checkpoint_path
        elif not self.resume and run_dir_holds_a_run(self.run_dir):
            raise RunDirError(f"{self.run_dir} already holds a run; resume=true continues it (or reports it if "
                              "finished), or choose another run dir (hydra.run.dir=...)")
        else:
            return None
        ckpt = load_checkpoint(path)
        if ("identity" not in ckpt or "progress" not in ckpt) and self.legacy is not None:
            try:  # written before the run lifecycle was shared
                ckpt["identity"], ckpt["progress"] = self.legacy(ckpt)
            except KeyError:
                pass
        if "identity" not in ckpt or "progress" not in ckpt:
            raise RunDirError(f"resume: {path} is not a checkpoint this trainer wrote (no identity/progress "
                              "entries); start a new run dir")
        check_identity(ckpt["identity"], self.identity, path)
        self.callbacks.load_state_dict(ckpt.get("callbacks", {}))
        self.last_checkpoint = ckpt["progress"]
        log.info("resuming from %s at %s=%d", path, self.unit, ckpt["progress"])
        return ckpt

    def kept_checkpoint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {self.checkpoint_path} ({self.unit}={self.last_checkpoint}) is kept"

    def save(self, trainer, progress: int, payload: Mapping[str, Any], wall_seconds: float) -> bool:
        """Write the checkpoint (the scalars logged so far first); returns False if a callback ends the run."""
        self.flush()
        save_checkpoint(self.checkpoint_path, {**payload, "identity": self.identity, "progress": progress,
                                               "wall_seconds": wall_seconds,
                                               "callbacks": self.callbacks.state_dict()})
        self.last_checkpoint = progress
        return self.callbacks.on_checkpoint(trainer, self.checkpoint_path)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        write_metrics(self.metrics_path, metrics)

    # --- a training session ----------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, start: int, total: int, desc: str, writer=None) -> Iterator[Run]:
        """TensorBoard (purged after ``start``), ``progress.csv``, the stop signals, the bar and console logs.
        ``writer``: another object with ``add_scalar`` (and ``flush``) instead of a TensorBoard writer."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start, self._total = start, total
        self._t_start = self._last_summary = time.perf_counter()
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            # purge events a killed run wrote after its checkpoint (or all, when starting over)
            self.writer = SummaryWriter(str(self.run_dir), purge_step=start + 1 if start else 0)
        else:
            self.writer = writer
        self.csv = CSVLog(self.csv_path, self.unit, start if start else None) if self.csv_enabled else None
        show_bar = self.verbose >= 1 and self.progress_bar and sys.stderr.isatty()
        with contextlib.ExitStack() as stack:
            self.stop = stack.enter_context(GracefulStop(on_request=self._stopping))
            stack.enter_context(logging_redirect_tqdm())
            self.bar = stack.enter_context(tqdm(total=total, initial=start, unit=self.unit, desc=desc,
                                                disable=not show_bar, dynamic_ncols=True))
            try:
                yield self
            finally:
                self.flush()
                if writer is None:
                    self.writer.close()
                self.writer = self.csv = None

    def console(self) -> contextlib.AbstractContextManager:
        """Around a trainer's ``train()``: with ``verbose`` >= 1 and no logging configured (the Python API),
        rlmem's INFO lines go to stderr as the command line's do; with ``verbose=0`` nothing is added."""
        return _console_logging(self.verbose)

    def _stopping(self, signum: int, name: str) -> None:
        log.warning("stopping: %s received, checkpointing at the next safe point (a second one stops at once)", name)

    @property
    def stop_requested(self) -> int | None:
        return None if self.stop is None else self.stop.requested

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if self.csv is not None:
            self.csv.add(step, {k: float(v) for k, v in values.items()})

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()
        if self.csv is not None:
            self.csv.flush()

    def advance(self, n: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def progress_line(self, current: int) -> str:
        """``12,288/50,000 frames (25%) 1,234 frames/s ETA 0:31``."""
        elapsed = time.perf_counter() - self._t_start
        rate = (current - self._start) / elapsed if elapsed > 0 else float("nan")
        left = max(self._total - current, 0)
        eta = left / rate if rate > 0 else float("nan")
        pct = 100.0 * current / self._total if self._total else 100.0
        return f"{current:,}/{self._total:,} {self.unit} ({pct:.0f}%) {rate:,.0f} {self.unit}/s ETA {format_duration(eta)}"

    def summary_due(self) -> bool:
        return time.perf_counter() - self._last_summary >= self.summary_interval

    def log_summary(self, current: int, details: str) -> None:
        log.info("%s %s", self.progress_line(current), details)
        self._last_summary = time.perf_counter()


@contextlib.contextmanager
def _console_logging(verbose: int) -> Iterator[None]:
    """With ``verbose`` >= 1 and no logging configured (the Python API), rlmem's INFO lines go to stderr as
    the command line's do; with ``verbose=0`` nothing is added."""
    rlmem_log, root = logging.getLogger("rlmem"), logging.getLogger()
    if verbose < 1 or root.handlers or rlmem_log.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = rlmem_log.level
    rlmem_log.addHandler(handler)
    rlmem_log.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    try:
        yield
    finally:
        rlmem_log.removeHandler(handler)
        rlmem_log.setLevel(level)
