"""Capacity benchmark: MQAR accuracy vs the number of stored key-value pairs, per memory system.

    python scripts/bench_capacity.py                              # rlmem/conf/bench_capacity.yaml
    python scripts/bench_capacity.py smoke=true hydra.run.dir=/tmp/cap   # a quick check that it all runs

Every model of the config trains on assoc_recall once per ``n_pairs`` value (same sequence length, budget
and seeds). Writes into the run dir ``capacity.csv`` (one row per run), ``capacity.md`` (accuracy per model
and n_pairs, mean over seeds, with parameter counts) and ``capacity.png`` (accuracy vs n_pairs, log2 axis),
plus ``runs/<model>-pairs<n>-seed<s>/`` (ordinary train_lm runs: rerunning resumes an interrupted grid).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rlmem  # noqa: F401  (registers the memory systems)
from rlmem.commands.lm_grid import grid_runs, summarize, train_grid, write_csv
from rlmem.lm_training import ConfigError

log = logging.getLogger("bench_capacity")


def capacity_markdown(rows: list[dict[str, Any]], n_pairs: list[int], seeds: list[int], train: dict[str, Any],
                      task: dict[str, Any], wall_seconds: float) -> str:
    acc = summarize(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    params = {m: next(int(r["parameters"]) for r in rows if r["model"] == m) for m in models}
    chance = next(float(r["chance_accuracy"]) for r in rows)
    lines = [
        "# Capacity: assoc_recall accuracy vs stored pairs",
        "",
        f"seq_len {task['seq_len']}, vocab_size {task['vocab_size']} (chance {chance:.3f}), every pair queried; "
        f"{train['steps']} steps of batch {train['batch_size']}, seeds {', '.join(map(str, seeds))} (mean over "
        f"seeds); {len(rows)} runs in {wall_seconds / 60:.1f} min wall.",
        "",
        "| model | parameters | " + " | ".join(f"{n} pairs" for n in n_pairs) + " |",
        "|---|---:|" + "---:|" * len(n_pairs),
    ]
    for m in models:
        lines.append(f"| {m} | {params[m]:,} | " + " | ".join(f"{acc[m, f'pairs{n}'][0]:.3f}" for n in n_pairs) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], n_pairs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    acc = summarize(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["model"] for r in rows):
        ax.plot(n_pairs, [acc[m, f"pairs{n}"][0] for n in n_pairs], marker="o", label=m)
    ax.axhline(float(rows[0]["chance_accuracy"]), color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_pairs, [str(n) for n in n_pairs])
    ax.set_xlabel("stored key-value pairs")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("assoc_recall capacity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="pkg://rlmem.conf", config_name="bench_capacity")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    train = {**c["train"], **(c["smoke_train"] if c["smoke"] else {})}
    n_pairs = list(c["n_pairs"])
    tasks = {f"pairs{n}": {**c["task"], "n_pairs": n} for n in n_pairs}
    try:
        runs = grid_runs(c["models"], tasks, list(c["seeds"]), train)
    except ConfigError as err:
        raise SystemExit(f"bench_capacity: invalid configuration: {err}") from None
    t0 = time.perf_counter()
    rows = train_grid(runs, out_dir, workers=int(c["workers"]))
    write_csv(rows, out_dir / "capacity.csv")
    md = capacity_markdown(rows, n_pairs, list(c["seeds"]), train, c["task"], time.perf_counter() - t0)
    (out_dir / "capacity.md").write_text(md)
    plot(rows, n_pairs, out_dir / "capacity.png")
    print(md, end="")


if __name__ == "__main__":
    main()
