"""A grid of LM trainings (models x tasks x seeds) run into one directory, then tabulated.

Each run is an ordinary :func:`rlmem.lm_training.run` in ``<out_dir>/runs/<name>``, so a grid that is
stopped (Ctrl-C, kill) and started again resumes every unfinished run and reports finished ones without
retraining them. Runs go ``workers`` at a time in separate processes (one torch thread each by default; each writes its
log to ``runs/<name>/train_lm.log``, and the grid logs a line as each run finishes).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rlmem.lm_training import run, setup

log = logging.getLogger(__name__)

#: columns of a grid's results.csv, one row per run
CSV_COLUMNS = ("model", "task", "seed", "eval_accuracy", "chance_accuracy", "parameters", "tokens_per_s",
               "steps", "wall_seconds", "run_dir")


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One training of the grid: ``model`` and ``task`` are the row labels, ``cfg`` the full train_lm config."""

    model: str
    task: str
    seed: int
    cfg: Mapping[str, Any]

    @property
    def name(self) -> str:
        return f"{self.model}-{self.task}-seed{self.seed}"


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


def _train_one(run_: GridRun, out_dir: str, log_to_file: bool = False) -> dict[str, Any]:
    run_dir = Path(out_dir) / "runs" / run_.name
    root, handler = logging.getLogger(), None
    if log_to_file:  # in a worker process: the run's log lines go to its own train_lm.log
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train_lm.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        metrics = run(run_.cfg, run_dir, progress=False)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    row = {k: metrics[k] for k in CSV_COLUMNS if k in metrics}
    return {**row, "model": run_.model, "task": run_.task, "seed": run_.seed, "run_dir": f"runs/{run_.name}"}


def train_grid(runs: Iterable[GridRun], out_dir: str | Path, workers: int = 1) -> list[dict[str, Any]]:
    """Train every run (``workers`` processes at a time; 1 = in this process) and return one row per run, in
    the order of ``runs``, with the :data:`CSV_COLUMNS`."""
    runs = list(runs)
    out_dir = Path(out_dir)
    if workers <= 1:
        rows = []
        for i, r in enumerate(runs):
            log.info("run %d/%d: %s", i + 1, len(runs), r.name)
            rows.append(_train_one(r, str(out_dir)))
            log.info("%s: eval_accuracy=%.4f", r.name, rows[-1]["eval_accuracy"])
        return rows
    # spawn: a fresh interpreter per worker (forking a process that already ran torch is fragile)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, r, str(out_dir), True): i for i, r in enumerate(runs)}
        rows: list[dict[str, Any] | None] = [None] * len(runs)
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            rows[i] = future.result()
            log.info("%d/%d done: %s eval_accuracy=%.4f", done, len(runs), runs[i].name, rows[i]["eval_accuracy"])
        return rows


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
