"""Experiment 0: is a dual architecture (ARMT + coprocessor + learned memory fusion) worth it?

    python scripts/experiment_zero.py                        # the full grid (rlmem/conf/experiment_zero.yaml)
    python scripts/experiment_zero.py smoke=true hydra.run.dir=/tmp/e0   # a quick check that it all runs

Trains A = armt, B = armt_unified (deeper, parameter-matched to C), C = darmt and C' = darmt with naive
fusion on the same budget and seeds, on retrieval (assoc_recall) and reasoning (babi, hops 2 and 3). Writes
into the run dir ``results.csv`` (one row per run), ``results.md`` (mean +- std accuracy per model and task,
parameter counts, tokens/s, ending with the VERDICT line) and ``runs/<model>-<task>-seed<n>/`` (each an
ordinary train_lm run: rerunning the command resumes an interrupted grid).

Decision rule: C beats B on reasoning (mean over the reasoning tasks) by more than ``margin`` AND C keeps A's
retrieval accuracy (C's mean >= A's mean - A's std) -> ``VERDICT: dual architecture validated``, else
``VERDICT: unified is as good``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rlmem  # noqa: F401  (registers the memory systems)
from rlmem.commands.lm_grid import grid_runs, mean_std, summarize, train_grid, write_csv
from rlmem.lm_training import ConfigError, setup

log = logging.getLogger("experiment_zero")

VALIDATED, UNIFIED = "VERDICT: dual architecture validated", "VERDICT: unified is as good"


def per_seed_mean(rows: Sequence[Mapping[str, Any]], model: str, tasks: Sequence[str]) -> list[float]:
    """The model's accuracy averaged over ``tasks``, one value per seed."""
    by_seed: dict[int, list[float]] = {}
    for row in rows:
        if row["model"] == model and row["task"] in tasks:
            by_seed.setdefault(row["seed"], []).append(float(row["eval_accuracy"]))
    return [sum(v) / len(v) for _, v in sorted(by_seed.items())]


def verdict(rows: Sequence[Mapping[str, Any]], retrieval: Sequence[str], reasoning: Sequence[str],
            margin: float) -> tuple[str, list[str]]:
    """The decision rule on the grid's rows (models named A, B, C): the VERDICT line and the reasons."""
    reason = {m: mean_std(per_seed_mean(rows, m, reasoning)) for m in ("B", "C")}
    retr = {m: mean_std(per_seed_mean(rows, m, retrieval)) for m in ("A", "C")}
    gain = reason["C"][0] - reason["B"][0]
    beats = gain > margin
    keeps = retr["C"][0] >= retr["A"][0] - retr["A"][1]
    why = [
        f"reasoning: C {reason['C'][0]:.3f} vs B {reason['B'][0]:.3f}: C - B = {gain:+.3f} "
        f"({'more' if beats else 'not more'} than the margin {margin:.3f})",
        f"retrieval: C {retr['C'][0]:.3f} vs A {retr['A'][0]:.3f} +- {retr['A'][1]:.3f}: "
        f"C {'keeps' if keeps else 'does not keep'} A's accuracy (within one std)",
    ]
    return (VALIDATED if beats and keeps else UNIFIED), why


def results_markdown(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str], tasks: Sequence[str],
                     seeds: Sequence[int], train: Mapping[str, Any], wall_seconds: float, retrieval: Sequence[str],
                     reasoning: Sequence[str], margin: float) -> str:
    acc = summarize(rows)
    models = list(dict.fromkeys(row["model"] for row in rows))
    first = {m: next(r for r in rows if r["model"] == m) for m in models}
    speed = {m: mean_std([float(r["tokens_per_s"]) for r in rows if r["model"] == m])[0] for m in models}
    lines = [
        "# Experiment 0",
        "",
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {train['steps']} steps of batch {train['batch_size']} "
        f"per run, {len(rows)} runs, {wall_seconds / 60:.1f} min wall. Eval accuracy, mean +- std over seeds.",
        "",
        "| model | parameters | tokens/s | " + " | ".join(tasks) + " |",
        "|---|---:|---:|" + "---:|" * len(tasks),
    ]
    for m in models:
        cells = [f"{acc[m, t][0]:.3f} +- {acc[m, t][1]:.3f}" for t in tasks]
        lines.append(f"| {labels.get(m, m)} | {int(first[m]['parameters']):,} | {speed[m]:,.0f} | "
                     + " | ".join(cells) + " |")
    chance = {t: next(float(r["chance_accuracy"]) for r in rows if r["task"] == t) for t in tasks}
    lines += ["", "Chance: " + ", ".join(f"{t} {chance[t]:.3f}" for t in tasks) + "."]
    line, why = verdict(rows, retrieval, reasoning, margin)
    lines += ["", *[f"- {w}" for w in why], "", line]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="experiment_zero")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    train = {**c["train"], **(c["smoke_train"] if c["smoke"] else {})}
    seeds = list(c["seeds"])
    for role in ("A", "B", "C"):
        if role not in c["models"]:
            raise SystemExit(f"experiment_zero: models must include A, B and C (the decision rule compares them); "
                             f"got {list(c['models'])}")
    for name in (*c["retrieval_tasks"], *c["reasoning_tasks"]):
        if name not in c["tasks"]:
            raise SystemExit(f"experiment_zero: task {name!r} of retrieval_tasks/reasoning_tasks is not in tasks "
                             f"({list(c['tasks'])})")
    try:
        runs = grid_runs(c["models"], c["tasks"], seeds, train)
    except ConfigError as err:
        raise SystemExit(f"experiment_zero: invalid configuration: {err}") from None
    first: dict[str, Any] = {}
    for r in runs:
        first.setdefault(r.model, r)
    params = {m: sum(p.numel() for p in setup(r.cfg)[2].parameters()) for m, r in first.items()}
    log.info("parameters: %s", ", ".join(f"{c['labels'].get(m, m)} {n:,}" for m, n in params.items()))
    t0 = time.perf_counter()
    rows = train_grid(runs, out_dir, workers=int(c["workers"]))
    write_csv(rows, out_dir / "results.csv")
    md = results_markdown(rows, c["labels"], list(c["tasks"]), seeds, train, time.perf_counter() - t0,
                          c["retrieval_tasks"], c["reasoning_tasks"], float(c["margin"]))
    (out_dir / "results.md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
