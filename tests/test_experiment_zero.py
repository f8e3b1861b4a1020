"""scripts/experiment_zero.py, scripts/bench_capacity.py and the grid runner they share."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlmem.commands.lm_grid import grid_runs, mean_std, summarize
from rlmem.lm_training import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script(name: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def rows_for(acc: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Grid rows from ``{model: {task: [accuracy per seed]}}``."""
    return [{"model": m, "task": t, "seed": s, "eval_accuracy": a}
            for m, tasks in acc.items() for t, accs in tasks.items() for s, a in enumerate(accs)]


RETRIEVAL, REASONING = ["retrieval"], ["hops2", "hops3"]


@pytest.mark.parametrize(
    ("acc", "expected"),
    [
        # C beats B on reasoning by 0.10 > 0.05 and matches A on retrieval: validated
        ({"A": {"retrieval": [0.9, 0.8, 0.7]}, "C": {"retrieval": [0.8, 0.8, 0.8], "hops2": [0.6] * 3, "hops3": [0.4] * 3},
          "B": {"hops2": [0.5] * 3, "hops3": [0.3] * 3}}, "validated"),
        # a gain of 0.04 on reasoning is not enough
        ({"A": {"retrieval": [0.8] * 3}, "C": {"retrieval": [0.8] * 3, "hops2": [0.54] * 3, "hops3": [0.34] * 3},
          "B": {"hops2": [0.5] * 3, "hops3": [0.3] * 3}}, "unified"),
        # C wins reasoning but loses more than one std of A's retrieval (A: 0.8 +- 0.1, C: 0.69)
        ({"A": {"retrieval": [0.9, 0.8, 0.7]}, "C": {"retrieval": [0.69] * 3, "hops2": [0.9] * 3, "hops3": [0.9] * 3},
          "B": {"hops2": [0.5] * 3, "hops3": [0.3] * 3}}, "unified"),
        # the reasoning score averages the tasks: +0.2 on hops2, -0.08 on hops3 is +0.06 overall
        ({"A": {"retrieval": [0.8] * 3}, "C": {"retrieval": [0.8] * 3, "hops2": [0.7] * 3, "hops3": [0.22] * 3},
          "B": {"hops2": [0.5] * 3, "hops3": [0.3] * 3}}, "validated"),
    ],
)
def test_decision_rule(acc, expected):
    e0 = load_script("experiment_zero")
    line, why = e0.verdict(rows_for(acc), RETRIEVAL, REASONING, margin=0.05)
    assert line == (e0.VALIDATED if expected == "validated" else e0.UNIFIED), why
    assert len(why) == 2 and why[0].startswith("reasoning:") and why[1].startswith("retrieval:")


def test_mean_std_and_summary():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    summary = summarize(rows_for({"m": {"t": [0.2, 0.4]}}))
    assert summary["m", "t"] == pytest.approx((0.3, 0.1414213562373095))


def test_grid_rejects_bad_configs_before_training():
    train = {"steps": 2, "batch_size": 2}
    with pytest.raises(ConfigError, match="valid choices"):
        grid_runs({"x": {"memory": "nope"}}, {"t": {"name": "assoc_recall"}}, [0], train)
    with pytest.raises(ConfigError, match="hops"):
        grid_runs({"g": {"memory": "gru"}}, {"t": {"name": "babi", "hops": 4}}, [0], train)
    with pytest.raises(ValueError, match="at least one model, task and seed"):
        grid_runs({"g": {"memory": "gru"}}, {"t": {"name": "babi"}}, [], train)
    runs = grid_runs({"g": {"memory": "gru"}}, {"t": {"name": "babi"}}, [0, 1000], train)
    assert [r.name for r in runs] == ["g-t-seed0", "g-t-seed1000"]
    assert runs[1].cfg["eval_seed"] != runs[1].cfg["seed"]  # evaluation stays held out for every seed


@pytest.mark.slow  # trains every capacity model (~1 min)
def test_bench_capacity_smoke_writes_table_csv_and_png(tmp_path):
    proc = script("bench_capacity", "smoke=true", "n_pairs=[4,8]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "capacity.md").read_text()
    assert "| model | parameters | 4 pairs | 8 pairs |" in md
    for model in ("armt", "gru", "transformer", "mamba", "infinity"):
        assert f"| {model} |" in md
    with open(tmp_path / "capacity.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["task"] for r in rows} == {"pairs4", "pairs8"}
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # trains the three models on two tasks (~1-2 min)
def test_experiment_zero_smoke_writes_results_ending_with_the_verdict(tmp_path):
    proc = script("experiment_zero", "smoke=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    assert md.rstrip().splitlines()[-1] in ("VERDICT: dual architecture validated", "VERDICT: unified is as good")
    for label in ("A: armt", "B: armt_unified", "C: darmt", "C': darmt, naive fusion"):
        assert f"| {label} |" in md
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3 * 3  # models x tasks x seeds
    assert {r["task"] for r in rows} == {"retrieval", "reasoning_hops2", "reasoning_hops3"}
    # the parameter counts are printed before training; B is matched to C within 5%
    log = (tmp_path / "experiment_zero.log").read_text()
    counts = dict(re.findall(r"(A: armt|B: armt_unified|C: darmt) ([\d,]+)", log))
    assert set(counts) == {"A: armt", "B: armt_unified", "C: darmt"}, log[-2000:]
    b, c = (int(counts[k].replace(",", "")) for k in ("B: armt_unified", "C: darmt"))
    assert abs(b - c) / c < 0.05
    # a second run into the same dir reports the finished runs instead of retraining them
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoints/last.pt")}
    assert len(stamps) == 36
    again = script("experiment_zero", "smoke=true", f"hydra.run.dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "results.md").read_text().splitlines()[-1] == md.splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_grids_run_through_the_suite_orchestrator_skip_finished_runs_and_refuse_other_settings(tmp_path):
    from rlmem.commands.lm_grid import train_grid

    train = {"steps": 2, "batch_size": 2, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2}
    models = {"g": {"memory": "gru", "hidden_size": 8, "d_model": 8}}
    runs = grid_runs(models, {"c": {"name": "copy_memory"}}, [0, 1], train)
    rows = train_grid(runs, tmp_path, workers=2)
    assert [(r["model"], r["task"], r["seed"], r["steps"]) for r in rows] == [("g", "c", 0, 2), ("g", "c", 1, 2)]
    metrics = [tmp_path / "runs" / r.name / "metrics.json" for r in runs]
    assert all((tmp_path / "runs" / r.name / "output.log").exists() for r in runs)  # the orchestrator's files
    stamps = [m.stat().st_mtime_ns for m in metrics]
    assert train_grid(runs, tmp_path, workers=2) == rows  # finished runs are read back, not retrained
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    other = grid_runs(models, {"c": {"name": "copy_memory"}}, [0], {**train, "steps": 3})
    with pytest.raises(ValueError, match="was started with other settings"):
        train_grid(other, tmp_path)
