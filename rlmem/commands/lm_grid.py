"""A grid of LM trainings (models x tasks x seeds) run into one directory, then tabulated.

Each run is an ordinary :func:`rlmem.lm_training.run` in ``<out_dir>/runs/<name>``, run by the suites'
orchestrator (:func:`rlmem.suite.execute`) as ``python -m rlmem.commands.lm_grid '<config as JSON>' <run dir>``:
``workers`` runs at a time, each in its own process (one torch thread by default; its log in
``runs/<name>/train_lm.log``, its output in ``runs/<name>/output.log``), a line logged as each finishes. A grid
that is stopped (Ctrl-C, SIGTERM: the runs checkpoint) and started again resumes every unfinished run and
reports finished ones without retraining them; a grid dir started with other settings is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmem.interrupts import TrainingInterrupted
from rlmem.lm_training import run, setup
from rlmem.suite import execute

log = logging.getLogger(__name__)

#: columns of a grid's results.csv, one row per run
CSV_COLUMNS = ("model", "task", "seed", "eval_accuracy", "chance_accuracy", "parameters", "tokens_per_s",
               "steps", "wall_seconds", "run_dir")


@dataclasses.dataclass(frozen=True, eq=False)
class GridRun:
    """One training of the grid: ``model`` and ``task`` are the row labels, ``cfg`` the full train_lm config.

    It is a run of :func:`rlmem.suite.execute` (``name``, ``group``, ``script``, ``run_dir``, ``arguments``,
    ``command``), so grids and benchmark suites share one orchestrator."""

    model: str
    task: str
    seed: int
    cfg: Mapping[str, Any]

    group = "grid"
    script = "train_lm"  # what rlmem.suite.finished() reads: metrics.json is written once, at the end

    @property
    def name(self) -> str:
        return f"{self.model}-{self.task}-seed{self.seed}"

    @property
    def label(self) -> str:
        return self.model

    def run_dir(self, out_dir: Path) -> Path:
        return Path(out_dir) / "runs" / self.name

    def arguments(self) -> list[str]:
        """The run's settings (recorded in its dir: a rerun with other settings is refused)."""
        return [json.dumps(self.cfg, sort_keys=True)]

    def command(self, out_dir: Path) -> list[str]:
        return [sys.executable, "-m", __name__, *self.arguments(), str(self.run_dir(out_dir))]


def grid_runs(models: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Mapping[str, Any]],
              seeds: Sequence[int], train: Mapping[str, Any]) -> list[GridRun]:
    """Every model on every task with every seed; ``train`` holds the TrainConfig fields shared by all runs.

    Every config is validated here (a bad knob fails before any training)."""
    if not models or not tasks or not seeds:
        raise ValueError(f"a grid needs at least one model, task and seed; got models={list(models)}, "
                         f"tasks={list(tasks)}, seeds={list(seeds)}")
    runs = []
    for model_name, model in models.items():
        for task_name, task in tasks.items():
            for seed in seeds:
                cfg = {**train, "seed": seed, "model": dict(model), "task": dict(task), "progress_bar": False}
                cfg.setdefault("eval_seed", 1000)
                if cfg["eval_seed"] == seed:
                    cfg["eval_seed"] = seed + 1000
                setup(cfg)  # raises ConfigError naming the bad value
                runs.append(GridRun(model_name, task_name, seed, cfg))
    return runs


def train_grid(runs: Iterable[GridRun], out_dir: str | Path, workers: int = 1) -> list[dict[str, Any]]:
    """Train every run (``workers`` processes at a time, through :func:`rlmem.suite.execute`) and return one row
    per run, in the order of ``runs``, with the :data:`CSV_COLUMNS`. A failed run raises naming its log."""
    runs, out_dir = list(runs), Path(out_dir)
    failed = execute(runs, out_dir, jobs=max(1, int(workers)))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} grid runs failed; see "
                           + ", ".join(str(r.run_dir(out_dir) / "output.log") for r in failed))
    rows = []
    for r in runs:
        metrics = json.loads((r.run_dir(out_dir) / "metrics.json").read_text())
        row = {k: metrics[k] for k in CSV_COLUMNS if k in metrics}
        rows.append({**row, "model": r.model, "task": r.task, "seed": r.seed, "run_dir": f"runs/{r.name}"})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """One grid run: ``python -m rlmem.commands.lm_grid '<train_lm config as JSON>' <run dir>``."""
    cfg_json, run_dir = list(sys.argv[1:] if argv is None else argv)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train_lm.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler, logging.StreamHandler()])
    try:
        run(json.loads(cfg_json), run_dir, progress=False)
    except TrainingInterrupted as stop:  # the grid was stopped: the run checkpointed, a rerun resumes it
        logging.getLogger(__name__).warning("%s", stop)
        sys.exit(stop.exit_code)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def summarize(rows: Sequence[Mapping[str, Any]], key: str = "eval_accuracy") -> dict[tuple[str, str], tuple[float, float]]:
    """``{(model, task): (mean, std) of key over seeds}``."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"]), []).append(float(row[key]))
    return {k: mean_std(v) for k, v in groups.items()}


if __name__ == "__main__":
    main()
