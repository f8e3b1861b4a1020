"""Where a run computes: the device it learns on (``device: cpu``, the default, or ``cuda`` / ``cuda:<i>`` where
a GPU exists) and how many CPU threads torch uses (``threads``).

Envs always step on the CPU. ``train_lm`` puts the model and its batches on the device; ``train_rl`` keeps
an acting copy of the agent on the CPU beside the envs (one small forward per env step is faster there than
a GPU launch per step) and learns on the device (see :class:`rlmem.ppo.RecurrentPPO`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` this machine has, or a ValueError naming the valid choices."""
    valid = ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(value) if isinstance(value, (str, torch.device)) else None
    except RuntimeError:
        device = None
    ok = device is not None and (device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()))
    if not ok:
        why = "" if torch.cuda.is_available() else " (this machine has no CUDA device)"
        raise ValueError(f"{name}={value!r} is not a device of this machine{why}; valid: {valid}")
    return device


#: ``threads=auto`` uses the cores this process may run on, but at most this many: the models here are small,
#: and past a few threads the per-op synchronisation costs more than the split work saves
MAX_AUTO_THREADS = 4

#: a core counts as taken when other processes keep it at least this busy. Torch's threads wait for each
#: other at every op, so one of them descheduled by another process stalls all: with two threads on a
#: 2-core machine where other work ran, a PPO run went 4-48x slower than with one thread
BUSY_CORE_FRACTION = 0.25


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under ``taskset``; else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(value: Any, name: str = "threads") -> int | str:
    """``auto`` or an integer >= 1, else a ValueError naming the valid choices."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not a thread count; valid: auto or an integer >= 1")
    return value


def resolve_threads(value: Any, name: str = "threads", others_busy: float | None = None) -> int:
    """``value`` as a torch thread count.

    ``auto``: the usable cores (at most :data:`MAX_AUTO_THREADS`) that other processes leave free, at least
    1; ``others_busy`` (cores' worth of CPU other processes use) is sampled for 0.2 s when not given. An
    integer >= 1 as it is; anything else is a ValueError naming the valid choices.
    """
    if check_threads(value, name) != "auto":
        return value
    if others_busy is None:
        others_busy = CpuLoad().sample(0.2)
    return free_threads(usable_cores(), others_busy)


def free_threads(cores: int, others_busy: float) -> int:
    """Threads for ``cores`` cores of which other processes keep ``others_busy`` cores' worth busy."""
    free = cores - others_busy + BUSY_CORE_FRACTION  # a core counts as taken once others use 0.25 of it
    return max(1, min(int(free), cores, MAX_AUTO_THREADS))


class CpuLoad:
    """The CPU time other processes used since the last reading, in cores' worth (Linux ``/proc/stat``
    minus this process's own CPU time; 0 where ``/proc/stat`` is missing)."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already counted in user and nice)
        busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

    def others_busy(self) -> float:
        """Cores' worth of CPU that other processes used since the last call (or construction)."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[2] - last[2] <= 0:
            return 0.0
        others = (now[0] - last[0]) - (now[1] - last[1])
        return max(0.0, others / (now[2] - last[2]))

    def sample(self, seconds: float) -> float:
        """Sleep ``seconds`` and return what other processes used meanwhile."""
        self.others_busy()
        time.sleep(seconds)
        return self.others_busy()


class ThreadGovernor:
    """Keeps ``threads=auto`` right while a run goes: every ``interval`` seconds :meth:`update` measures
    what other processes use and sets torch's thread count to the cores they leave free (a training
    started on an idle machine drops to one thread when a second one starts beside it, and goes back up
    when it ends)."""

    def __init__(self, interval: float = 10.0, load: CpuLoad | None = None, cores: int | None = None):
        self.interval, self.load = interval, load or CpuLoad()
        self.cores = usable_cores() if cores is None else cores
        self._next = time.monotonic() + interval

    def update(self, now: float | None = None) -> int | None:
        """The new thread count if it changed (torch is set to it), else None."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return None
        self._next = now + self.interval
        threads = free_threads(self.cores, self.load.others_busy())
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        return threads
