"""Results of a benchmark suite: ``results.csv``, ``results.md`` and matplotlib PNGs, read from the run dirs.

Every number comes from the runs' own ``metrics.json`` and TensorBoard events. The score of a train_rl run
is its greedy ``eval_success`` (``eval_return`` for envs without a success flag), of a train_lm run its
``eval_accuracy``; ``frames`` counts env steps (train_rl) or trained tokens (train_lm).

How the results are made to read honestly:

- a score is shown beside the env's own chance and optimal levels (:func:`score_bounds`): success plots
  have the fixed y axis ``[chance, optimal]``, and every score plot draws both levels as horizontal lines;
- in a table row, only a *unique* best mean that is *above chance* is bold: when several agents share the
  best value none is bold (a tie is no winner), and a best at chance (within ``CHANCE_MARGIN`` of the
  chance-to-optimal range above it) is no result either;
- one seed is written as what it is (``seed 0``, no ``± std``); several as ``mean ± std over seeds ..``;
- agents whose curves overlap stay visible: each has its own marker and line style, drawn semi-transparent.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlmem.suite import SuiteRun

COLUMNS = ["group", "script", "agent", "env", "knobs", "seed", "status", "frames", "wall_seconds", "fps",
           "eval_return", "eval_success", "score_name", "score", "parameters", "trigger_rate", "eval_trigger_rate",
           "eval_episode_flops", "eval_path_flops", "run_dir"]
#: the TensorBoard tags of the learning curves, per script, in order of preference
CURVE_TAGS = {"train_rl": ("charts/eval_success", "charts/eval_return"), "train_lm": ("lm/eval_accuracy",),
              "sb3_reference": ("charts/eval_success", "charts/eval_return")}


def knob_text(knobs: Sequence[tuple[str, Any]]) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs) or "-"


#: a best mean below chance + CHANCE_MARGIN * (optimal - chance) is "at chance": not bold (:func:`best_to_bold`)
CHANCE_MARGIN = 0.1
#: episodes of the uniformly random policy behind a success score's chance level (when not exact)
CHANCE_EPISODES = 1000
#: steps after which that measurement gives up (an env whose random episodes do not end)
CHANCE_MAX_STEPS = 100_000
#: per agent in a plot: a marker and a line style of its own, so overlapping curves stay visible
MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", "-.", ":")
#: the levels' line style in the plots
CHANCE_STYLE = {"color": "firebrick", "linestyle": "--", "linewidth": 1, "alpha": 0.8}
OPTIMAL_STYLE = {"color": "forestgreen", "linestyle": "--", "linewidth": 1, "alpha": 0.8}


def _env_config(env: str, knobs: str) -> dict[str, Any]:
    """The env config a suite run uses: ``rlmem/conf/env/<env>.yaml`` with the run's knobs (``knob_text``)."""
    from importlib import resources

    import yaml

    cfg = yaml.safe_load((resources.files("rlmem.conf") / "env" / f"{env}.yaml").read_text())
    for item in ("" if knobs in ("", "-") else knobs).split():
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    return cfg


@functools.cache
def score_bounds(script: str, env: str, knobs: str, score_name: str) -> tuple[float, float] | None:
    """``(chance, optimal)`` of a score in its own units, from the env, or None when the env does not say.

    ``eval_return``: the task's ``chance_return()`` and ``optimal_return()``. ``eval_success`` (an episode
    succeeds at the optimal return, :func:`rlmem.env_factory.success_threshold`): optimal 1; chance the success
    rate of the uniformly random policy. The env documents its chance *return*, not that rate: when the random
    policy's episodes end either at the optimal return or at one other return ``f`` (DelayedCue: 1 or 0), the
    rate is exact, ``(chance_return - f) / (optimal - f)``; otherwise it is measured over ``CHANCE_EPISODES``
    random episodes (seed 0). Only rlmem tasks (``rlmem/...`` ids) know these levels; LM scores have none here.
    """
    if script not in ("train_rl", "sb3_reference") or score_name not in ("eval_return", "eval_success"):
        return None
    try:
        cfg = _env_config(env, knobs)
    except (OSError, ValueError):  # an env outside rlmem/conf/env: nothing known
        return None
    import gymnasium as gym

    from rlmem.env_factory import task_vector_env

    try:
        found = task_vector_env(cfg)
        if found is None:
            return None
        vec_cls, kwargs = found
        task = vec_cls.task_cls(num_envs=1, **kwargs)
    except (ValueError, TypeError, gym.error.Error):  # a report never fails for want of a level: none is drawn
        return None
    chance, optimal = float(task.chance_return()), float(task.optimal_return())
    if score_name == "eval_return":
        return chance, optimal
    return _chance_success(vec_cls, kwargs, chance, optimal), 1.0


def _chance_success(vec_cls, kwargs: dict[str, Any], chance_return: float, optimal: float) -> float:
    """The success rate of the uniformly random policy (see :func:`score_bounds`)."""
    n = CHANCE_EPISODES
    vec = vec_cls(num_envs=n, **kwargs)
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    space = vec.single_action_space
    returns, done = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(CHANCE_MAX_STEPS):
        if hasattr(space, "n"):  # discrete
            actions = rng.integers(space.n, size=n)
        else:  # a box (Pendulum's torque): uniform in its bounds
            actions = rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)
        _, reward, terminated, truncated, _ = vec.step(actions)
        returns += np.where(done, 0.0, reward)  # each row's first episode only
        done |= terminated | truncated
        if done.all():
            break
    returns = returns[done]
    success = returns >= optimal - 1e-6
    failures = np.unique(returns[~success])
    if success.any() and len(failures) == 1 and optimal != failures[0]:  # two outcomes: exact from the env
        return float((chance_return - failures[0]) / (optimal - failures[0]))
    return float(success.mean()) if len(returns) else 0.0


def seeds_text(seeds: Sequence[Any]) -> str:
    """``seed 0`` for one seed, ``mean ± std over seeds 0, 1, 2`` for several."""
    seeds = sorted(set(seeds), key=str)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"mean ± std over seeds {', '.join(map(str, seeds))}"


def best_to_bold(means: dict[str, float], bounds: tuple[float, float] | None) -> str | None:
    """The agent whose mean is bold in a table row: the unique best, and only above chance; else None.

    A tie at the best value (every DelayedCue run of ``suite=smoke`` scored 0.1875) bolds no one: a shared
    best is no winner. A best at chance bolds no one either: at chance means below ``chance + CHANCE_MARGIN *
    (optimal - chance)`` (``bounds = (chance, optimal)``; DelayedCue with 4 cues: 0.325), since a greedy eval
    of a few dozen episodes scatters that much around chance (0.297 = 19 of 64 is one standard error above
    0.25)."""
    if not means:
        return None
    best = max(means.values())
    at_best = [a for a, m in means.items() if math.isclose(m, best, rel_tol=1e-9, abs_tol=1e-12)]
    if len(at_best) > 1:
        return None
    if bounds is not None and best < bounds[0] + CHANCE_MARGIN * (bounds[1] - bounds[0]) - 1e-12:
        return None
    return at_best[0]


def result_row(run: SuiteRun, suite_dir: Path, failed: bool = False) -> dict[str, Any]:
    """One ``results.csv`` row (``status``: finished / failed / missing; numbers empty unless finished)."""
    run_dir = run.run_dir(suite_dir)
    row: dict[str, Any] = {"group": run.group, "script": run.script, "agent": run.label, "env": run.env,
                           "knobs": knob_text(run.knobs), "seed": run.seed, "run_dir": str(run_dir)}
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    done = bool(metrics) and (run.script == "train_lm" or metrics.get("frames", 0) >= metrics.get("total_frames", 1))
    row["status"] = "finished" if done and not failed else ("failed" if failed else "missing")
    if not done:
        return row
    if run.script in ("train_rl", "sb3_reference"):
        success = metrics.get("eval_success")
        row.update(frames=metrics["frames"], wall_seconds=metrics["wall_seconds"], fps=metrics["fps"],
                   eval_return=metrics.get("eval_return"), eval_success=success,
                   score_name="eval_success" if success is not None else "eval_return",
                   score=success if success is not None else metrics.get("eval_return"))
    else:
        cfg = metrics.get("config", {})
        seq_len = metrics.get("task_knobs", {}).get("seq_len") or cfg.get("task", {}).get("seq_len") or 0
        row.update(frames=int(metrics["steps"]) * int(cfg.get("batch_size", 0)) * int(seq_len),
                   wall_seconds=metrics["wall_seconds"], fps=metrics["tokens_per_s"],
                   eval_success=metrics["eval_accuracy"], score_name="eval_accuracy", score=metrics["eval_accuracy"])
    row["parameters"] = metrics.get("parameters")
    if "flops_path" in metrics and "eval_trigger_rate" in metrics:  # a memory with a gated path: its compute
        rate = metrics["eval_trigger_rate"]
        row.update(trigger_rate=metrics.get("compute", {}).get("trigger_rate"), eval_trigger_rate=rate,
                   eval_episode_flops=metrics["eval_length"] * (metrics["flops_base"] + rate * metrics["flops_path"]),
                   eval_path_flops=metrics["eval_length"] * rate * metrics["flops_path"])
    return row


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)


def learning_curve(run: SuiteRun, suite_dir: Path) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(tag, x, y)`` of the run's evaluation curve from its TensorBoard events (x: frames or steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ..." at the last file
    run_dir = run.run_dir(suite_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        return None
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in CURVE_TAGS[run.script]:
        if tag in tags:
            scalars = events.Scalars(tag)
            return tag, np.array([s.step for s in scalars]), np.array([s.value for s in scalars])
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def scores(rows: Sequence[dict[str, Any]]) -> dict[str, dict[tuple[str, str, str], list[float]]]:
    """``{group: {(env, knobs, agent): [score per finished seed]}}``."""
    out: dict[str, dict[tuple[str, str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["status"] == "finished" and row.get("score") is not None:
            out[row["group"]][(row["env"], row["knobs"], row["agent"])].append(float(row["score"]))
    return out


def horizon(rows: Sequence[dict[str, Any]], group: str) -> tuple[str, dict[str, dict[float, tuple[float, float]]]] | None:
    """For a group sweeping one numeric knob: ``(knob, {agent: {value: (mean, std)}})``, else None."""
    knobs = {row["knobs"] for row in rows if row["group"] == group}
    parsed = [k.split("=") for k in knobs]
    if len(knobs) < 2 or any(len(p) != 2 or " " in k for p, k in zip(parsed, knobs)):
        return None
    names = {p[0] for p in parsed}
    try:
        [float(p[1]) for p in parsed]
    except ValueError:
        return None
    if len(names) != 1:
        return None
    curves: dict[str, dict[float, tuple[float, float]]] = defaultdict(dict)
    for (env, knob, agent), values in scores(rows)[group].items():
        curves[agent][float(knob.split("=")[1])] = _mean_std(values)
    return names.pop(), dict(curves)


def largest_solved(curve: dict[float, tuple[float, float]], threshold: float) -> float | None:
    """The largest knob value whose mean score reaches ``threshold`` (None if none does)."""
    solved = [v for v, (mean, _) in curve.items() if mean >= threshold - 1e-9]  # means of e.g. 0.95, 0.85
    return max(solved) if solved else None


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def markdown(suite: str, rows: Sequence[dict[str, Any]], wall_seconds: float | None, jobs: int, threshold: float,
             images: Sequence[str], command: str | None = None) -> str:
    """``results.md``: per group a table of mean +- std scores over seeds (best per row in bold), horizons,
    cost per agent, the plots, and how the numbers were made."""
    finished = [r for r in rows if r["status"] == "finished"]
    command = command or f"python scripts/benchmark.py suite={suite}"
    wall = "" if wall_seconds is None else f"{jobs} at a time, wall time of the invocation {wall_seconds / 60:.1f} min, "
    lines = [f"# Benchmark suite `{suite}`", "",
             f"`{command}`: {len(finished)} of {len(rows)} runs finished; {wall}sum of the runs' wall times "
             f"{sum(r['wall_seconds'] for r in finished) / 60:.1f} min. Machine: {machine()}.", ""]
    by_group = scores(rows)
    for group in dict.fromkeys(r["group"] for r in rows):
        group_rows = [r for r in rows if r["group"] == group]
        agents = list(dict.fromkeys(r["agent"] for r in group_rows))
        score_name = next((r["score_name"] for r in group_rows if r.get("score_name")), "score")
        script = next((r["script"] for r in group_rows if r.get("script")), "")
        lines += [f"## {group}: {score_name} ({seeds_text([r['seed'] for r in group_rows])})", "",
                  "Bold: the unique best mean of a row, if above chance (a tie, or a best within "
                  f"{CHANCE_MARGIN:.0%} of the chance-to-optimal range above chance, is not bold).", "",
                  "| env | knobs | chance | optimal | " + " | ".join(agents) + " |",
                  "|---|---|---|---|" + "---|" * len(agents)]
        for env, knobs in dict.fromkeys((r["env"], r["knobs"]) for r in group_rows):
            cells = {a: by_group[group].get((env, knobs, a)) for a in agents}
            bounds = score_bounds(script, env, knobs, score_name)
            bold = best_to_bold({a: float(np.mean(v)) for a, v in cells.items() if v}, bounds)
            texts = []
            for a in agents:
                if not cells[a]:
                    texts.append("-")
                    continue
                mean, std = _mean_std(cells[a])
                text = f"{mean:.3g} ± {std:.2g}" if len(cells[a]) > 1 else f"{mean:.3g}"  # one seed has no std
                texts.append(f"**{text}**" if a == bold else text)
            levels = " | ".join(f"{v:.3g}" for v in bounds) if bounds else "- | -"
            lines.append(f"| {env} | {knobs} | {levels} | " + " | ".join(texts) + " |")
        lines.append("")
        found = horizon(rows, group)
        if found:
            knob, curves = found
            lines += [f"Largest `{knob}` with mean {score_name} >= {threshold}: "
                      + ", ".join(f"{a} {_fmt(largest_solved(curves[a], threshold))}" for a in agents if a in curves),
                      ""]
        lines += ["| agent | parameters | eval return (mean) | frames/s (mean) | wall time per run (mean, s) |",
                  "|---|---|---|---|---|"]
        for a in agents:
            done = [r for r in group_rows if r["agent"] == a and r["status"] == "finished"]
            if done:
                returns = [r["eval_return"] for r in done if r.get("eval_return") is not None]
                ret = f"{np.mean(returns):.4g}" if returns else "-"
                lines.append(f"| {a} | {done[0]['parameters']} | {ret} | {np.mean([r['fps'] for r in done]):.0f} | "
                             f"{np.mean([r['wall_seconds'] for r in done]):.1f} |")
        lines.append("")
    not_done = [r for r in rows if r["status"] != "finished"]
    if not_done:
        lines += ["Runs without results: " + ", ".join(f"{r['group']}/{r['agent']}-{r['env']} {r['knobs']} "
                                                        f"seed {r['seed']} ({r['status']})" for r in not_done), ""]
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "not solved" if value is None else f"{value:g}"


def _style(i: int) -> dict[str, Any]:
    """Plot style of the i-th agent: its own marker and line style, semi-transparent."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)], "alpha": 0.8,
            "markersize": 4}


def _draw_levels(ax, bounds: tuple[float, float] | None, fix_axis: bool) -> None:
    """Horizontal chance and optimal lines; ``fix_axis``: the y axis is exactly ``[chance, optimal]``."""
    if bounds is None:
        return
    chance, optimal = bounds
    below = {}  # agents with values under chance: outside a [chance, optimal] axis, so named in the panel
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        if not line.get_label().startswith("_") and len(y) and y.min() < chance - 1e-9:
            below[line.get_label().split(" (")[0]] = y.min()
    # drawn over the axes' frame (clip_on=False), so a level on the axis' edge stays visible
    ax.axhline(chance, label=f"chance {chance:.3g}", clip_on=False, zorder=5, **CHANCE_STYLE)
    ax.axhline(optimal, label=f"optimal {optimal:.3g}", clip_on=False, zorder=5, **OPTIMAL_STYLE)
    if fix_axis and optimal > chance:
        ax.set_ylim(chance, optimal)
        if below:
            ax.text(0.01, 0.02, "below chance: " + ", ".join(f"{a} (min {v:.3g})" for a, v in below.items()),
                    transform=ax.transAxes, fontsize=7, color=CHANCE_STYLE["color"])


def plot_learning_curves(runs: Sequence[SuiteRun], suite_dir: Path, group: str, path: Path) -> bool:
    """One panel per env setting of ``group``, a line per agent (mean over seeds, band = min..max), the env's
    chance and optimal levels as horizontal lines; success panels span exactly ``[chance, optimal]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    curves: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = defaultdict(lambda: defaultdict(list))
    panel_env: dict[str, tuple[str, str, str]] = {}
    tag, seeds = None, set()
    for run in runs:
        if run.group != group:
            continue
        found = learning_curve(run, suite_dir)
        if found is not None and len(found[1]):
            tag = found[0]
            panel = f"{run.env} {knob_text(run.knobs)}".strip(" -")
            curves[panel][run.label].append(found[1:])
            panel_env[panel] = (run.script, run.env, knob_text(run.knobs))
            seeds.add(run.seed)
    if not curves:
        return False
    score_name = tag.split("/")[-1]
    many = len(seeds) > 1
    n = len(curves)
    cols = min(n, 4)
    # at least 6 inches wide: the title fits above a single panel
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(max(4 * cols, 6), 3 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (panel, by_agent) in zip(axes.flat, curves.items()):
        for i, (agent, found) in enumerate(by_agent.items()):
            length = min(len(x) for x, _ in found)  # seeds of one setting evaluate at the same frames
            x = found[0][0][:length]
            ys = np.stack([y[:length] for _, y in found])
            (line,) = ax.plot(x, ys.mean(0), label=agent, **_style(i))
            if len(found) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.15, color=line.get_color())
        _draw_levels(ax, score_bounds(*panel_env[panel], score_name), fix_axis=score_name == "eval_success")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("frames" if tag.startswith("charts") else "steps")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 100k, 1M: frame counts fit under a small panel
        ax.set_ylabel(tag.split("/")[-1])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    what = f"mean over seeds {', '.join(map(str, sorted(seeds, key=str)))}, band = min..max" if many else \
        seeds_text(seeds)
    fig.suptitle(f"{group}: learning curves ({what})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_horizon(rows: Sequence[dict[str, Any]], group: str, path: Path, threshold: float,
                 solved: dict[str, float | None] | None = None) -> bool:
    """Score vs the swept knob (log scale), a line per agent, legend with the largest value solved ("not
    solved" when none), the env's chance and optimal levels; a success plot spans exactly ``[chance, optimal]``.
    ``solved``: per agent, the largest value solved by another rule than the mean's (e.g. in every seed)."""
    found = horizon(rows, group)
    if found is None or not any(found[1].values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knob, curves = found
    group_rows = [r for r in rows if r["group"] == group]
    score_name = next((r["score_name"] for r in group_rows if r.get("score_name")), "score")
    many = len({r["seed"] for r in group_rows}) > 1
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (agent, curve) in enumerate(curves.items()):
        xs = sorted(curve)
        means = np.array([curve[x][0] for x in xs])
        stds = np.array([curve[x][1] for x in xs])
        best = solved[agent] if solved is not None and agent in solved else largest_solved(curve, threshold)
        label = f"{agent} (not solved)" if best is None else f"{agent} (solved up to {best:g})"
        (line,) = ax.plot(xs, means, label=label, **_style(i))
        if many:
            ax.fill_between(xs, means - stds, means + stds, alpha=0.15, color=line.get_color())
    ax.axhline(threshold, color="gray", linestyle=":", linewidth=1)
    values = sorted({x for curve in curves.values() for x in curve})
    # the levels of every swept value: one pair of lines when the sweep leaves them alone (a delay), else steps
    env_knobs = {float(r["knobs"].split("=")[1]): (r["script"], r["env"], r["knobs"]) for r in group_rows}
    bounds = {v: score_bounds(*env_knobs[v], score_name) for v in values if v in env_knobs}
    if bounds and None not in bounds.values() and len(set(bounds.values())) == 1:
        _draw_levels(ax, next(iter(bounds.values())), fix_axis=score_name == "eval_success")
    elif bounds and None not in bounds.values():
        xs = sorted(bounds)
        ax.plot(xs, [bounds[x][0] for x in xs], drawstyle="steps-mid", label="chance", **CHANCE_STYLE)
        ax.plot(xs, [bounds[x][1] for x in xs], drawstyle="steps-mid", label="optimal", **OPTIMAL_STYLE)
        if score_name == "eval_success":
            ax.set_ylim(min(b[0] for b in bounds.values()), max(b[1] for b in bounds.values()))
    ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()
    ax.set_xlabel(knob)
    ax.set_ylabel(score_name)
    ax.set_title(f"{group}: memory horizon ({seeds_text([r['seed'] for r in group_rows])})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_return_vs_compute(rows: Sequence[dict[str, Any]], group: str, path: Path) -> bool:
    """Eval return vs memory FLOPs per eval episode, a point per agent (mean over seeds, std as error bars),
    a panel per env; only for groups whose runs report compute."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    env_bounds: dict[str, tuple[float, float] | None] = {}
    for row in rows:
        if row["group"] == group and row["status"] == "finished" and row.get("eval_episode_flops") not in (None, ""):
            env = f"{row['env']} {row['knobs']}".strip(" -")
            points[env][row["agent"]].append((float(row["eval_episode_flops"]), float(row["eval_return"])))
            env_bounds[env] = score_bounds(row["script"], row["env"], row["knobs"], "eval_return")
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
    markers = "osD^vP*Xh<>"
    for ax, (env, by_agent) in zip(axes[0], points.items()):
        for i, (agent, values) in enumerate(by_agent.items()):
            flops, returns = np.array(values).T
            ax.errorbar(flops.mean() / 1e6, returns.mean(), xerr=flops.std() / 1e6, yerr=returns.std(),
                        fmt=markers[i % len(markers)], markersize=9 - 0.5 * (i % 6), alpha=0.8, capsize=3, label=agent)
        _draw_levels(ax, env_bounds.get(env), fix_axis=False)
        ax.set(title=env, xlabel="memory MFLOPs per eval episode", ylabel="eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compute_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per group, env and agent (mean over finished seeds) eval return, eval success, the trigger
    rate in training and in greedy eval, and MFLOPs per eval episode; empty without compute numbers."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "finished" and row.get("eval_episode_flops") not in (None, ""):
            cells[(row["group"], f"{row['env']} {row['knobs']}".strip(" -"), row["agent"])].append(row)
    if not cells:
        return ""

    def mean(found, key):
        values = [float(r[key]) for r in found if r.get(key) not in (None, "")]
        return f"{np.mean(values):.3f}" if values else "-"

    lines = ["| group | env | agent | eval return | eval success | trigger rate (train) | trigger rate (eval) "
             "| memory MFLOPs / eval episode | of which the gated path |", "|---|---|---|---|---|---|---|---|---|"]
    for (group, env, agent), found in cells.items():
        mflops = np.mean([float(r["eval_episode_flops"]) for r in found]) / 1e6
        path = np.mean([float(r.get("eval_path_flops") or 0.0) for r in found]) / 1e6
        rates = f"{mean(found, 'trigger_rate')} | {mean(found, 'eval_trigger_rate')}"
        lines.append(f"| {group} | {env} | {agent} | {mean(found, 'eval_return')} | {mean(found, 'eval_success')} | "
                     f"{rates} | {mflops:.3f} | {path:.4f} |")
    return "\n".join(lines)


def write_report(suite: str, runs: Sequence[SuiteRun], failed: Sequence[SuiteRun], suite_dir: Path,
                 wall_seconds: float | None, jobs: int, threshold: float, command: str | None = None
                 ) -> list[dict[str, Any]]:
    """``results.csv``, the PNGs and ``results.md`` in ``suite_dir``; returns the rows."""
    failed_set = set(failed)
    rows = [result_row(r, suite_dir, r in failed_set) for r in runs]
    write_csv(rows, suite_dir / "results.csv")
    images = []
    for group in dict.fromkeys(r.group for r in runs):
        if plot_learning_curves(runs, suite_dir, group, suite_dir / f"learning_{group}.png"):
            images.append(f"learning_{group}.png")
        if plot_horizon(rows, group, suite_dir / f"horizon_{group}.png", threshold):
            images.append(f"horizon_{group}.png")
        if plot_return_vs_compute(rows, group, suite_dir / f"compute_{group}.png"):
            images.append(f"compute_{group}.png")
    text = markdown(suite, rows, wall_seconds, jobs, threshold, images, command)
    table = compute_table(rows)
    if table:
        text += "\n## Return vs compute\n\n" + table + "\n"
    (suite_dir / "results.md").write_text(text)
    return rows
