"""The leaderboard of a suite: every memory system on every task, in normalized scores with confidence intervals.

Written for a suite whose config says ``leaderboard: true`` (``rlmem/conf/suite/leaderboard.yaml``), from the
rows of ``results.csv`` (:func:`rlmem.suite_report.result_row`):

- a task is a (group, env, knobs) of the suite; a run's score is its greedy eval return normalized by the
  env's own levels, ``(return - chance) / (optimal - chance)`` (:func:`rlmem.suite_report.score_bounds`;
  chance = the uniformly random policy's expected return): 0 = random, 1 = optimal. The return, not the
  success rate: a success is a whole episode at the optimal return, all-or-nothing on the card games,
  AssocRecall and the control envs, where the return also counts a partly right episode;
- per memory and task: the mean normalized score over seeds with a 95% bootstrap interval;
- the aggregate: the interquartile mean (IQM) of every run on the *core tasks* (those every memory of the
  leaderboard was run on) with a 95% stratified-bootstrap interval (:mod:`rlmem.stats`); a memory missing
  every run of a core task gets no aggregate (it would be over other tasks);
- cost: median frames/s over the memory's finished runs, parameters, memory MFLOPs per acting step;
- the largest DelayedCue delay solved: eval success >= the threshold in *every* seed run at that delay (a
  missing seed is not a success);
- a run that failed or is missing is left out (shown as ``-`` or counted in ``runs``), never scored as zero.

The text under the table is generated from these numbers (ranking, overlapping intervals, best per task).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlmem import stats
from rlmem.suite_report import _style, plot_horizon, score_bounds

#: the suite config key that asks for a leaderboard
SUITE_KEY = "leaderboard"
#: the env and knob of the memory-horizon column and plot
HORIZON_ENV, HORIZON_KNOB = "delayed_cue", "delay"
#: a normalized task mean below this is "at chance" in the generated text
AT_CHANCE = 0.1
CONFIDENCE, REPS, SEED = 0.95, 10_000, 0


@dataclass(frozen=True)
class Task:
    group: str
    env: str
    knobs: str
    script: str

    @property
    def label(self) -> str:
        return f"{self.env} {self.knobs}".strip(" -")


@dataclass
class Entry:
    """One memory's leaderboard row. ``scores: [seeds, tasks]`` normalized, NaN = not finished."""

    agent: str
    scores: np.ndarray
    planned: np.ndarray  # [seeds, tasks] bool: the suite ran (or meant to run) this seed on this task
    task_ci: list[stats.Interval]
    iqm: stats.Interval
    iqm_runs: tuple[int, int]  # (finished, planned) runs on the core tasks
    fps: float
    parameters: float
    mflops: float | None
    horizon: float | None  # largest delay solved in every seed (None: none)
    horizon_ran: bool  # a DelayedCue run of the memory finished


def tasks_of(rows: Sequence[Mapping[str, Any]]) -> list[Task]:
    return list(dict.fromkeys(Task(r["group"], r["env"], r["knobs"], r["script"]) for r in rows))


def bounds(task: Task) -> tuple[float, float] | None:
    """``(chance, optimal)`` of the task's greedy eval return (None: the env does not say)."""
    return score_bounds(task.script, task.env, task.knobs, "eval_return")


def normalized_score(row: Mapping[str, Any], levels: tuple[float, float] | None) -> float:
    """The row's normalized eval return; NaN when not finished or the env has no levels."""
    if row["status"] != "finished" or row.get("eval_return") in (None, "") or levels is None:
        return math.nan
    return float(stats.normalize(float(row["eval_return"]), *levels))


def core_tasks(rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task], agents: Sequence[str],
               levels: Mapping[Task, tuple[float, float] | None]) -> list[Task]:
    """The tasks every agent was planned on and whose env has levels: the aggregate's tasks."""
    planned = defaultdict(set)
    for r in rows:
        planned[(r["group"], r["env"], r["knobs"])].add(r["agent"])
    return [t for t in tasks if levels[t] is not None and set(agents) <= planned[(t.group, t.env, t.knobs)]]


def build(rows: Sequence[Mapping[str, Any]], threshold: float,
          mflops: Callable[[str], float | None] | None = None) -> tuple[list[Task], list[Task], list[Entry]]:
    """``(tasks, core tasks, entries ranked by IQM)`` from results rows; ``mflops(agent)``: its memory MFLOPs
    per acting step (None: unknown)."""
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    # a task is (group, env, knobs); runs of the reference have script sb3_reference: key without script
    keyed: dict[tuple[str, str, str], Task] = {}
    for r in rows:
        keyed.setdefault((r["group"], r["env"], r["knobs"]), Task(r["group"], r["env"], r["knobs"],
                                                                 "train_rl" if r["script"] == "sb3_reference"
                                                                 else r["script"]))
    tasks = list(keyed.values())
    levels = {t: bounds(t) for t in tasks}
    core = core_tasks(rows, tasks, agents, levels)
    seeds = sorted({r["seed"] for r in rows}, key=str)
    entries = []
    for agent in agents:
        mine = [r for r in rows if r["agent"] == agent]
        scores = np.full((len(seeds), len(tasks)), np.nan)
        planned = np.zeros_like(scores, dtype=bool)
        for r in mine:
            t = tasks.index(keyed[(r["group"], r["env"], r["knobs"])])
            i = seeds.index(r["seed"])
            planned[i, t] = True
            scores[i, t] = normalized_score(r, levels[tasks[t]])
        task_ci = [stats.stratified_bootstrap_ci(scores[:, [t]], stats.mean_score, REPS, CONFIDENCE, SEED)
                   for t in range(len(tasks))]
        cols = [tasks.index(t) for t in core]
        core_scores = scores[:, cols]
        complete = bool(cols) and not np.isnan(core_scores).all(0).any()
        iqm = (stats.stratified_bootstrap_ci(core_scores, stats.iqm, REPS, CONFIDENCE, SEED) if complete
               else stats.Interval(math.nan, math.nan, math.nan))
        done = [r for r in mine if r["status"] == "finished"]
        horizon, ran = delay_solved(mine, threshold)
        entries.append(Entry(agent, scores, planned, task_ci, iqm,
                             (int((~np.isnan(core_scores)).sum()), int(planned[:, cols].sum())),
                             float(np.median([float(r["fps"]) for r in done])) if done else math.nan,
                             float(np.median([float(r["parameters"]) for r in done if r.get("parameters") not in
                                              (None, "")])) if done else math.nan,
                             mflops(agent) if mflops is not None else None, horizon, ran))
    entries.sort(key=lambda e: (-e.iqm.value if not math.isnan(e.iqm.value) else math.inf))
    return tasks, core, entries


def delay_solved(rows: Sequence[Mapping[str, Any]], threshold: float) -> tuple[float | None, bool]:
    """``(largest DelayedCue delay at which every planned seed finished with eval_success >= threshold, whether
    any DelayedCue run of the agent finished)`` from one agent's rows."""
    by_delay: dict[float, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["env"] == HORIZON_ENV and r["knobs"].startswith(f"{HORIZON_KNOB}="):
            by_delay[float(r["knobs"].split("=")[1])].append(r)
    solved = [d for d, found in by_delay.items()
              if all(r["status"] == "finished" and r.get("eval_success") not in (None, "")
                     and float(r["eval_success"]) >= threshold - 1e-9 for r in found)]
    ran = any(r["status"] == "finished" for found in by_delay.values() for r in found)
    return (max(solved) if solved else None), ran


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(tasks: Sequence[Task], core: Sequence[Task], entries: Sequence[Entry]) -> str:
    """The markdown leaderboard: one row per memory (ranked by IQM)."""
    def head(t: Task) -> str:
        return t.label + ("" if t in core else " †")

    lines = ["| rank | memory | IQM [95% CI] | " + " | ".join(head(t) for t in tasks)
             + " | largest delay solved | frames/s (median) | parameters (median) | memory MFLOPs / step |",
             "|---:|---|---|" + "---|" * len(tasks) + "---:|---:|---:|---:|"]
    for rank, e in enumerate(entries, 1):
        cells = []
        for t, ci in enumerate(e.task_ci):
            if not e.planned[:, t].any():
                cells.append("")  # not part of this memory's runs
                continue
            n, planned = int((~np.isnan(e.scores[:, t])).sum()), int(e.planned[:, t].sum())
            missing = "" if n == planned else f" ({n}/{planned} runs)"
            cells.append(ci.text() + missing if n else f"- (0/{planned} runs)")
        iqm = e.iqm.text()
        if iqm != "-" and e.iqm_runs[0] < e.iqm_runs[1]:
            iqm += f" ({e.iqm_runs[0]}/{e.iqm_runs[1]} runs)"
        planned_cue = any(e.planned[:, t].any() for t, task in enumerate(tasks) if task.env == HORIZON_ENV)
        horizon = (_num(e.horizon, "g") if e.horizon is not None else "none" if e.horizon_ran
                   else "-" if planned_cue else "")
        lines.append(f"| {rank if not math.isnan(e.iqm.value) else '-'} | {e.agent} | {iqm} | " + " | ".join(cells)
                     + f" | {horizon} | {_num(e.fps, ',.0f')} | {_num(e.parameters, ',.0f')} | "
                       f"{_num(e.mflops, '.3g')} |")
    return "\n".join(lines)


def summary(tasks: Sequence[Task], core: Sequence[Task], entries: Sequence[Entry]) -> str:
    """"What this shows": sentences that follow from the numbers of the table."""
    ranked = [e for e in entries if not math.isnan(e.iqm.value)]
    out = []
    if not ranked:
        return "No memory has a finished run on every core task yet: no aggregate to rank."
    out.append(f"Ranked by IQM over the {len(core)} core tasks: "
               + ", ".join(f"{e.agent} {e.iqm.value:.2f}" for e in ranked) + ".")
    best = ranked[0]
    if best.iqm.value < AT_CHANCE:
        out.append(f"No IQM reaches {AT_CHANCE:g} (random = 0): on aggregate no memory beats the random policy "
                   "at this budget.")
    tied = [e.agent for e in ranked[1:] if e.iqm.overlaps(best.iqm)]
    below = [e.agent for e in ranked[1:] if not e.iqm.overlaps(best.iqm)]
    if tied:
        out.append(f"The 95% intervals of {', '.join(tied)} overlap {best.agent}'s "
                   f"[{best.iqm.low:.2f}, {best.iqm.high:.2f}]: these runs do not separate them from the first.")
        if below:
            out.append(f"Below {best.agent} with non-overlapping intervals: {', '.join(below)}.")
    elif below:
        out.append(f"{best.agent}'s interval [{best.iqm.low:.2f}, {best.iqm.high:.2f}] lies above every other "
                   "ranked memory's.")
    unranked = [e.agent for e in entries if math.isnan(e.iqm.value)]
    if unranked:
        out.append(f"Without an aggregate (no finished run on some core task): {', '.join(unranked)}.")
    per_task = []
    for t, task in enumerate(tasks):
        means = {e.agent: e.task_ci[t] for e in entries if not math.isnan(e.task_ci[t].value)}
        if not means:
            per_task.append(f"{task.label}: no finished runs")
            continue
        top = max(means, key=lambda a: means[a].value)
        if means[top].value < AT_CHANCE:
            per_task.append(f"{task.label}: none above chance (best mean {means[top].value:.2f})")
            continue
        close = [a for a in means if a != top and means[a].overlaps(means[top])]
        per_task.append(f"{task.label}: {top} {means[top].value:.2f}"
                        + (f" (intervals overlapping: {', '.join(close)})" if close else ""))
    out.append("Best mean per task: " + "; ".join(per_task) + ".")
    horizons = [e for e in entries if e.horizon_ran]
    if horizons:
        longest = max((e.horizon for e in horizons if e.horizon is not None), default=None)
        if longest is None:
            out.append("No memory solved DelayedCue in every seed at any delay run.")
        else:
            out.append(f"Largest DelayedCue delay solved in every seed: {longest:g}, by "
                       + ", ".join(e.agent for e in horizons if e.horizon == longest) + ".")
    return " ".join(out)


def plot_cost(entries: Sequence[Entry], path: Path) -> bool:
    """IQM (95% CI as error bars) against median frames/s and against memory MFLOPs per acting step."""
    ranked = [e for e in entries if not math.isnan(e.iqm.value)]
    if not ranked:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fps", "frames/s (median over runs, log)")]
    if any(e.mflops for e in ranked):
        panels.append(("mflops", "memory MFLOPs per acting step (log)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for i, e in enumerate(ranked):
            x = getattr(e, key)
            if x is None or math.isnan(x) or x <= 0:
                continue
            style = _style(i)
            ax.errorbar(x, e.iqm.value, yerr=[[e.iqm.value - e.iqm.low], [e.iqm.high - e.iqm.value]],
                        fmt=style["marker"], alpha=0.8, capsize=3, label=e.agent)
            ax.annotate(e.agent, (x, e.iqm.value), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.axhline(0, color="firebrick", linestyle="--", linewidth=1, label="random (0)")
        ax.axhline(1, color="forestgreen", linestyle="--", linewidth=1, label="optimal (1)")
        ax.set(xlabel=label, ylabel="IQM of normalized score (95% CI)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("Score vs cost: IQM over the core tasks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def horizon_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The DelayedCue rows of every group as one group (the delays may be spread over groups)."""
    return [{**r, "group": HORIZON_ENV} for r in rows if r["env"] == HORIZON_ENV
            and r["knobs"].startswith(f"{HORIZON_KNOB}=") and " " not in r["knobs"]]


def budgets(suite: Mapping[str, Any]) -> list[str]:
    """Per group: its agents, seeds and frame budget (``total_frames=`` of its overrides)."""
    out = []
    for name, spec in suite.get("groups", {}).items():
        frames = next((o.split("=", 1)[1] for o in spec.get("overrides") or [] if str(o).startswith("total_frames=")),
                      "the script's default")
        sweep = "".join(f", {k} {', '.join(map(str, v))}" for k, v in (spec.get("sweep") or {}).items())
        out.append(f"- `{name}` ({spec['env']}{sweep}): {frames} frames per run, {len(spec['agents'])} agents, "
                   f"seeds {', '.join(map(str, spec.get('seeds', [0])))}")
    return out


def report(suite: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], suite_dir: Path, threshold: float,
           mflops: Callable[[str], float | None] | None = None) -> tuple[str, list[str]]:
    """The leaderboard's markdown section and the PNGs it wrote into ``suite_dir``."""
    tasks, core, entries = build(rows, threshold, mflops)
    images = []
    hrows = horizon_rows(rows)
    solved = {e.agent: e.horizon for e in entries if e.horizon_ran}
    if hrows and plot_horizon(hrows, HORIZON_ENV, suite_dir / "leaderboard_horizon.png", threshold, solved=solved):
        images.append("leaderboard_horizon.png")
    if plot_cost(entries, suite_dir / "leaderboard_cost.png"):
        images.append("leaderboard_cost.png")
    missing = [r for r in rows if r["status"] != "finished"]
    how = ("Normalized score = (eval return - chance) / (optimal - chance), with the env's own levels (eval "
           "return: the mean return of the greedy policy's evaluation episodes at the end of the run; chance: the "
           f"uniformly random policy's expected return): 0 = random, 1 = optimal. Cells: mean over seeds "
           f"[{CONFIDENCE:.0%} bootstrap CI]. IQM: "
           "interquartile mean of every run on the core tasks (columns without †: every memory ran them), "
           f"{CONFIDENCE:.0%} stratified-bootstrap CI ({REPS:,} resamples within each task, seed {SEED}; "
           "Agarwal et al. 2021). A run that failed or did not finish is left out, not scored as zero: a cell "
           "says how many runs it has when some are missing, `-` when none. Largest delay solved: the largest "
           f"DelayedCue delay with eval_success >= {threshold} in every seed (`-`: no DelayedCue run finished). "
           "Memory MFLOPs per acting step: FlopCounterMode over the memory of the agent config at "
           "its defaults (batch 1, gated path on; matrix products and attention, not elementwise ops); `-` for "
           "the reference (not an rlmem memory) and where nothing is counted (torch's fused LSTM kernel). "
           "frames/s differ between envs (the median is over all the memory's runs).")
    lines = ["## Leaderboard", "", how, "",
             "Frame budgets:", "", *budgets(suite), "",
             table(tasks, core, entries), "",
             f"{len(missing)} of {len(rows)} runs without results." if missing else f"All {len(rows)} runs finished.",
             "", "**What this shows.** " + summary(tasks, core, entries), "",
             *[f"![{Path(i).stem}]({i})" for i in images], ""]
    return "\n".join(lines), images
