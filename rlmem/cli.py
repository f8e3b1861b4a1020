"""What the training scripts share around a run: clear one-line errors, the Ctrl-C message that says how to
resume, and Hydra multiruns that go on past a failed job and say which ones failed.

- A bad config value stops before training with one line naming the key (exit code 2); a run stopped by
  a non-finite value says where and which checkpoint is kept (exit code 1); an interrupted run says how
  to resume (exit code 128 + signal number).
- In a multirun (``-m``) a failed job writes ``error.txt`` in its own dir and the sweep goes on;
  :class:`ReportFailedJobs` (a Hydra callback in the scripts' configs) lists the failed jobs at the end
  and makes the sweep exit with code 1.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from rlmem.interrupts import TrainingInterrupted

log = logging.getLogger("rlmem")

#: errors that mean "this config cannot run" (raised while building, before any training)
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, ImportError)
ERROR_FILE = "error.txt"


class Trainer(Protocol):
    def train(self) -> dict[str, Any]: ...


def run_job(script: str, cfg: DictConfig, build: Callable[[DictConfig, Path], Trainer]) -> dict[str, Any] | None:
    """Build (config errors are reported in one line) and train; returns the metrics, or None for a failed
    job of a multirun. Call it from a ``@hydra.main`` function."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        try:
            trainer = build(cfg, run_dir)
        except CONFIG_ERRORS as err:
            return _fail(f"{script}: invalid configuration: {_message(err)}", run_dir, multirun, code=2)
        try:
            return trainer.train()
        except FloatingPointError as err:
            return _fail(f"{script}: {_message(err)}", run_dir, multirun, code=1)
    except TrainingInterrupted as stop:
        log.warning("%s: stopped by %s at %s; checkpoint saved to %s; resume with: %s", script,
                    signal.Signals(stop.signum).name, stop.progress, stop.checkpoint, resume_command(run_dir))
        sys.exit(stop.exit_code)
    except Exception as err:  # a bug: the traceback goes to the log; a multirun goes on with the next job
        if not multirun:
            raise
        log.exception("%s: job failed", script)
        return _fail(f"{script}: {type(err).__name__}: {_message(err)}", run_dir, multirun, code=1)


def _message(err: BaseException) -> str:
    return str(err.args[0]) if len(err.args) == 1 else str(err)


def _fail(message: str, run_dir: Path, multirun: bool, code: int) -> None:
    log.error(message)
    if not multirun:
        sys.exit(code)
    overrides = " ".join(HydraConfig.get().overrides.task)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(f"{overrides}\n{message}\n")
    return None


def resume_command(run_dir: Path) -> str:
    """The command line of this run with ``hydra.run.dir`` pinned to ``run_dir`` (``resume`` is true by
    default, so rerunning it continues from the checkpoint)."""
    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.split("=", 1)[0].lstrip("+~") in ("resume", "hydra.run.dir")]
    return shlex.join([*_invocation(), *overrides, f"hydra.run.dir={run_dir}"])


def _invocation() -> list[str]:
    """How this command was started: ``python -m rlmem.commands.<name>``, a console script, or a script."""
    started = Path(sys.argv[0])
    if started.suffix == ".py" and started.resolve().parent == Path(__file__).resolve().parent / "commands":
        return [Path(sys.executable).name, "-m", f"rlmem.commands.{started.stem}"]
    if started.suffix != ".py" and started.name.startswith("rlmem-"):
        return [started.name]  # a console script on the PATH
    return [Path(sys.executable).name, sys.argv[0]]


class ReportFailedJobs(Callback):
    """Hydra callback: after a multirun, list the jobs that failed (their ``error.txt``) and exit with 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = [p.parent for p in sweep_dir.glob("*/.hydra")]
        failed = sorted((p for p in sweep_dir.glob(f"*/{ERROR_FILE}")), key=lambda p: p.parent.name)
        if not failed:
            log.info("multirun: all %d jobs finished (%s)", len(jobs), sweep_dir)
            return
        lines = [f"multirun: {len(failed)} of {len(jobs)} jobs failed ({sweep_dir}):"]
        for path in failed:
            overrides, _, message = path.read_text().partition("\n")
            lines.append(f"  job {path.parent.name} [{overrides}]: {message.strip()}")
        log.error("\n".join(lines))
        sys.exit(1)
