"""Benchmark suites: agents x envs x knob values x seeds, each an ordinary train_rl / train_lm run.

A suite (``rlmem/conf/suite/<name>.yaml``) is a set of named groups::

    groups:
      delayed_cue:
        script: train_rl          # or train_lm (then agents are models and env is a task)
        agents: [gru, mamba]
        env: delayed_cue
        sweep: {delay: [10, 100]} # env / task knobs, every combination of the listed values
        seeds: [0, 1]
        overrides: [total_frames=200000]   # any other command-line overrides of the script
        variants: {learned: [trigger=learned], never: [trigger=never]}   # optional: named override sets,
                                  # each a run of every agent (shown as agent[variant])
        long_episodes: {knob: delay, extra_steps: 2}   # optional, see long_episode_overrides

An agent named ``sb3_recurrent_ppo`` in a train_rl group is the reference: its runs are
``python -m rlmem.commands.sb3_reference`` (sb3-contrib's RecurrentPPO) with the env knobs, the seed and
only the ``total_frames`` / ``threads`` overrides.

:func:`plan` expands it into :class:`SuiteRun` s, :func:`execute` runs them as subprocesses
(``python -m rlmem.commands.train_rl ...``: rlmem installed, any working directory), ``jobs`` at a time, into ``<suite dir>/runs/<group>/<name>``. A run whose ``metrics.json`` says it finished is skipped, an
interrupted one resumes from its checkpoint (train_rl and train_lm do that; a reference run starts over),
so rerunning a killed suite continues it. With ``launcher="ray"`` each run is a Ray task (one CPU) that runs
the same command, on this machine's Ray or a cluster's, so its files are those of a local run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmem.conf import available
from rlmem.env_factory import covering_slices

log = logging.getLogger("benchmark")

#: the package of the commands a suite runs (``python -m rlmem.commands.<script>``: works from a non-editable
#: install, in any directory)
COMMANDS = "rlmem.commands"
#: per script: (config group of the agents, config group of the envs)
GROUPS = {"train_rl": ("agent", "env"), "train_lm": ("model", "task"), "sb3_reference": (None, "env")}
#: an "agent" of train_rl groups that is run by rlmem.commands.sb3_reference (sb3-contrib's RecurrentPPO), which
#: takes only these of the group's overrides
REFERENCE_AGENT, REFERENCE_OVERRIDES = "sb3_recurrent_ppo", ("total_frames=", "threads=")
SETTINGS_FILE = "suite_run.json"
LAUNCHERS = ("local", "ray")
GROUP_KEYS = {"script", "agents", "env", "sweep", "seeds", "overrides", "long_episodes", "variants"}


@dataclass(frozen=True)
class SuiteRun:
    """One run of a suite: ``script agent=.. env=.. env.<knob>=.. seed=.. overrides..``."""

    group: str
    script: str
    agent: str
    env: str
    knobs: tuple[tuple[str, Any], ...]
    seed: int
    overrides: tuple[str, ...]
    variant: str = ""  # the name of the group's override set it runs ("" without variants)

    @property
    def label(self) -> str:
        """The agent as the results show it: ``agent`` or ``agent[variant]``."""
        return f"{self.agent}[{self.variant}]" if self.variant else self.agent

    @property
    def name(self) -> str:
        knobs = "".join(f"-{k}{v}" for k, v in self.knobs)
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.agent}{variant}-{self.env}{knobs}-seed{self.seed}"

    def run_dir(self, suite_dir: Path) -> Path:
        return Path(suite_dir) / "runs" / self.group / self.name

    def arguments(self) -> list[str]:
        """The script's command-line overrides (without the run dir)."""
        agent_group, env_group = GROUPS[self.script]
        agent = [] if agent_group is None else [f"{agent_group}={self.agent}"]
        return [*agent, f"{env_group}={self.env}", *(f"{env_group}.{k}={v}" for k, v in self.knobs),
                f"seed={self.seed}", *self.overrides]

    def command(self, suite_dir: Path) -> list[str]:
        """The run's command line: a suite runs several runs side by side (or one per Ray CPU), so each uses
        one torch thread unless its overrides say ``threads=``."""
        threads = [] if any(o.startswith("threads=") for o in self.overrides) else ["threads=1"]
        return [sys.executable, "-m", f"{COMMANDS}.{self.script}", *self.arguments(), *threads,
                f"hydra.run.dir={self.run_dir(suite_dir)}"]


def long_episode_overrides(agent: str, episode_length: int, default_rollout: int = 64) -> list[str]:
    """PPO overrides that let PPO learn a memory over a whole episode of ``episode_length`` steps.

    PPO learns a dependency only if both ends fall in one replayed slice (the gradient path goes through
    the state between them). When two episodes do not fit in the default 64-step slice, the slice (= rollout)
    becomes the power of two >= 2 episode lengths, with fewer envs to keep about 2048 frames per iteration,
    and the windowed transformer's window covers the episode. Shorter episodes keep the defaults.
    """
    if 2 * episode_length <= default_rollout:
        return []
    length, num_envs = covering_slices(episode_length)
    overrides = [f"ppo.rollout_len={length}", f"ppo.seq_len={length}", f"ppo.num_envs={num_envs}"]
    if agent == "transformer":
        overrides.append(f"agent.window={episode_length}")
    return overrides


def plan(groups: Mapping[str, Mapping[str, Any]]) -> list[SuiteRun]:
    """Every run of a suite's ``groups`` (validated: unknown scripts, agents, envs or keys raise ``ValueError``)."""
    if not groups:
        raise ValueError("the suite has no groups")
    runs = []
    for group, spec in groups.items():
        where = f"suite group {group!r}"
        unknown = set(spec) - GROUP_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(GROUP_KEYS)}")
        script = spec.get("script")
        if script not in ("train_rl", "train_lm"):
            raise ValueError(f"{where}: script={script!r}; valid choices: train_rl, train_lm")
        agent_group, env_group = GROUPS[script]
        agents, env = list(spec.get("agents") or []), spec.get("env")
        if not agents:
            raise ValueError(f"{where}: no agents")
        checked = [(a, agent_group) for a in agents if not (script == "train_rl" and a == REFERENCE_AGENT)]
        for name, group_name in [*checked, (env, env_group)]:
            if name not in available(group_name):
                raise ValueError(f"{where}: unknown {group_name} {name!r}; valid choices: "
                                 f"{', '.join(available(group_name))}")
        sweep = dict(spec.get("sweep") or {})
        for knob, values in sweep.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"{where}: sweep.{knob} must be a non-empty list of values, got {values!r}")
        seeds = [int(s) for s in spec.get("seeds", [0])]
        overrides = tuple(str(o) for o in spec.get("overrides") or [])
        variants = dict(spec.get("variants") or {})
        for variant, extra_overrides in variants.items():
            listed = isinstance(extra_overrides, Sequence) and not isinstance(extra_overrides, (str, bytes))
            if not str(variant) or not listed:
                raise ValueError(f"{where}: variants must map names to lists of overrides, got {variant!r}: "
                                 f"{extra_overrides!r}")
        variants = variants or {"": []}  # no variants: one run per agent, as the group says
        long_episodes = spec.get("long_episodes")
        if long_episodes is not None and (script != "train_rl" or long_episodes.get("knob") not in sweep):
            raise ValueError(f"{where}: long_episodes needs script=train_rl and its knob among the swept knobs "
                             f"({sorted(sweep)})")
        for agent in agents:
            for values in itertools.product(*sweep.values()):
                knobs = tuple(zip(sweep, values))
                extra: list[str] = []
                if long_episodes is not None:
                    episode = int(dict(knobs)[long_episodes["knob"]]) + int(long_episodes.get("extra_steps", 0))
                    extra = long_episode_overrides(agent, episode)
                for seed, (variant, variant_overrides) in itertools.product(seeds, variants.items()):
                    if script == "train_rl" and agent == REFERENCE_AGENT:
                        kept = tuple(o for o in overrides if o.startswith(REFERENCE_OVERRIDES))
                        runs.append(SuiteRun(group, "sb3_reference", agent, env, knobs, seed, kept, str(variant)))
                    else:
                        runs.append(SuiteRun(group, script, agent, env, knobs, seed,
                                             (*extra, *overrides, *map(str, variant_overrides)), str(variant)))
    names = [(r.group, r.name) for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("the suite lists the same run twice (repeated agents, knob values or seeds)")
    return runs


def finished(run: SuiteRun, suite_dir: Path) -> bool:
    """Whether the run's ``metrics.json`` says it is done (train_rl writes it at checkpoints too)."""
    path = run.run_dir(suite_dir) / "metrics.json"
    if not path.exists():
        return False
    if run.script == "train_lm":  # written once, at the end
        return True
    metrics = json.loads(path.read_text())
    return metrics.get("frames", 0) >= metrics.get("total_frames", float("inf"))


def check_settings(runs: Sequence[SuiteRun], suite_dir: Path) -> None:
    """Refuse a suite dir whose runs were started with other settings (their results would be mixed up)."""
    for run in runs:
        path = run.run_dir(suite_dir) / SETTINGS_FILE
        if path.exists() and json.loads(path.read_text()) != run.arguments():
            raise ValueError(f"{run.run_dir(suite_dir)} was started with other settings "
                             f"({json.loads(path.read_text())}, now {run.arguments()}); choose another run dir "
                             "(hydra.run.dir=...) or delete that run")


def execute(runs: Sequence[SuiteRun], suite_dir: str | Path, jobs: int, poll_seconds: float = 0.5,
            launcher: str = "local", ray_init_config: Mapping[str, Any] | None = None) -> list[SuiteRun]:
    """Run what is not finished, ``jobs`` subprocesses at a time; returns the runs that failed.

    Each run's stdout/stderr go to ``<run dir>/output.log`` (the script's own log is ``<script>.log``).
    SIGINT/SIGTERM stop the suite: the running scripts get SIGTERM (they checkpoint and exit) and the
    signal is raised again as ``KeyboardInterrupt`` once they are gone.

    ``launcher="ray"``: each run is a Ray task (``num_cpus=1``) running the same command, at most ``jobs`` in
    flight; ``ray_init_config`` are the ``ray.init()`` kwargs (``address``: None starts a local Ray, "auto"
    joins a running cluster, whose nodes need rlmem installed in a Python at the same path and the suite
    dir on a shared filesystem). A stop cancels the tasks, whose scripts get SIGTERM and checkpoint.
    """
    suite_dir = Path(suite_dir)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}; valid choices: {', '.join(LAUNCHERS)}")
    if launcher == "ray":
        _check_ray()
    check_settings(runs, suite_dir)
    todo = [r for r in runs if not finished(r, suite_dir)]
    log.info("%d runs, %d already finished, %d to run, %d at a time; outputs in %s", len(runs),
             len(runs) - len(todo), len(todo), jobs, suite_dir / "runs")
    active: dict[SuiteRun, tuple[subprocess.Popen, float, Any]] = {}
    failed: list[SuiteRun] = []
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    done = len(runs) - len(todo)
    try:
        if launcher == "ray":
            failed = _execute_on_ray(runs, todo, suite_dir, jobs, poll_seconds, dict(ray_init_config or {}), stop)
        while (todo or active) and not stop:
            while todo and len(active) < jobs:
                run = todo.pop(0)
                out = open(_start_run_dir(run, suite_dir) / "output.log", "ab")
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                active[run] = (subprocess.Popen(run.command(suite_dir), stdout=out, stderr=subprocess.STDOUT,
                                                env=env, start_new_session=True), time.perf_counter(), out)
            time.sleep(poll_seconds)
            for run, (proc, start, out) in list(active.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del active[run]
                done += 1
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                log.info("[%d/%d] %s/%s %s in %.0f s", done, len(runs), run.group, run.name, status,
                         time.perf_counter() - start)
                if proc.returncode != 0:
                    failed.append(run)
                    log.error("%s: see %s", run.name, run.run_dir(suite_dir) / "output.log")
    finally:
        for proc, _, out in active.values():  # stopped (or crashed): the scripts checkpoint on SIGTERM
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, out in active.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop:
        raise KeyboardInterrupt(f"suite stopped by {signal.Signals(stop[0]).name}; rerun the same command to "
                                "continue it")
    return failed


def _check_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError('launcher=ray needs Ray, which is not installed: pip install -e ".[ray]"')


def _execute_on_ray(runs: Sequence[SuiteRun], todo: list[SuiteRun], suite_dir: Path, jobs: int, poll_seconds: float,
                    ray_init_config: dict[str, Any], stop: list[int]) -> list[SuiteRun]:
    """:func:`execute`'s loop with each run a Ray task of :func:`run_command`; empties ``todo``."""
    if not todo:
        return []
    import ray

    owns_ray = not ray.is_initialized()
    if owns_ray:
        if ray_init_config.get("address") is not None:  # a cluster is already sized
            ray_init_config = {k: v for k, v in ray_init_config.items() if k not in ("num_cpus", "num_gpus")}
        ray.init(**{"include_dashboard": False, **ray_init_config})
    if _main_thread():  # ray.init installs its own SIGTERM handler (which exits at once): the suite's again
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: stop.append(signum))
    task = ray.remote(num_cpus=1, max_retries=0)(run_command)
    active: dict[Any, tuple[SuiteRun, float]] = {}
    failed: list[SuiteRun] = []
    done = len(runs) - len(todo)
    try:
        while (todo or active) and not stop:
            while todo and len(active) < jobs:
                run = todo.pop(0)
                log_path = _start_run_dir(run, suite_dir) / "output.log"
                ref = task.remote(run.command(suite_dir), str(log_path), os.getcwd())
                active[ref] = (run, time.perf_counter())
            ready, _ = ray.wait(list(active), num_returns=1, timeout=poll_seconds)
            for ref in ready:
                run, start = active.pop(ref)
                try:
                    code = ray.get(ref)
                except ray.exceptions.RayError as err:  # the task itself failed (e.g. its node was lost)
                    log.error("%s: the Ray task failed: %s", run.name, err)
                    code = None
                done += 1
                status = "done" if code == 0 else f"FAILED (exit {code})"
                log.info("[%d/%d] %s/%s %s in %.0f s", done, len(runs), run.group, run.name, status,
                         time.perf_counter() - start)
                if code != 0:
                    failed.append(run)
                    log.error("%s: see %s", run.name, run.run_dir(suite_dir) / "output.log")
    finally:
        for ref in active:  # stopped (or crashed): a cancelled task sends its script SIGTERM (it checkpoints)
            ray.cancel(ref)
        if active:
            ray.wait(list(active), num_returns=len(active), timeout=150)
        if owns_ray:
            ray.shutdown()
    return failed


def run_command(command: Sequence[str], log_path: str, cwd: str, poll_seconds: float = 0.5) -> int:
    """Run ``command`` in ``cwd`` (one torch thread), appending its output to ``log_path``; its exit code.
    Interrupted (a cancelled Ray task gets ``KeyboardInterrupt``), it sends the command SIGTERM and waits."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        return proc.returncode


def _start_run_dir(run: SuiteRun, suite_dir: Path) -> Path:
    """The run's dir, created, with the settings it is started with (see :func:`check_settings`)."""
    run_dir = run.run_dir(suite_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SETTINGS_FILE).write_text(json.dumps(run.arguments()))
    return run_dir


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
